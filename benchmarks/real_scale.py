"""Real-scale CPU benchmark: prepare -> convert -> upload -> load by repo id, at the real model's shapes.

    nice python -m benchmarks.real_scale                       # int8 -> benchmarks/real_scale.json
    nice python -m benchmarks.real_scale --schemes int8 int4   # both schemes (~10 min and ~11 GB RSS each)
    python -m benchmarks.real_scale --shapes tiny --out /tmp/rs.json   # a minute, for a check

A random-weight Whisper built at whisper-large-v3-distil-fr's shapes (benchmarks/gpu_probe.py SHAPES:
756 M parameters, 32/2 layers, d_model 1280, 128 mel bins, 51,866 tokens) stands in for the trained
model and for the base model. The product's own commands do the work: `python -m steps prepare` on a
few fixture clips, `python -m steps convert` per scheme (train's output is this model: nothing is
trained on a CPU), `tasks.upload.push_model_folder` (what upload_to_hub runs once the gate passed) to the
test Hub server (tests/hub_server.py), and the model card's own snippet,
`ORTModelForSpeechSeq2Seq.from_pretrained(<repo id>)`, in a fresh process that transcribes one clip.

Recorded per step: wall seconds, peak RSS of the step's process, disk its output folder holds; for
prepare also bytes per row (the fixture clips are short: bytes per row grow with clip length, so the
mean clip length is recorded beside it); for the load, whether it worked and what it downloaded.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for p in (REPO, REPO / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from benchmarks.gpu_probe import SHAPES  # noqa: E402

OUT = REPO / "benchmarks" / "real_scale.json"
MANIFEST = "fixtures/french/manifest.jsonl"
LOAD_SNIPPET = """
import json, sys, time
t0 = time.time()
import soundfile as sf
from optimum.onnxruntime import ORTModelForSpeechSeq2Seq
from transformers import AutoProcessor
repo, clip = sys.argv[1], sys.argv[2]
model = ORTModelForSpeechSeq2Seq.from_pretrained(repo)
processor = AutoProcessor.from_pretrained(repo)
loaded = time.time()
audio, sr = sf.read(clip, dtype="float32")
inputs = processor(audio, sampling_rate=sr, return_tensors="pt")
ids = model.generate(inputs.input_features, language="fr", task="transcribe", max_new_tokens=4)
print("LOAD_RESULT " + json.dumps({"load_s": round(loaded - t0, 1), "transcribe_s": round(time.time() - loaded, 1),
      "text": processor.batch_decode(ids, skip_special_tokens=True)[0][:80]}))
"""


def dir_mb(path: Path) -> float:
    return round(sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 1e6, 1)


def _hwm_kb(pid: int) -> int:
    """The process's peak RSS so far (VmHWM, kB), 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((int(line.split()[1]) for line in f if line.startswith("VmHWM:")), 0)
    except OSError:
        return 0


