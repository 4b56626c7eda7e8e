"""int4 recipe comparison: WER of one int4 QAT run's weights served several ways, on the demo test set.

    python -m steps prepare --config CFG --workdir W && python -m steps train --config CFG --workdir W
    python -m benchmarks.int4_recipe --config CFG --workdir W --option NAME   # adds NAME to int4_recipe.json

CFG is configs/demo.yaml with quant.scheme int4 (and whatever the option changes). For the run's
trained weights (W/train/model) it measures, on W/prepare/test with evaluate's own scoring:
- qat_fp32: the weights in PyTorch, no quantization ("its fp32", what the gate compares with);
- qat_fake_quant: PyTorch with steps/fake_quant.py's quantizers (what training saw), and
  fake_quant_vocab: the same with the vocabulary matrix (proj_out + tied embedding) float, in 4-bit
  blocks, or 8-bit (the int8 scheme's layout: per-channel weights, activations per token);
- qat_int4: the ONNX int4 export through steps/convert.py, in the run's contract.quant_spec layout
  (what ships; options measured before the encoder's int8-kernel layout also have qat_int4_acc4, every
  MatMulNBits at accuracy_level 4);
- base_ptq_int4: the untrained base model exported and quantized the same way (the gate's PTQ side);
- size_mb: the shipped ONNX int4 directory and the trained PyTorch fp32 weights.
Writes benchmarks/int4_recipe.json (one entry per option, with the commands) and INT4_RECIPE.md.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from benchmarks.int4_profile import part_ms

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "benchmarks" / "int4_recipe.json"
# what "shipped" meant for the options measured before the layout was recorded with each option
OLD_LAYOUT = ("every MatMulNBits at accuracy_level 0 (float activations), the decoder's cross-attention keys and "
              "values included (before the decoder's int8 activation blocks).")


def _export(model_dir: Path, out: Path, spec, name: str, log) -> Path:
    """ONNX fp32 export of model_dir, quantized to int4 in the spec's layout (cached in out)."""
    from steps import convert
    from steps.fuse_attention import fuse_encoder_file

    dst = out / name
    if (dst / convert.ENCODER).is_file():
        return dst
    fp32 = out / "fp32"
    convert.export(model_dir, fp32)
    convert.quantize_dir(fp32, dst, spec)
    fuse_encoder_file(dst / convert.ENCODER, json.loads((fp32 / "config.json").read_text())["encoder_attention_heads"])
    log(f"{name} -> {dst}")
    return dst


def _wer(transcriber, audios, refs_n, batch: int, max_new_tokens: int) -> dict:
    from contract.normalize import normalize_french
    from steps.evaluate import score

    hyps = []
    for start in range(0, len(audios), batch):
        hyps += transcriber.transcribe(audios[start:start + batch], max_new_tokens, batch)
    s = score(refs_n, [normalize_french(h) for h in hyps])
    return {"wer": round(s.wer, 3), "cer": round(s.cer, 3), "wer_ci": s.bootstrap(1000)["wer"],
            "word_errors": s.word_errors.tolist(), "words": s.words.tolist()}


def gap_ci(a: dict, b: dict, samples: int = 1000, seed: int = 0) -> list[float] | None:
    """95 % interval of WER(a) - WER(b) in points, resampling the same utterances for both (paired)."""
    import numpy as np

    if "word_errors" not in a or "word_errors" not in b:
        return None
    ea, eb, words = (np.asarray(x, dtype=float) for x in (a["word_errors"], b["word_errors"], a["words"]))
    idx = np.random.default_rng(seed).integers(0, len(words), size=(samples, len(words)))
    gaps = 100.0 * (ea[idx].sum(axis=1) - eb[idx].sum(axis=1)) / np.maximum(words[idx].sum(axis=1), 1)
    return [round(float(np.percentile(gaps, 2.5)), 2), round(float(np.percentile(gaps, 97.5)), 2)]


