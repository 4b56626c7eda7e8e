"""steps/bench.py, benchmarks/run_bench.py (targets, report) and benchmarks/gpu_probe.py on tiny shapes."""
from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from steps import bench, convert
from steps.common import execute_step
from conftest import tiny_config

REPO = Path(__file__).resolve().parent.parent


def _load_script(name: str):
    return importlib.import_module(f"benchmarks.{name}")


@pytest.fixture(scope="module")
def bench_workdir(tmp_path_factory, tiny_model_dir, french_manifest):
    """prepare/ (2 real test clips), train/model (the tiny model) and convert/ (real int8 conversion)."""
    import soundfile as sf
    from datasets import Dataset

    workdir = tmp_path_factory.mktemp("bench")
    rows = [r for r in french_manifest if r["split"] == "test"][:2]
    audio = [sf.read(REPO / r["audio"], dtype="float32")[0] for r in rows]
    Dataset.from_dict({"id": [r["id"] for r in rows], "audio": audio}).save_to_disk(str(workdir / "prepare" / "test"))
    shutil.copytree(tiny_model_dir, workdir / "train" / "model")
    for step in ("prepare", "train"):
        (workdir / step / "result.json").write_text(json.dumps({"status": "ok", "metrics": {}}))
    assert execute_step("convert", tiny_config(), workdir, convert.run) == 0
    return workdir


@pytest.mark.slow  # a fresh process per variant for peak RSS: minutes on a shared 2-core CPU
def test_bench_step_measures_every_variant(bench_workdir):
    cfg = tiny_config(**{"bench.warmup": 1})
    assert execute_step("bench", cfg, bench_workdir, bench.run) == 0
    results = json.loads((bench_workdir / "bench" / "results.json").read_text())
    assert results["clips"] == 2 and results["decoding"]["forced_tokens"] == cfg.bench.forced_tokens
    v = results["devices"]["cpu"]
    assert set(v) == {"qat_fp32", "qat_onnx_fp32", "qat_int8", "base_onnx_fp32", "base_ptq_int8"}
    for name, r in v.items():
        assert 0 < r["encoder_ms"] < 60_000 and 0 < r["decoder_ms_per_token"] < 10_000, name
        assert 0 < r["latency_s"] and r["rtf"] > 0 and r["clips_per_s"] > 0 and r["audio_s_per_s"] > 0, name
        assert 1 <= r["mean_new_tokens"] <= cfg.bench.max_new_tokens, name
        assert r["peak_rss_mb"] is not None and 50 < r["peak_rss_mb"] < 8000, name
        assert r["size_mb"] > 0
        assert r["device"] == "cpu" and r["provider"] in ("CPUExecutionProvider", "torch-cpu-fp32"), name
    assert v["qat_int8"]["size_mb"] < v["qat_fp32"]["size_mb"]
    metrics = json.loads((bench_workdir / "bench" / "result.json").read_text())["metrics"]
    assert metrics["devices"]["cpu"]["latency_s"]["qat_int8"] == v["qat_int8"]["latency_s"]


def test_forced_decoding_runs_exactly_n_steps(bench_workdir, french_manifest):
    """Per-token timing is only comparable if every variant decodes the same number of tokens."""
    clip = bench.load_clips(bench_workdir / "prepare", 1)[0][1]
    dec = bench.Decoding(max_new_tokens=6, forced_tokens=5, threads=1)
    variants = [bench.Variant("pt", "pytorch", str(bench_workdir / "train" / "model")),
                bench.Variant("int8", "onnx", str(bench_workdir / "convert" / "qat_int8")),
                bench.Variant("fw", "ctranslate2", str(bench.ct2_base_dir()))]
    for v in variants:
        r = bench.load_runner(v, dec)
        feats = r.features(clip)
        assert r.decode_forced(r.encode(feats), 5) == 5, v.name
        assert 1 <= r.generate(feats, 6) <= 6, v.name  # CTranslate2's max_length halving is compensated