def run_measured(cmd: list[str], env: dict | None = None, log: Path | None = None) -> dict:
    """Run a command; its wall seconds, exit code and peak RSS (its own VmHWM, read while it runs: the
    rusage max RSS of a child would include this process's RSS at fork, e.g. the model just built)."""
    t0, peak = time.time(), 0
    with open(log or os.devnull, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            peak = max(peak, _hwm_kb(proc.pid))
            time.sleep(0.2)
    return {"seconds": round(time.time() - t0, 1), "exit_code": proc.returncode, "peak_rss_mb": round(peak / 1024)}


def build_model(shapes: dict, out: Path, seed: int = 0) -> dict:
    """A random-weight Whisper at these shapes with the project's processor (mel bins of the shapes)."""
    import torch
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration

    from steps.models import _save, _whisper_config, build_processor, generation_config

    processor = build_processor(shapes["vocab_size"])
    processor.feature_extractor = WhisperFeatureExtractor(feature_size=shapes["num_mel_bins"], sampling_rate=16000)
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(_whisper_config(shapes, processor.tokenizer)).eval()
    _save(out, model, processor, generation_config(processor.tokenizer, shapes["decoder_layers"],
                                                   shapes["decoder_attention_heads"]))
    return {"parameters_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
            "safetensors_mb": round(sum(f.stat().st_size for f in out.glob("*.safetensors")) / 1e6, 1)}


def write_config(path: Path, model_dir: Path, scheme: str, clips: int) -> Path:
    import yaml

    cfg = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    cfg.update(name="real-scale")
    cfg["model"]["name_or_path"] = str(model_dir)
    cfg["data"].update(manifest=MANIFEST, max_samples=clips, max_eval_samples=max(1, clips // 4))
    cfg["quant"]["scheme"] = scheme
    cfg["machine"]["backend"] = "local"  # the steps run here, on a model folder of this computer
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def step(name: str, config: Path, workdir: Path, logs: Path) -> dict:
    m = run_measured([sys.executable, "-m", "steps", name, "--config", str(config), "--workdir", str(workdir)],
                     log=logs / f"{name}-{config.stem}.log")
    m["disk_mb"] = dir_mb(workdir / name) if (workdir / name).is_dir() else 0.0
    if m["exit_code"] != 0:
        m["log_tail"] = (logs / f"{name}-{config.stem}.log").read_text()[-1500:]
    return m


def prepare_rows(workdir: Path, m: dict) -> None:
    """Rows, bytes per row and mean clip seconds of what prepare stored."""
    result = json.loads((workdir / "prepare" / "result.json").read_text())
    counts = result["metrics"]["counts"]
    rows = sum(counts.values())
    m["rows"] = counts
    m["bytes_per_row"] = round(sum(f.stat().st_size for f in (workdir / "prepare").rglob("*") if f.is_file()) / rows)
    try:
        from datasets import load_from_disk

        durations = [d for s in counts for d in load_from_disk(str(workdir / "prepare" / s))["duration"]]
        m["mean_clip_s"] = round(sum(durations) / len(durations), 2)
    except Exception as e:  # noqa: BLE001 - prepare's storage may change: record why it is missing
        m["mean_clip_s"] = f"not read: {type(e).__name__}"


def fake_train(workdir: Path, model_dir: Path) -> None:
    """train's output as convert reads it: the model (hard links) and a result.json."""
    out = workdir / "train"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(model_dir, out / "model", copy_function=os.link)
    (out / "result.json").write_text(json.dumps({"step": "train", "status": "ok", "config_hash": "benchmark",
                                                 "metrics": {}}))


def upload_and_load(model_dir: Path, cfg_path: Path, scheme: str, hub_root: Path, clip: Path, logs: Path) -> dict:
    from contract.config import load_config
    from hub_server import HubServer
    from tasks.model_card import render_model_card
    from tasks.upload import push_model_folder

    token, repo = f"hf_{secrets.token_hex(12)}", f"bench/real-scale-{scheme}"
    out: dict = {}
    with HubServer(hub_root, {token: ("bench", "write")}) as hub:
        t0 = time.time()
        pushed = push_model_folder(model_dir, repo, token, card=render_model_card(load_config(str(cfg_path)), {}),
                                   endpoint=hub.url)
        out["upload"] = {"seconds": round(time.time() - t0, 1), "files": pushed["files"],
                         "mb": round(pushed["bytes"] / 1e6, 1), "repo_files": sorted(hub.repo_files(repo))}
        env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": token, "HF_HOME": str(hub_root / "user-cache"),
               "HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1"}
        log = logs / f"load-{scheme}.log"
        m = run_measured([sys.executable, "-c", LOAD_SNIPPET, repo, str(clip)], env=env, log=log)
        text = log.read_text()
        line = next((x for x in text.splitlines() if x.startswith("LOAD_RESULT ")), None)
        out["load"] = {"by_repo_id": repo, "ok": m["exit_code"] == 0 and line is not None, **m,
                       **(json.loads(line.removeprefix("LOAD_RESULT ")) if line else {"error": text[-1500:]}),
                       "downloaded": sorted({p.rsplit("/", 1)[-1] for meth, p in hub.requests
                                             if meth == "GET" and "/resolve/" in p})}
    return out


def gpu_train_setup(work: Path, shapes: str, clips: int, steps: int, batch: int) -> Path:
    """For scripts/gpu_real_scale.sh: the random model at these shapes and a run config that trains it
    for `steps` QAT steps (compiled blocks on CUDA: train.compile unset). Returns the config's path."""
    import yaml

    model_dir = work / "model"
    if not (model_dir / "config.json").is_file():
        model_dir.mkdir(parents=True, exist_ok=True)
        build_model(SHAPES[shapes], model_dir)
    cfg_path = write_config(work / "gpu-train.yaml", model_dir, "int8", clips)
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["train"].update(max_steps=steps, per_device_batch_size=batch, grad_accum=1, eval_every=10**6,
                        save_every=10**6, gradient_checkpointing=True, num_workers=0)
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return cfg_path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu-train-setup", action="store_true",
                   help="only build the model and write a few-step train config in --workdir (the GPU script)")
    p.add_argument("--train-steps", type=int, default=6)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--shapes", choices=sorted(SHAPES), default="large-v3-distil")
    p.add_argument("--schemes", nargs="+", choices=("int8", "int4"), default=["int8"])
    p.add_argument("--clips", type=int, default=8, help="training rows prepare takes (dev and test get a quarter)")
    p.add_argument("--workdir", type=Path, help="kept when given; a temporary folder (removed) otherwise")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    if args.gpu_train_setup:
        if args.workdir is None:
            p.error("--gpu-train-setup needs --workdir")
        print(gpu_train_setup(args.workdir, args.shapes, args.clips, args.train_steps, args.batch))
        return 0

    work = args.workdir or Path(tempfile.mkdtemp(prefix="real-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    report: dict = {"command": "python -m benchmarks.real_scale " + " ".join(argv if argv is not None else sys.argv[1:]),
                    "date": time.strftime("%Y-%m-%d", time.gmtime()),
                    "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)},
                    "shapes": {"name": args.shapes, **SHAPES[args.shapes]}, "steps": {}}

    def write() -> None:
        args.out.write_text(json.dumps(report, indent=2) + "\n")

    try:
        model_dir = work / "model"
        t0 = time.time()
        if not (model_dir / "config.json").is_file():
            model_dir.mkdir(exist_ok=True)
            report["model"] = build_model(SHAPES[args.shapes], model_dir)
        else:
            report["model"] = {"safetensors_mb": round(sum(f.stat().st_size for f in model_dir.glob("*.safetensors")) / 1e6, 1)}
        report["model"]["build_s"] = round(time.time() - t0, 1)
        work_steps = work / "run"
        cfg = write_config(work / f"{args.schemes[0]}.yaml", model_dir, args.schemes[0], args.clips)
        report["steps"]["prepare"] = m = step("prepare", cfg, work_steps, logs)
        write()
        if m["exit_code"] != 0:
            return 1
        prepare_rows(work_steps, m)
        fake_train(work_steps, model_dir)
        clip = REPO / next(json.loads(x) for x in (REPO / MANIFEST).read_text().splitlines() if x.strip())["audio"]
        for scheme in args.schemes:
            cfg = write_config(work / f"{scheme}.yaml", model_dir, scheme, args.clips)
            shutil.rmtree(work_steps / "convert", ignore_errors=True)
            report["steps"][f"convert_{scheme}"] = m = step("convert", cfg, work_steps, logs)
            if m["exit_code"] == 0:
                result = json.loads((work_steps / "convert" / "result.json").read_text())["metrics"]
                m["sizes_mb"] = result["sizes_mb"]
                m["files"] = {d.name: sorted(f.name for f in d.iterdir() if f.is_file() and ".onnx" in f.name)
                              for d in sorted((work_steps / "convert").iterdir()) if d.is_dir()}
                hub = work / f"hub-{scheme}"
                shutil.rmtree(hub, ignore_errors=True)
                got = upload_and_load(work_steps / "convert" / f"qat_{scheme}", cfg, scheme, hub, clip, logs)
                report["steps"][f"upload_{scheme}"] = got["upload"]
                report["steps"][f"load_{scheme}"] = got["load"]
                shutil.rmtree(hub, ignore_errors=True)
            write()
        return 0 if all(s.get("exit_code", 0) == 0 and s.get("ok", True) for s in report["steps"].values()) else 1
    finally:
        write()
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