def measure(cfg, workdir: Path, log=print) -> dict:
    from datasets import load_from_disk

    from contract.normalize import normalize_french
    from contract.quant_spec import quant_spec
    from steps import convert, fake_quant
    from steps.audio_store import to_float
    from steps.inference import load_variant
    from steps.models import resolve_model

    test = load_from_disk(str(workdir / "prepare" / "test"))
    audios = [to_float(a) for a in test.with_format("numpy", columns=["audio"])["audio"]]
    refs_n = [normalize_french(r) for r in test["text"]]
    model_dir = workdir / "train" / "model"
    work = workdir / "int4_recipe"
    spec = quant_spec(cfg.quant)
    exports = {"qat_int4": _export(model_dir, work / "qat", spec, "qat_int4", log),
               "base_ptq_int4": _export(Path(resolve_model(cfg.model.name_or_path)), work / "base", spec, "base_ptq_int4", log)}
    n, lang, task = cfg.eval.max_new_tokens, cfg.model.language, cfg.model.task
    out = {}
    t = load_variant(str(model_dir), "pytorch", 2, "cpu", lang, task)
    out["qat_fp32"] = _wer(t, audios, refs_n, 8, n)
    fake_quant.prepare(t.model, spec)
    out["qat_fake_quant"] = _wer(t, audios, refs_n, 8, n)
    # where the int4 loss sits: the same weights with the blocks int4 and the vocabulary matrix
    # (proj_out + tied embedding) float, 4-bit blocks or 8-bit int8 layout (the option's own is qat_fake_quant)
    vocab = [m for m in (t.model.proj_out, t.model.model.decoder.embed_tokens)
             if isinstance(m, (fake_quant.FakeQuantLinear, fake_quant.FakeQuantEmbedding))]
    out["fake_quant_vocab"] = {str(spec.vocab_bits): out["qat_fake_quant"]}
    for setting in ("float", "4", "8"):
        if setting not in out["fake_quant_vocab"]:
            for m in vocab:
                m.enabled = setting != "float"
                if m.enabled:
                    m.scheme, m.bits = ("int8", 8) if setting == "8" else ("int4", 4)
            out["fake_quant_vocab"][setting] = _wer(t, audios, refs_n, 8, n)
            log(f"fake-quant, vocabulary {setting}: {out['fake_quant_vocab'][setting]}")
    for name, d in exports.items():
        out[name] = _wer(load_variant(str(d), "onnx", 2, "cpu", lang, task), audios, refs_n, 1, n)
        log(f"{name}: {out[name]}")
    out["clips"] = len(audios)
    out["size_mb"] = {"pytorch_fp32": convert.pytorch_size_mb(model_dir), "qat_int4": convert.onnx_size_mb(exports["qat_int4"])}
    return out


def _wer_cell(w: dict | None) -> str:
    return f"{w['wer']:.2f}" if w else "-"


def _size(mb: dict | None) -> str:
    return f"{mb['qat_int4']:.1f} ({mb['qat_int4'] / mb['pytorch_fp32']:.3f})" if mb else "not measured"


def _top_ops(part: dict, n: int = 3) -> str:
    return ", ".join(f"{op} {v['ms']:.2f} ms ({100 * v['share']:.0f} %)" for op, v in list(part["by_op"].items())[:n])


def _ms(part: dict, digits: int) -> str:
    """A part's time per run (int4_profile.part_ms), marked when only the profiled time exists."""
    return f"{part_ms(part):.{digits}f}" + ("" if "plain_ms" in part else " profiled")