@pytest.mark.slow
def test_peak_rss_is_measured_in_a_fresh_process(bench_workdir):
    clip = np.zeros(16000, dtype=np.float32)
    v = bench.Variant("int8", "onnx", str(bench_workdir / "convert" / "qat_int8"))
    mb = bench.peak_memory_mb(v, bench.Decoding(max_new_tokens=3, forced_tokens=2, threads=1), clip)
    assert mb == {"peak_rss_mb": mb["peak_rss_mb"]} and 50 < mb["peak_rss_mb"] < 4000  # no VRAM figure on a CPU


# --- one section per device, never a ratio across devices ---------------------------------------

def _fake_benchmark(calls):
    def benchmark(variants, clips, dec, **_):
        calls.append([(v.name, v.device) for v in variants])
        return {v.name: {"latency_s": 1.0, "device": v.device, "provider": v.provider, "size_mb": 1.0} for v in variants}
    return benchmark


def test_bench_step_without_cuda_measures_the_cpu_only_and_says_why(bench_workdir, monkeypatch):
    from steps import serving
    from steps.common import StepContext

    calls = []
    monkeypatch.setattr(bench, "benchmark", _fake_benchmark(calls))
    monkeypatch.setattr(serving, "cuda_usable", lambda: "no CUDA device (test)")
    ctx = StepContext("bench", tiny_config(), bench_workdir)
    ctx.out.mkdir(exist_ok=True)
    m = bench.run(ctx)
    assert m["skipped"] == {"cuda": "no CUDA device (test)"} and set(m["devices"]) == {"cpu"}
    assert len(calls) == 1 and all(device == "cpu" for _, device in calls[0])
    assert set(m["devices"]["cpu"]["provider"].values()) <= {"CPUExecutionProvider", "torch-cpu-fp32"}


def test_bench_step_with_cuda_keeps_each_device_in_its_own_section(bench_workdir, monkeypatch):
    from steps import serving
    from steps.common import StepContext

    calls = []
    monkeypatch.setattr(bench, "benchmark", _fake_benchmark(calls))
    monkeypatch.setattr(serving, "cuda_usable", lambda: None)
    monkeypatch.setattr(serving, "ort_provider", lambda device: "CUDAExecutionProvider")
    monkeypatch.setattr(serving, "node_placement", lambda path, provider: {provider: 10, "CPUExecutionProvider": 2})
    ctx = StepContext("bench", tiny_config(), bench_workdir)
    ctx.out.mkdir(exist_ok=True)
    m = bench.run(ctx)
    assert [{d for _, d in c} for c in calls] == [{"cpu"}, {"cuda"}]  # one device per benchmark() call
    cuda = dict(calls[1])
    assert cuda["qat_fp16"] == "cuda" and {"qat_int8", "qat_onnx_fp32"} <= set(cuda)
    assert m["devices"]["cuda"]["provider"]["qat_fp16"] == "torch-cuda-fp16"
    assert m["devices"]["cuda"]["provider"]["qat_int8"] == "CUDAExecutionProvider"
    assert m["placement"]["qat_int8"]["decoder_model_merged.onnx"]["CPUExecutionProvider"] == 2


def _two_device_metrics():
    return {"evaluate": {"wer": {"qat_fp32": 21.0, "qat_int4": 21.8}},
            "bench": {"devices": {
                "cpu": {"latency_s": {"qat_fp32": 2.0, "qat_int4": 0.5},
                        "device": {"qat_fp32": "cpu", "qat_int4": "cpu"},
                        "provider": {"qat_fp32": "torch-cpu-fp32", "qat_int4": "CPUExecutionProvider"},
                        "peak_rss_mb": {"qat_fp32": 900.0, "qat_int4": 300.0}},
                "cuda": {"latency_s": {"qat_fp16": 0.1, "qat_int4": 0.05, "qat_int4_torchao": 0.08},
                         "device": {"qat_fp16": "cuda", "qat_int4": "cuda", "qat_int4_torchao": "cuda"},
                         "provider": {"qat_fp16": "torch-cuda-fp16", "qat_int4": "CUDAExecutionProvider",
                                      "qat_int4_torchao": "torch-cuda-int4_weight_only"},
                         "peak_vram_mb": {"qat_fp16": 1600.0, "qat_int4": 500.0, "qat_int4_torchao": 450.0}}}}}


