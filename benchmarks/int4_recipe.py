"""int4 recipe comparison: WER of one int4 QAT run's weights served several ways, on the demo test set.

    python -m steps prepare --config CFG --workdir W && python -m steps train --config CFG --workdir W
    python -m benchmarks.int4_recipe --config CFG --workdir W --option NAME   # adds NAME to int4_recipe.json

CFG is configs/demo.yaml with quant.scheme int4 (and whatever the option changes). For the run's
trained weights (W/train/model) it measures, on W/prepare/test with evaluate's own scoring:
- qat_fp32: the weights in PyTorch, no quantization ("its fp32", what the gate compares with);
- qat_fake_quant: PyTorch with steps/fake_quant.py's quantizers (what training saw);
- qat_int4 / qat_int4_acc4: the ONNX int4 export through steps/convert.py, with the shipped
  MatMulNBits accuracy_level (0) and with accuracy_level 4 (int8 block activations);
- base_ptq_int4: the untrained base model exported and quantized the same way (the gate's PTQ side).
Writes benchmarks/int4_recipe.json (one entry per option, with the commands) and prints a summary.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "benchmarks" / "int4_recipe.json"


def _export(model_dir: Path, out: Path, group: int, levels: dict[str, int], log) -> dict[str, Path]:
    """ONNX fp32 export of model_dir, quantized to int4 once per accuracy level (cached in out)."""
    from steps import convert
    from steps.fuse_attention import fuse_encoder_file

    dirs = {name: out / name for name in levels}
    if all((d / convert.ENCODER).is_file() for d in dirs.values()):
        return dirs
    fp32 = out / "fp32"
    convert.export(model_dir, fp32)
    heads = json.loads((fp32 / "config.json").read_text())["encoder_attention_heads"]
    for name, level in levels.items():
        convert.quantize_dir(fp32, dirs[name], "int4", group, int4_accuracy_level=level)
        fuse_encoder_file(dirs[name] / convert.ENCODER, heads)
        log(f"{name}: accuracy_level {level} -> {dirs[name]}")
    return dirs


def _wer(transcriber, audios, refs_n, batch: int, max_new_tokens: int) -> dict:
    from contract.normalize import normalize_french
    from steps.evaluate import score

    hyps = []
    for start in range(0, len(audios), batch):
        hyps += transcriber.transcribe(audios[start:start + batch], max_new_tokens, batch)
    s = score(refs_n, [normalize_french(h) for h in hyps])
    return {"wer": round(s.wer, 3), "cer": round(s.cer, 3), "wer_ci": s.bootstrap(1000)["wer"]}


def measure(cfg, workdir: Path, log=print) -> dict:
    import numpy as np
    from datasets import load_from_disk

    from contract.normalize import normalize_french
    from steps import fake_quant
    from steps.convert import INT4_ACCURACY_LEVEL
    from steps.inference import load_variant
    from steps.models import resolve_model

    test = load_from_disk(str(workdir / "prepare" / "test"))
    audios = [np.asarray(a, dtype=np.float32) for a in test.with_format("numpy", columns=["audio"])["audio"]]
    refs_n = [normalize_french(r) for r in test["text"]]
    model_dir = workdir / "train" / "model"
    work = workdir / "int4_recipe"
    levels = {"qat_int4": INT4_ACCURACY_LEVEL, "qat_int4_acc4": 4}
    qat = _export(model_dir, work / "qat", cfg.quant.group_size, levels, log)
    base = _export(Path(resolve_model(cfg.model.name_or_path)), work / "base", cfg.quant.group_size,
                   {"base_ptq_int4": INT4_ACCURACY_LEVEL}, log)
    n, lang, task = cfg.eval.max_new_tokens, cfg.model.language, cfg.model.task
    out = {}
    t = load_variant(str(model_dir), "pytorch", 2, "cpu", lang, task)
    out["qat_fp32"] = _wer(t, audios, refs_n, 8, n)
    fake_quant.prepare(t.model, cfg.quant)
    out["qat_fake_quant"] = _wer(t, audios, refs_n, 8, n)
    for name, d in {**qat, **base}.items():
        out[name] = _wer(load_variant(str(d), "onnx", 2, "cpu", lang, task), audios, refs_n, 1, n)
        log(f"{name}: {out[name]}")
    out["clips"] = len(audios)
    return out


def main(argv=None) -> int:
    from contract.config import load_config

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="the int4 run's config (quant.scheme int4)")
    p.add_argument("--workdir", type=Path, required=True, help="the run's workdir: prepare/ and train/ done")
    p.add_argument("--option", required=True, help="name of the recipe option this run trained")
    p.add_argument("--description", default="", help="what the option changes")
    a = p.parse_args(argv)
    cfg = load_config(a.config)
    if cfg.quant.scheme != "int4":
        raise SystemExit(f"{a.config}: quant.scheme is {cfg.quant.scheme}, this compares int4 recipes")
    t = time.time()
    figures = measure(cfg, a.workdir)
    train = json.loads((a.workdir / "train" / "result.json").read_text())
    entry = {"description": a.description, "config": cfg.model_dump(mode="json"),
             "train_metrics": {k: train.get("metrics", {}).get(k) for k in ("steps", "final_train_loss", "dev_wer")},
             "wer": figures, "seconds": round(time.time() - t, 1),
             "commands": [f"python -m steps prepare --config {a.config} --workdir {a.workdir}",
                          f"python -m steps train --config {a.config} --workdir {a.workdir}",
                          "python -m benchmarks.int4_recipe " + " ".join(argv if argv is not None else sys.argv[1:])]}
    data = json.loads(OUT.read_text()) if OUT.is_file() else {}
    data[a.option] = entry
    OUT.write_text(json.dumps(data, indent=2))
    w = figures
    print(f"{a.option}: fp32 {w['qat_fp32']['wer']} | fake-quant {w['qat_fake_quant']['wer']} | ONNX int4 "
          f"{w['qat_int4']['wer']} (acc4 {w['qat_int4_acc4']['wer']}) | PTQ int4 {w['base_ptq_int4']['wer']}; wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