def profile_section(profiles: dict[str, dict]) -> list[str]:
    """Where the time goes (benchmarks/int4_profile*.json, written by benchmarks/int4_profile.py)."""
    lines = ["", "## Where the time goes (ONNX Runtime profiler, whisper-base)", ""]
    for label, prof in profiles.items():
        lines += [f"{label}: `{prof['command']}`, {prof['threads']} threads, {prof['decoder_past_tokens']} tokens in the "
                  f"KV cache, load average {prof['load_avg_1m']}; the floor reads the decoder's weights and KV cache once at the "
                  f"{prof['read_bandwidth_gbs']} GB/s numpy measured. Times are without the profiler (the op times are its), "
                  "except those marked profiled: profiles written before that was measured.", "",
                  "| variant | encoder ms | top encoder ops | first decoder call ms | top ops there | decoder step ms | "
                  "top decoder ops | floor ms (step / floor) |",
                  "|---|---:|---|---:|---|---:|---|---:|"]
        for name, v in prof["variants"].items():
            first = v.get("decoder_first_step")  # profiles written before it was measured have none
            first_cells = f"{_ms(first, 1)} | {_top_ops(first)}" if first else "not measured | "
            lines.append(f"| {name} | {_ms(v['encoder'], 1)} | {_top_ops(v['encoder'])} | {first_cells} | "
                         f"{_ms(v['decoder_step'], 2)} | {_top_ops(v['decoder_step'])} | "
                         f"{v['decoder_floor_ms']:.2f} ({v['decoder_step_vs_floor']:.1f}x) |")
        kernels = prof.get("kernels_ms", {})
        if kernels:
            labels = [label for label in next(iter(kernels.values())) if label != "shipped"]
            lines += ["", "One MatMul as each layout writes it (median ms, interleaved; acc0/acc4: 4-bit blocks at "
                      "accuracy_level 0 / 4; the last column is the layout the int4 scheme writes there):", "",
                      "| shape | " + " | ".join(labels) + " | int4 ships |", "|---|" + "---:|" * len(labels) + "---|"]
            lines += [f"| {shape} | " + " | ".join(f"{k[label]:.3f}" for label in labels) + f" | {k.get('shipped', '')} |"
                      for shape, k in kernels.items()]
        lines.append("")
    return lines