def test_serving_tables_never_divide_one_device_by_another():
    from tasks.scorecard import results_table, serving_markdown, serving_rows

    metrics = _two_device_metrics()
    rows = serving_rows("int4", metrics)
    assert {d: [r["variant"] for r in rs] for d, rs in rows.items()} == {
        "cpu": ["qat_fp32", "qat_int4"], "cuda": ["qat_fp16", "qat_int4", "qat_int4_torchao"]}
    for device, rs in rows.items():
        assert all(r["device"] == device for r in rs)
    speed = {(d, r["variant"]): r["speed"] for d, rs in rows.items() for r in rs}
    assert speed == {("cpu", "qat_fp32"): 1.0, ("cpu", "qat_int4"): 4.0,
                     ("cuda", "qat_fp16"): 1.0, ("cuda", "qat_int4"): 2.0, ("cuda", "qat_int4_torchao"): 1.25}
    assert rows["cuda"][1]["memory_mb"] == 500.0 and rows["cpu"][1]["memory_mb"] == 300.0
    text = "\n".join(serving_markdown("int4", metrics))
    lat = [v for sec in metrics["bench"]["devices"].values() for v in sec["latency_s"].values()]
    own = {round(a / b, 2) for sec in metrics["bench"]["devices"].values()
           for a in sec["latency_s"].values() for b in sec["latency_s"].values()}
    cross = {round(a / b, 2) for a in lat for b in lat} - own
    assert not [x for x in cross if f"{x:.2f}x" in text], cross
    # the results table (CPU figures) ignores the GPU's latencies
    table = {r["variant"]: r for r in results_table("int4", metrics)}
    assert table["qat_int4"]["latency_s"] == 0.5 and table["qat_int4"]["speedup"] == 4.0
    assert "qat_fp16" not in table and "qat_int4_torchao" not in table


def test_serving_table_says_which_device_was_skipped():
    from tasks.scorecard import serving_markdown

    metrics = _two_device_metrics()
    del metrics["bench"]["devices"]["cuda"]
    metrics["bench"]["skipped"] = {"cuda": "no CUDA device"}
    text = "\n".join(serving_markdown("int4", metrics))
    assert "**GPU (CUDA)**: not measured (no CUDA device)." in text and "CUDAExecutionProvider" not in text


def test_node_placement_reads_ort_verbose_log(tmp_path):
    from steps import serving

    log = "\n".join([
        "2026-11-27 [V:onnxruntime:, session_state.cc:1598 VerifyEachNodeIsAssignedToAnEp] Node placements",
        "2026-11-27 [V:onnxruntime:, session_state.cc:1601 VerifyEachNodeIsAssignedToAnEp]  Node(s) placed on "
        "[CUDAExecutionProvider]. Number of nodes: 40",
        "2026-11-27 [V:onnxruntime:, session_state.cc:1603 VerifyEachNodeIsAssignedToAnEp]   MatMulNBits (q_proj)",
        "2026-11-27 [V:onnxruntime:, session_state.cc:1601 VerifyEachNodeIsAssignedToAnEp]  Node(s) placed on "
        "[CPUExecutionProvider]. Number of nodes: 3",
        "2026-11-27 [V:onnxruntime:, session_state.cc:1603 VerifyEachNodeIsAssignedToAnEp]   MatMulInteger (fc1)",
        "2026-11-27 [V:onnxruntime:, session_state.cc:1603 VerifyEachNodeIsAssignedToAnEp]   Shape (s1)",
        "2026-11-27 [V:onnxruntime:, session_state.cc:1603 VerifyEachNodeIsAssignedToAnEp]   Shape (s2)"])
    assert serving.parse_placements(log) == {"CUDAExecutionProvider": 40, "CPUExecutionProvider": 3,
                                             "cpu_ops": {"MatMulInteger": 1, "Shape": 2}}
    # and the real log of a real session (CPU only here)
    from onnx_graphs import matmul_model, random_weights
    import onnx

    onnx.save(matmul_model(random_weights(32, 8, 0)), tmp_path / "m.onnx")
    assert serving.node_placement(tmp_path / "m.onnx", "CPUExecutionProvider") == {"CPUExecutionProvider": 1, "cpu_ops": {}}


