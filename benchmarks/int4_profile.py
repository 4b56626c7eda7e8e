"""Where the time of one encoder pass and one decoder step goes, op by op (ONNX Runtime's profiler).

    .venv/bin/python -m benchmarks.int4_profile                      # whisper-base: int8, int4 as shipped
    .venv/bin/python -m benchmarks.int4_profile --variant x=DIR ...  # any ONNX export directories

By default the untrained whisper-base fixture is exported and quantized as the convert step does
(speed does not depend on the trained values), into --work. Each variant's encoder and merged
decoder run in sessions with `SessionOptions.enable_profiling`, with the options the product serves
with (steps/inference.py: intra-op threads, no spinning): one 30 s window through the encoder, then
the first decoder call of a clip (the prompt, no past: it computes the cross-attention keys and values
of all 1500 frames) and decoder steps with a KV cache of --past tokens. Warm-up runs are dropped from the profile; node times
are summed per operator type (If excluded: its time is its subgraph's nodes'). The profiler times every node, and
on a decoder step of some 700 small nodes that costs about as much as the step's own work, so each part is also
timed in sessions without it (plain_ms, median, the variants interleaved): those are the times compared, the
profile gives only the split. The memory-bandwidth
floor of a decoder step is what it must read once per token, the decoder's weights and its KV cache
(the cross-attention keys and values of 1500 encoder frames included), over the read bandwidth numpy
measures on this machine. Also one MatMul of each kind, as each layout writes it (kernels_ms), and the
encoder's attention as a compute rate against an fp32 MatMul of the encoder's shapes (encoder_attention).
Writes benchmarks/int4_profile.json.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "benchmarks"
ENCODER, MERGED = "encoder_model.onnx", "decoder_model_merged.onnx"
FIRST_STEPS = 6  # first decoder calls profiled (each computes the cross-attention keys and values)
ENCODER_RUNS = 5  # encoder passes timed without the profiler


def session(path: Path, threads: int, profile_prefix: str | None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as steps/inference.py serves
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def summarize(profile_file: str, warmup: int, runs_wanted: int) -> dict:
    """Node times of runs warmup..runs_wanted-1, per op type, in ms per run."""
    events = json.loads(Path(profile_file).read_text())
    runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
    kept = runs[warmup:runs_wanted]
    windows = [(e["ts"], e["ts"] + e["dur"]) for e in kept]
    ops: dict = collections.defaultdict(lambda: [0.0, 0])
    nodes: dict = collections.defaultdict(float)
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        op = e.get("args", {}).get("op_name", "?")
        if op == "If" or not any(a <= e["ts"] <= b for a, b in windows):
            continue
        ops[op][0] += e["dur"]
        ops[op][1] += 1
        nodes[(op, e["name"][:-len("_kernel_time")])] += e["dur"]
    n = len(kept)
    run_ms = sum(e["dur"] for e in kept) / n / 1000
    node_ms = sum(v[0] for v in ops.values()) / n / 1000
    by_op = {op: {"ms": round(us / n / 1000, 3), "share": round(us / n / 1000 / node_ms, 3), "nodes": c // n}
             for op, (us, c) in sorted(ops.items(), key=lambda kv: -kv[1][0])}
    top = [{"op": op, "node": name, "ms": round(us / n / 1000, 3)}
           for (op, name), us in sorted(nodes.items(), key=lambda kv: -kv[1])[:8]]
    return {"runs": n, "run_ms": round(run_ms, 3), "node_ms": round(node_ms, 3), "by_op": by_op, "top_nodes": top}


def _feeds_decoder(sess, enc_states: np.ndarray, past: int, rng) -> dict:
    feeds = {}
    for i in sess.get_inputs():
        if i.name == "input_ids":
            feeds[i.name] = np.array([[50258]], dtype=np.int64)
        elif i.name == "encoder_hidden_states":
            feeds[i.name] = enc_states
        elif i.name == "use_cache_branch":
            feeds[i.name] = np.array([True])
        elif i.name.startswith("past_key_values"):
            _, heads, _, dim = i.shape
            length = enc_states.shape[1] if ".encoder." in i.name else past
            feeds[i.name] = rng.standard_normal((1, heads, length, dim)).astype(np.float32)
        else:
            raise SystemExit(f"decoder input {i.name} not understood by this profiler")
    return feeds


def _feeds_first_step(sess, enc_states: np.ndarray, prompt: int) -> dict:
    """The first decoder call of a clip (use_cache_branch False): the prompt's tokens, no past; the
    cross-attention keys and values of every encoder frame are computed here, once per clip."""
    feeds = _feeds_decoder(sess, enc_states, 1, np.random.default_rng(0))
    feeds["input_ids"] = np.array([[50258, 50265, 50360, 50364][:prompt]], dtype=np.int64)
    if "use_cache_branch" in feeds:
        feeds["use_cache_branch"] = np.array([False])
    return feeds


def _interleaved(sessions: dict, feeds: dict, rounds: int) -> dict[str, list[float]]:
    """Run every session once per round, in turn (load on the shared machine falls on all variants
    alike); the seconds of each run, per session."""
    times: dict = collections.defaultdict(list)
    for _ in range(rounds):
        for name, sess in sessions.items():
            t = time.perf_counter()
            sess.run(None, feeds[name])
            times[name].append(time.perf_counter() - t)
    return times


def median_ms(sessions: dict, feeds: dict, runs: int, warmup: int) -> dict[str, float]:
    """Median ms of `runs` interleaved runs per session, after `warmup` rounds."""
    times = _interleaved(sessions, feeds, warmup + runs)
    return {name: round(1000 * float(np.median(v[warmup:])), 3) for name, v in times.items()}


def part_ms(part: dict | None) -> float | None:
    """One run of a profiled part (encoder pass, decoder step, first decoder call): without the
    profiler where measured (plain_ms), else as profiled (run_ms, profiles written before plain_ms);
    None for a part the profile lacks."""
    return None if part is None else part.get("plain_ms", part["run_ms"])


def profile_variants(dirs: dict[str, Path], threads: int, steps: int, past: int, warmup: int) -> dict:
    """{variant: {"encoder", "decoder_step", "decoder_kv_cache_mb"}}, the variants' runs interleaved."""
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((1, 80, 3000)).astype(np.float32)
    out: dict = {name: {} for name in dirs}
    with tempfile.TemporaryDirectory() as tmp:
        enc = {name: session(d / ENCODER, threads, f"{tmp}/{name}_enc") for name, d in dirs.items()}
        enc_feeds = {name: {sess.get_inputs()[0].name: feats} for name, sess in enc.items()}
        _interleaved(enc, enc_feeds, warmup + 2)
        states = {name: sess.run(None, enc_feeds[name])[0] for name, sess in enc.items()}  # not counted
        for name, sess in enc.items():
            out[name]["encoder"] = summarize(sess.end_profiling(), warmup, warmup + 2)
        dec = {name: session(d / MERGED, threads, f"{tmp}/{name}_dec") for name, d in dirs.items()}
        dec_feeds = {name: _feeds_decoder(sess, states[name], past, np.random.default_rng(0)) for name, sess in dec.items()}
        _interleaved(dec, dec_feeds, warmup + steps)
        for name, sess in dec.items():
            out[name]["decoder_step"] = summarize(sess.end_profiling(), warmup, warmup + steps)
            out[name]["decoder_kv_cache_mb"] = round(
                sum(v.nbytes for k, v in dec_feeds[name].items() if k.startswith("past_")) / 1e6, 2)
        first = {name: session(d / MERGED, threads, f"{tmp}/{name}_first") for name, d in dirs.items()}
        first_feeds = {name: _feeds_first_step(sess, states[name], 4) for name, sess in first.items()}
        _interleaved(first, first_feeds, warmup + FIRST_STEPS)
        for name, sess in first.items():
            out[name]["decoder_first_step"] = summarize(sess.end_profiling(), warmup, warmup + FIRST_STEPS)
        plain_enc = {name: session(d / ENCODER, threads, None) for name, d in dirs.items()}
        plain_dec = {name: session(d / MERGED, threads, None) for name, d in dirs.items()}
        for part, plain, feeds, runs in (("encoder", plain_enc, enc_feeds, ENCODER_RUNS),
                                         ("decoder_step", plain_dec, dec_feeds, steps),
                                         ("decoder_first_step", plain_dec, first_feeds, FIRST_STEPS)):
            for name, ms in median_ms(plain, feeds, runs, warmup).items():
                out[name][part]["plain_ms"] = ms
    return out