def render(data: dict, profiles: dict[str, dict] | None = None) -> str:
    """INT4_RECIPE.md: one row per option, the targets computed from the same figures; then the profiles."""
    lines = ["# int4 recipe (generated by benchmarks/int4_recipe.py from int4_recipe.json)", "",
             "WER % on the demo test set (espeak French, greedy, normalized text; 95 % bootstrap CI of the "
             "shipped ONNX int4 in brackets). Targets: ONNX int4 <= its own fp32 + 1.0 point, and <= PTQ int4.", "",
             "| option | train steps | qat_fp32 | fake-quant (PyTorch) | ONNX int4 (shipped) | "
             "ONNX int4, all MatMulNBits at acc. level 4 (earlier layouts) | PTQ int4 | int4 - fp32 [paired 95 % CI] | targets | int4 MB (x fp32) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for name, e in data.items():
        w = e["wer"]
        gap = round(w["qat_int4"]["wer"] - w["qat_fp32"]["wer"], 3)
        met = gap <= 1.0 and w["qat_int4"]["wer"] <= w["base_ptq_int4"]["wer"]
        ci, gci = w["qat_int4"]["wer_ci"], gap_ci(w["qat_int4"], w["qat_fp32"])
        lines.append(f"| {name} | {e['train_metrics'].get('optimizer_steps')} | {w['qat_fp32']['wer']:.2f} | "
                     f"{w['qat_fake_quant']['wer']:.2f} | {w['qat_int4']['wer']:.2f} [{ci[0]:.1f}, {ci[1]:.1f}] | "
                     f"{_wer_cell(w.get('qat_int4_acc4'))} | {w['base_ptq_int4']['wer']:.2f} | {gap:+.2f}"
                     + (f" [{gci[0]:+.1f}, {gci[1]:+.1f}]" if gci else "") + " | "
                     f"{'met' if met else '**missed**'} | {_size(w.get('size_mb'))} |")
    gaps = {n: e["wer"]["qat_int4"]["wer"] - e["wer"]["qat_fp32"]["wer"] for n, e in data.items()}
    best = min(gaps, key=gaps.get)
    lines += ["", "Where the int4 loss sits: each option's trained weights in PyTorch, blocks fake-quantized to int4, "
              "the vocabulary matrix (proj_out and the tied token embedding) float, 4-bit or 8-bit (WER %):", "",
              "| option | vocabulary float | 4-bit | 8-bit | fp32 (nothing quantized) |", "|---|---:|---:|---:|---:|"]
    for name, e in data.items():
        v = e["wer"].get("fake_quant_vocab")
        if v:
            lines.append(f"| {name} | {v['float']['wer']:.2f} | {v['4']['wer']:.2f} | {v['8']['wer']:.2f} | "
                         f"{e['wer']['qat_fp32']['wer']:.2f} |")
    lines += ["", f"Smallest int4 - fp32 gap: `{best}` ({gaps[best]:+.2f} points); "
              + ("it meets the +1.0 point target." if gaps[best] <= 1.0 else "no option meets the +1.0 point target."),
              "Where the fake-quant and ONNX columns are equal, the export computes what training saw.", "",
              "Options:", ""]
    lines += [f"- `{name}` ({e['wer']['clips']} clips): {e['description']} Shipped layout: "
              f"{e.get('layout', OLD_LAYOUT)} Commands: "
              + "; ".join(f"`{c}`" for c in e["commands"]) for name, e in data.items()]
    lines += profile_section(profiles or {})
    return "\n".join(lines) + "\n"


def profiles() -> dict[str, dict]:
    """The committed profiles: the shipped layouts, and the exports of earlier layouts (the commit that wrote them)."""
    files = {"Now": OUT.with_name("int4_profile.json"),
             "Before (exports written by commit feebfbd: the decoder's MatMulNBits with float activations, its "
             "cross-attention keys and values 4-bit)": OUT.with_name("int4_profile_feebfbd.json"),
             "Before (exports written by commit c7eb2c9: vocabulary as MatMulNBits bits=8)": OUT.with_name(
                 "int4_profile_c7eb2c9.json")}
    return {label: json.loads(f.read_text()) for label, f in files.items() if f.is_file()}


def main(argv=None) -> int:
    from contract.config import load_config
    from contract.quant_spec import quant_spec

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="the int4 run's config (quant.scheme int4)")
    p.add_argument("--workdir", type=Path, help="the run's workdir: prepare/ and train/ done")
    p.add_argument("--render-only", action="store_true", help="re-render INT4_RECIPE.md from the committed JSON")
    p.add_argument("--option", help="name of the recipe option this run trained")
    p.add_argument("--description", default="", help="what the option changes")
    a = p.parse_args(argv)
    if a.render_only:
        OUT.with_name("INT4_RECIPE.md").write_text(render(json.loads(OUT.read_text()), profiles()))
        return 0
    if not (a.config and a.workdir and a.option):
        p.error("--config, --workdir and --option are required (or --render-only)")
    cfg = load_config(a.config)
    if cfg.quant.scheme != "int4":
        raise SystemExit(f"{a.config}: quant.scheme is {cfg.quant.scheme}, this compares int4 recipes")
    t = time.time()
    figures = measure(cfg, a.workdir)
    train = json.loads((a.workdir / "train" / "result.json").read_text())
    entry = {"description": a.description, "layout": quant_spec(cfg.quant).describe() + ".",
             "config": cfg.model_dump(mode="json"),
             "train_metrics": {k: train.get("metrics", {}).get(k) for k in ("optimizer_steps", "train_loss", "dev_wer")},
             "wer": figures, "seconds": round(time.time() - t, 1),
             "commands": [f"python -m steps prepare --config {a.config} --workdir {a.workdir}",
                          f"python -m steps train --config {a.config} --workdir {a.workdir}",
                          "python -m benchmarks.int4_recipe " + " ".join(argv if argv is not None else sys.argv[1:])]}
    data = json.loads(OUT.read_text()) if OUT.is_file() else {}
    data[a.option] = entry
    OUT.write_text(json.dumps(data, indent=2))
    OUT.with_name("INT4_RECIPE.md").write_text(render(data, profiles()))
    w = figures
    print(f"{a.option}: fp32 {w['qat_fp32']['wer']} | fake-quant {w['qat_fake_quant']['wer']} | ONNX int4 "
          f"{w['qat_int4']['wer']} | PTQ int4 {w['base_ptq_int4']['wer']}; wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