def test_bench_without_clips_is_a_clear_error():
    with pytest.raises(Exception, match="no clips"):
        bench.benchmark([], [], bench.Decoding())


def _fake_results(**changes):
    r = {
        "sizes_mb": {"pytorch_fp32": 290.0, "onnx_fp32": 400.0, "onnx_int8": 80.0, "onnx_int4": 70.0},
        "latency_s": {"pytorch_fp32": 1.6, "onnx_fp32": 1.1, "onnx_int8": 0.9, "onnx_int4": 1.2, "faster_whisper_int8": 1.1},
        "encoder_ms": {"pytorch_fp32": 650, "onnx_fp32": 620, "onnx_int8": 460, "onnx_int4": 700, "faster_whisper_int8": 710},
        "decoder_ms_per_token": {"pytorch_fp32": 36, "onnx_fp32": 18, "onnx_int8": 15, "onnx_int4": 16, "faster_whisper_int8": 12.6},
        "rtf": {}, "peak_rss_mb": {}, "mean_new_tokens": {"onnx_int8": 20, "pytorch_fp32": 20, "faster_whisper_int8": 19},
        "wer": {"base_fp32": 78.0, "base_ptq_int8": 90.0, "qat_fp32": 30.0, "qat_int8": 30.4, "qat_int4": 33.0},
        "cer": {}, "wer_ci": {},
        "tensor_mb_by_dtype": {"onnx_int4": {"float32": 20.0, "int4": 30.0, "largest_float": [["emb", 13.0]]}},
        "machine": {"cpu": "test", "cores": 2, "simd": ["avx2"], "int8_dot_product": False, "load_avg_1m": 1.0,
                    "torch": "x", "onnxruntime": "y", "python": "3.11", "cuda": None},
    }
    r.update(changes)
    return r


def test_targets_compare_the_right_figures():
    rb = _load_script("run_bench")
    t = rb.targets(_fake_results())
    assert t["int8_size_ratio"]["value"] == pytest.approx(80 / 290, abs=1e-3) and t["int8_size_ratio"]["met"] is True
    assert t["int4_size_ratio"]["value"] == pytest.approx(70 / 290, abs=1e-3) and t["int4_size_ratio"]["met"] is False
    assert t["int8_speedup_vs_pytorch"]["value"] == pytest.approx(1.6 / 0.9, abs=1e-3)
    assert t["int8_speedup_vs_pytorch"]["met"] is False
    assert t["int8_speedup_vs_faster_whisper"]["met"] is False  # 1.22 < 1.3
    assert t["qat_int8_wer_loss"]["value"] == pytest.approx(0.4) and t["qat_int8_wer_loss"]["met"] is True
    assert t["qat_int8_minus_ptq_int8_wer"]["met"] is True
    worse = rb.targets(_fake_results(wer={"qat_fp32": 30.0, "qat_int8": 31.0, "base_ptq_int8": 30.5}))
    assert worse["qat_int8_wer_loss"]["met"] is False and worse["qat_int8_minus_ptq_int8_wer"]["met"] is False
    missing = rb.targets(_fake_results(latency_s={}))
    assert missing["int8_speedup_vs_pytorch"]["met"] is None