def weight_bytes(path: Path) -> int:
    """Bytes of a graph's initializers (external data included), each counted once."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors

    model = onnx.load(str(path), load_external_data=False)
    total = 0
    for t in _get_all_tensors(model):
        ext = {e.key: e.value for e in t.external_data}
        total += int(ext["length"]) if "length" in ext else len(t.raw_data) or 4 * len(t.float_data)
    return total


def read_bandwidth_gbs(mb: int = 512, repeats: int = 15) -> float:
    """Best of `repeats` sums over an array far larger than the caches: bytes read per second."""
    a = np.ones(mb * 2**20 // 4, dtype=np.float32)
    best = min(_timed_sum(a) for _ in range(repeats))
    return round(a.nbytes / best / 1e9, 2)


def _timed_sum(a: np.ndarray) -> float:
    t = time.perf_counter()
    a.sum()
    return time.perf_counter() - t


def default_variants(work: Path) -> dict[str, Path]:
    """whisper-base exported and quantized as the convert step does (configs/demo.yaml's quant section);
    the layouts int4 could use for each kind of MatMul are timed one by one in kernels()."""
    from contract.config import load_config
    from contract.quant_spec import QuantSpec
    from steps import convert
    from steps.models import resolve_model

    q = load_config("demo").quant
    specs = {"onnx_int8": QuantSpec.of("int8"), "onnx_int4": QuantSpec.of("int4", q.group_size, q.vocab_bits, q.encoder_layout)}
    dirs = {name: work / name for name in specs}
    fp32 = work / "fp32"
    for name, spec in specs.items():
        if (dirs[name] / MERGED).is_file():
            continue
        if not (fp32 / convert.DECODER).is_file():
            convert.export(Path(resolve_model(load_config("demo").model.name_or_path)), fp32)
        convert.quantize_dir(fp32, dirs[name], spec)
        convert.fuse_encoder_file(dirs[name] / ENCODER, json.loads((fp32 / "config.json").read_text())["encoder_attention_heads"])
    return dirs


def _matmul(path: Path, k: int, n: int, out: str) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = (np.random.default_rng(0).standard_normal((k, n)) * 0.05).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["X", "W"], [out], name="mm")], "mm",
                              [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["m", k])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["m", n])],
                              [numpy_helper.from_array(w, "W")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))


KERNEL_SHAPES = {  # name: (rows, inputs, outputs, output name)
    "encoder_fc1_1500x512x2048": (1500, 512, 2048, "Y"),
    "decoder_cross_kv_1500x512x512": (1500, 512, 512, "Y"),
    "decoder_fc1_1x512x2048": (1, 512, 2048, "Y"),
    "vocabulary_1x512x51865": (1, 512, 51865, "logits"),
}


def shipped_layouts(spec) -> dict[str, str]:
    """The layout the int4 scheme writes for each of KERNEL_SHAPES, read from the spec."""
    int8 = lambda layout: "int8" if layout == "int8_dynamic" else f"int4_acc{spec.decoder_accuracy_level}"  # noqa: E731
    encoder = spec.encoder_layout if spec.encoder_layout != "nbits" else f"int4_acc{spec.encoder_accuracy_level}"
    return {"encoder_fc1_1500x512x2048": encoder,
            "decoder_cross_kv_1500x512x512": int8(spec.cross_kv_layout),
            "decoder_fc1_1x512x2048": f"int4_acc{spec.decoder_accuracy_level}",
            "vocabulary_1x512x51865": int8(spec.vocab_layout)}


def kernels(threads: int) -> dict:
    """One MatMul of whisper-base's shapes, in each layout, timed interleaved (median ms): fp32, the int8
    scheme's, 4-bit blocks at accuracy_level 0 (float activations) and 4 (int8 activation blocks), and the
    int4 encoder's 4-bit codes run by the int8 kernel (int4_int8_kernel). "shipped" names the layout the
    int4 scheme writes for that MatMul (contract/quant_spec.py)."""
    import onnx

    from contract.quant_spec import QuantSpec
    from steps import convert, int4_export

    spec = QuantSpec.of("int4")
    shipped = shipped_layouts(spec)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for shape, (m, k, n, name) in KERNEL_SHAPES.items():
            src = Path(tmp) / f"{shape}.onnx"
            _matmul(src, k, n, name)
            files = {"fp32": src, "int8": Path(tmp) / f"{shape}_int8.onnx"}
            convert.quantize_int8(src, files["int8"])
            for level in (0, 4):
                files[f"int4_acc{level}"] = Path(tmp) / f"{shape}_int4_acc{level}.onnx"
                onnx.save(int4_export._nbits(onnx.load(str(src)), spec, spec.bits, level), str(files[f"int4_acc{level}"]))
            if k % spec.group_size == 0:  # the encoder's layout (4-bit codes folded into int8 at load)
                files["int4_int8_kernel"] = Path(tmp) / f"{shape}_int4_int8_kernel.onnx"
                int4_export.quantize_int4(src, files["int4_int8_kernel"], spec, "encoder")
            sessions = {label: session(f, threads, None) for label, f in files.items()}
            x = np.random.default_rng(1).standard_normal((m, k)).astype(np.float32)
            runs = 8 if m > 1 else 40  # the short call needs more runs to see through the noise
            out[shape] = median_ms(sessions, {label: {"X": x} for label in sessions}, runs, warmup=1)
            out[shape]["shipped"] = shipped[shape]
    return out


FP32_RATE_KERNEL = "encoder_fc1_1500x512x2048"  # the fp32 MatMul whose rate the attention is held against


def attention_rate(model_dir: Path, encoder: dict, kernel_ms: dict) -> dict:
    """The encoder's fused attention (MultiHeadAttention over all frames, fp32 in every scheme) as a
    compute rate: 4 x frames^2 x d_model floating-point operations per layer (Q.K^T and P.V, a
    multiply and an add each), over its profiled time; beside it the rate of one fp32 MatMul of the
    encoder's own shapes on the same cores (kernels_ms), the practical fp32 ceiling."""
    config = json.loads((model_dir / "config.json").read_text())
    frames, d, layers = config["max_source_positions"], config["d_model"], config["encoder_layers"]
    gflop = 4 * frames ** 2 * d * layers / 1e9
    ms = (encoder["by_op"].get("MultiHeadAttention") or {}).get("ms")
    out = {"gflop": round(gflop, 2), "ms": ms, "gflops": round(gflop / ms * 1e3, 1) if ms else None}
    fp32 = (kernel_ms.get(FP32_RATE_KERNEL) or {}).get("fp32")
    if fp32:
        m, k, n, _ = KERNEL_SHAPES[FP32_RATE_KERNEL]
        out["fp32_matmul_gflops"] = round(2 * m * k * n / fp32 / 1e6, 1)
        out["floor_ms_at_fp32_matmul_rate"] = round(gflop / out["fp32_matmul_gflops"] * 1e3, 1)
        if out["gflops"]:
            out["vs_fp32_matmul_rate"] = round(out["gflops"] / out["fp32_matmul_gflops"], 2)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=BENCH / "work" / "profile")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=DIR")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=40, help="decoder steps profiled")
    p.add_argument("--past", type=int, default=32, help="tokens already in the decoder's KV cache")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", type=Path, default=BENCH / "int4_profile.json")
    p.add_argument("--no-kernels", action="store_true", help="skip the per-MatMul timings")
    a = p.parse_args(argv)
    variants = dict(v.split("=", 1) for v in a.variant) if a.variant else default_variants(a.work)
    bw = read_bandwidth_gbs()
    results = {}
    profiled = profile_variants({name: Path(d) for name, d in variants.items()}, a.threads, a.steps, a.past, a.warmup)
    for name, d in variants.items():
        r = profiled[name]
        r["decoder_weights_mb"] = round(weight_bytes(Path(d) / MERGED) / 1e6, 2)
        r["decoder_floor_ms"] = round((r["decoder_weights_mb"] + r["decoder_kv_cache_mb"]) / (bw * 1e3) * 1000, 3)
        r["decoder_step_vs_floor"] = round(part_ms(r["decoder_step"]) / r["decoder_floor_ms"], 2)
        results[name] = r
        print(f"{name}: encoder {part_ms(r['encoder']):.1f} ms, first decoder step {part_ms(r['decoder_first_step']):.1f} ms "
              f"(top ops { {k: v['ms'] for k, v in list(r['decoder_first_step']['by_op'].items())[:3]} }), "
              f"decoder step {part_ms(r['decoder_step']):.2f} ms (profiled {r['decoder_step']['run_ms']:.2f}) "
              f"(floor {r['decoder_floor_ms']:.2f} ms); top ops: "
              f"{ {k: v['ms'] for k, v in list(r['decoder_step']['by_op'].items())[:4]} }", flush=True)
    kernel_ms = {} if a.no_kernels else kernels(a.threads)
    for name, d in variants.items():
        results[name]["encoder_attention"] = attention_rate(Path(d), results[name]["encoder"], kernel_ms)
    doc = {"kernels_ms": kernel_ms,
           "command": " ".join(["python -m benchmarks.int4_profile", *(argv if argv is not None else os.sys.argv[1:])])
                      .replace(str(REPO) + "/", ""),
           "threads": a.threads, "decoder_past_tokens": a.past, "decoder_steps": a.steps, "read_bandwidth_gbs": bw,
           "load_avg_1m": round(os.getloadavg()[0], 2), "variants": results}
    a.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