def test_int4_targets_compare_with_int8_in_the_same_run_and_with_its_own_fp32(tmp_path):
    rb = _load_script("run_bench")
    t = rb.targets(_fake_results(wer={"qat_fp32_int4_run": 32.5, "qat_int4": 33.0, "base_ptq_int4": 35.0}))
    assert t["int4_latency_vs_int8"]["value"] == pytest.approx(1.2 / 0.9, abs=1e-3) and t["int4_latency_vs_int8"]["met"] is False
    assert t["int4_decoder_vs_int8"]["value"] == pytest.approx(16 / 15, abs=1e-3) and t["int4_decoder_vs_int8"]["met"] is False
    assert t["qat_int4_wer_loss"]["value"] == pytest.approx(0.5) and t["qat_int4_wer_loss"]["met"] is True
    assert t["qat_int4_minus_ptq_int4_wer"]["met"] is True
    # the paired interval comes from evaluate's per-clip counts of both variants
    for name, errors in (("qat_int4", [3, 2, 2, 2]), ("qat_fp32", [2, 2, 2, 2])):
        d = tmp_path / "int4" / "evaluate"
        d.mkdir(parents=True, exist_ok=True)
        rows = ["id,reference,hypothesis,reference_normalized,hypothesis_normalized,errors,words,char_errors,chars"]
        rows += [f"c{i},r,h,r,h,{e},10,0,1" for i, e in enumerate(errors)]
        (d / f"utterances_{name}.csv").write_text("\n".join(rows) + "\n")
    gaps = rb.paired_gaps(tmp_path)
    assert list(gaps) == ["qat_int4_minus_its_qat_fp32"]
    assert gaps["qat_int4_minus_its_qat_fp32"]["gap"] == 2.5
    lo, hi = gaps["qat_int4_minus_its_qat_fp32"]["ci95"]
    assert lo == 0.0 and 5.0 <= hi <= 10.0  # all of the gap on one clip of four


def test_a_wer_verdict_says_whether_its_paired_interval_resolves_it():
    rb = _load_script("run_bench")
    r = _fake_results(wer={"qat_fp32_int4_run": 32.5, "qat_int4": 33.0, "base_ptq_int4": 43.0})
    r["targets"] = rb.targets(r)
    r["wer_paired_ci"] = {"qat_int4_minus_its_qat_fp32": {"gap": 0.5, "ci95": [-1.8, 3.6]},
                          "qat_int4_minus_base_ptq_int4": {"gap": -10.0, "ci95": [-15.0, -6.1]}}
    assert rb.verdict(r, "qat_int4_wer_loss") == "met (not resolved: 95 % interval [-1.8, 3.6])"
    assert rb.verdict(r, "qat_int4_minus_ptq_int4_wer") == "met (resolved: 95 % interval [-15.0, -6.1])"
    r["wer_paired_ci"]["qat_int4_minus_its_qat_fp32"] = {"gap": 0.5, "ci95": [0.2, 0.9]}
    assert rb.verdict(r, "qat_int4_wer_loss").startswith("met (resolved")
    r["wer"]["qat_int4"] = 40.0
    r["targets"] = rb.targets(r)
    r["wer_paired_ci"]["qat_int4_minus_its_qat_fp32"] = {"gap": 7.5, "ci95": [2.0, 12.0]}
    assert rb.verdict(r, "qat_int4_wer_loss") == "**missed** (resolved: 95 % interval [2.0, 12.0])"
    assert rb.verdict(r, "int4_size_ratio") in ("met", "**missed**")  # no interval for a size


def test_make_bench_scores_every_test_clip_of_the_manifest(french_manifest, tmp_path):
    rb = _load_script("run_bench")
    tests = sum(r["split"] == "test" for r in french_manifest)
    assert tests == 180  # the committed fixture: 30 test sentences in six voices
    assert rb.every_eval_clip("demo", {})["data.max_eval_samples"] == tests
    assert rb.every_eval_clip("demo", {"data.max_eval_samples": 8})["data.max_eval_samples"] == 8  # --set wins
    # the demo's first 24 test clips are still the original ones: the extra voices come after all 300 rows
    original = {r["id"] for r in french_manifest[:300]}
    assert all(r["id"] in original for r in [r for r in french_manifest if r["split"] == "test"][:60])
    assert {r["split"] for r in french_manifest[300:]} == {"test"}


def test_report_explains_misses_with_figures_and_says_gpu_not_measured():
    rb = _load_script("run_bench")
    r = _fake_results()
    r["targets"] = rb.targets(r)
    text = rb.render_bench_report(r, gpu=None)
    assert "GPU not measured this session" in text
    assert "| onnx_int8 | 80.0 |" in text
    assert "`int4_size_ratio`" in text and "20.0 MB are still float32" in text
    assert "VNNI/AMX): no" in text
    gpu = {"is_gpu": True, "device": "H100", "shapes": "large-v3-distil", "batch": 16, "precision": "bf16 autocast",
           "gradient_checkpointing": False, "results": {"plain": {"samples_per_s": 42.7, "s_per_step": 0.37, "peak_vram_gib": 50.5}}}
    assert "| plain | 42.7 |" in rb.render_bench_report(r, gpu)


def test_a_missed_int8_speed_target_holds_the_attention_and_the_decoder_step_against_their_ceilings(tmp_path, monkeypatch):
    """The profile turns the encoder's attention into a compute rate (4 x frames^2 x d_model per layer over
    its profiled ms) beside one fp32 MatMul's rate on the same cores; the report's reason for a missed
    int8 speed-up quotes both, then a decoder step timed without the profiler against its memory-bandwidth
    floor, and what the clip would take with both at those ceilings."""
    profile_mod = _load_script("int4_profile")
    rb = _load_script("run_bench")
    (tmp_path / "config.json").write_text(json.dumps({"max_source_positions": 1500, "d_model": 512, "encoder_layers": 6}))
    fc1 = profile_mod.KERNEL_SHAPES[profile_mod.FP32_RATE_KERNEL]
    kernel_ms = {profile_mod.FP32_RATE_KERNEL: {"fp32": 2 * fc1[0] * fc1[1] * fc1[2] / 400e6}}  # 400 GFLOP/s
    a = profile_mod.attention_rate(tmp_path, {"by_op": {"MultiHeadAttention": {"ms": 92.16}}}, kernel_ms)
    assert a["gflop"] == pytest.approx(4 * 1500 ** 2 * 512 * 6 / 1e9, abs=0.01)  # 27.65
    assert a["gflops"] == pytest.approx(300.0, abs=0.1) and a["fp32_matmul_gflops"] == pytest.approx(400.0)
    assert a["vs_fp32_matmul_rate"] == 0.75 and a["floor_ms_at_fp32_matmul_rate"] == pytest.approx(69.1, abs=0.05)
    assert "vs_fp32_matmul_rate" not in profile_mod.attention_rate(tmp_path, {"by_op": {}}, {})
    monkeypatch.setattr(rb, "PROFILE", tmp_path / "int4_profile.json")
    r = _fake_results()
    r["targets"] = rb.targets(r)
    assert "GFLOP/s" not in rb.render_bench_report(r, gpu=None)  # not profiled: no figure, no guess
    step = {"plain_ms": 6.0, "run_ms": 11.0}  # the profiler's per-node timing nearly doubles a decoder step
    rb.PROFILE.write_text(json.dumps({"variants": {"onnx_int8": {"encoder_attention": a, "decoder_step": step,
                                                                 "decoder_floor_ms": 4.0}}}))
    line = next(x for x in rb.explain(r) if x.startswith("- `int8_speedup_vs_pytorch`"))
    assert "27.65 GFLOP a clip, took 92.2 ms: 300 GFLOP/s, 75 % of the 400 GFLOP/s" in line
    assert "it would still take 69 ms" in line
    assert "a decoder step, without the profiler, took 6.00 ms against the 4.00 ms" in line and "(1.50x its" in line
    # 900 ms - (92.16 - 69.12) attention - 20 tokens x (6 - 4) ms; 4x needs 1600 / 4 ms
    assert "the clip would take 837 ms (63 ms less over 20.0 tokens), against the 400 ms needed" in line
    del step["plain_ms"]  # a profile written before steps were timed without the profiler
    rb.PROFILE.write_text(json.dumps({"variants": {"onnx_int8": {"encoder_attention": a, "decoder_step": step,
                                                                 "decoder_floor_ms": 4.0}}}))
    line = next(x for x in rb.explain(r) if x.startswith("- `int8_speedup_vs_pytorch`"))
    assert "a decoder step, as profiled, took 11.00 ms against the 4.00 ms" in line


def test_gpu_probe_runs_the_train_steps_core_on_cpu_with_tiny_shapes(tmp_path):
    probe = _load_script("gpu_probe")
    out = tmp_path / "gpu.json"
    modes = "plain_eager,int8_eager,int4_eager,int8_compiled"
    assert probe.main(["--shapes", "tiny", "--batch", "2", "--steps", "2", "--warmup", "1",
                       "--label-tokens", "8", "--modes", modes, "--peak-tflops", "1", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["is_gpu"] is False and report["shapes"] == "tiny" and report["gradient_checkpointing"] is True
    res = report["results"]
    assert list(res) == modes.split(",")
    assert res["plain_eager"]["fake_quant_linears"] == 0 and res["plain_eager"]["speedup_vs_plain_eager"] == 1.0
    assert res["int8_eager"]["fake_quant_linears"] == res["int4_eager"]["fake_quant_linears"] > 0
    assert res["int8_compiled"]["compiled"] is True and res["int8_eager"]["compiled"] is False
    flops = report["train_flops_per_sample"]["train_flops"]
    for mode in res.values():
        assert mode["samples_per_s"] > 0 and np.isfinite(mode["final_loss"]) and mode["first_step_s"] > 0
        assert mode["mfu"] == pytest.approx(flops * mode["samples_per_s"] / 1e12, rel=1e-2)


def test_gpu_serving_probe_skips_without_cuda_and_runs_on_cpu_with_tiny_shapes(tmp_path):
    from steps import serving

    serve = _load_script("gpu_serve")
    out = tmp_path / "serve.json"
    if serving.cuda_usable() is not None:  # CI: no GPU, nothing written, exit 0
        assert serve.main(["--out", str(out)]) == 0 and not out.exists()
    assert serve.main(["--shapes", "tiny", "--device", "cpu", "--forced-tokens", "2", "--reps", "1",
                       "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = report["results"]
    assert set(rows) == {"torch_fp16", "torch_int8_weight_only", "torch_int4_weight_only"}
    for name in ("torch_fp16", "torch_int8_weight_only"):
        r = rows[name]
        assert r["device"] == "cpu" and r["provider"].startswith("torch-cpu-") and r["forced_tokens"] == 2
        assert r["decoder_ms_per_token"] > 0 and r["latency_s"] > 0 and r["size_mb"] > 0
    assert rows["torch_int8_weight_only"]["size_mb"] < rows["torch_fp16"]["size_mb"]
    assert set(report["vs_fp16_same_device"]) <= set(rows)


def test_make_bench_profiles_right_after_its_speed_pass(tmp_path, monkeypatch):
    """The report's reasons quote the profile: make bench writes it in the same run, after the speed pass."""
    rb = _load_script("run_bench")
    for scheme in rb.SCHEMES:
        (tmp_path / f"{scheme}.yaml").write_text("{}")
    calls = []
    monkeypatch.setattr(rb, "trained_models", lambda work: {})
    monkeypatch.setattr(rb, "speed_pass", lambda *a: calls.append("speed pass") or {})
    monkeypatch.setattr(rb, "profile_main", lambda argv: calls.append(argv) or 0)
    monkeypatch.setattr(rb, "collect", lambda work, speed: calls.append("collect") or {})
    monkeypatch.setattr(rb, "write_outputs", lambda results: None)
    assert rb.main(["--skip-pipeline", "--work", str(tmp_path)]) == 0
    assert calls == ["speed pass", ["--work", str(tmp_path / "profile")], "collect"]
