"""benchmarks/int4_recipe.py: the paired gap interval and the table it renders (no model runs here)."""
from __future__ import annotations

from benchmarks import int4_recipe


def _w(errors: list[int], words: list[int]) -> dict:
    return {"wer": round(100.0 * sum(errors) / sum(words), 3), "cer": 0.0, "wer_ci": [0.0, 100.0],
            "word_errors": errors, "words": words}


def test_gap_interval_is_paired_over_the_same_utterances():
    words = [10] * 20
    fp32 = _w([2] * 20, words)
    assert int4_recipe.gap_ci(fp32, fp32) == [0.0, 0.0]  # same errors on every clip: no spread at all
    one_more = _w([3] * 20, words)  # one more error on every clip: +10 points, whichever clips are drawn
    assert int4_recipe.gap_ci(one_more, fp32) == [10.0, 10.0]
    lo, hi = int4_recipe.gap_ci(_w([2] * 19 + [12], words), fp32)  # all of it on one clip: a wide interval
    assert lo == 0.0 and hi > 5.0
    assert int4_recipe.gap_ci({"wer": 1.0}, fp32) is None  # entries measured before per-clip errors were kept


def test_render_states_the_targets_from_the_same_figures():
    words = [10] * 20
    entry = lambda int4, ptq: {  # noqa: E731
        "description": "d", "commands": ["c"], "train_metrics": {"optimizer_steps": 27},
        "wer": {"qat_fp32": _w([2] * 20, words), "qat_fake_quant": int4, "qat_int4": int4, "qat_int4_acc4": int4,
                "base_ptq_int4": ptq, "clips": 20, "size_mb": {"qat_int4": 65.8, "pytorch_fp32": 290.4},
                "fake_quant_vocab": {"float": int4, "4": ptq, "8": int4}}}
    text = int4_recipe.render({"close": entry(_w([2] * 19 + [3], words), _w([9] * 20, words)),
                               "far": entry(_w([3] * 20, words), _w([9] * 20, words))})
    rows = {}
    for line in text.splitlines():  # the first table: one row per option (the vocabulary table follows)
        if line.startswith(("| close", "| far")):
            rows.setdefault(line.split(" | ")[0][2:], line)
    assert "+0.50 [+0.0, +1.5] | met | 65.8 (0.227)" in rows["close"]
    assert "+10.00 [+10.0, +10.0] | **missed**" in rows["far"]
    assert "Smallest int4 - fp32 gap: `close` (+0.50 points); it meets" in text
    now = entry(_w([2] * 20, words), _w([9] * 20, words))
    del now["wer"]["qat_int4_acc4"]  # measured after the benchmarks-only accuracy-level export was dropped
    row = next(line for line in int4_recipe.render({"now": now}).splitlines() if line.startswith("| now"))
    assert "| 20.00 [0.0, 100.0] | - | 90.00 |" in row, row


def test_profile_section_says_where_the_time_goes():
    part = lambda ms, ops: {"run_ms": ms, "by_op": {op: {"ms": m, "share": m / ms} for op, m in ops}}  # noqa: E731
    prof = {"command": "python -m benchmarks.int4_profile", "threads": 2, "decoder_past_tokens": 32, "load_avg_1m": 1.0,
            "read_bandwidth_gbs": 20.0, "kernels_ms": {"vocabulary_1x512x51865": {"int8": 1.3, "int4_shipped": 1.4}},
            "variants": {"onnx_int4": {"encoder": part(300.0, [("MatMulNBits", 200.0)]),
                                       "decoder_step": part(10.0, [("DynamicQuantizeMatMul", 2.0), ("MatMulNBits", 1.5)]),
                                       "decoder_floor_ms": 4.0, "decoder_step_vs_floor": 2.5}}}
    text = "\n".join(int4_recipe.profile_section({"Before": prof}))  # without the first call, profiled times only
    assert "| onnx_int4 | 300.0 profiled | MatMulNBits 200.00 ms (67 %) | not measured |  | 10.00 profiled | " \
           "DynamicQuantizeMatMul 2.00 ms (20 %), MatMulNBits 1.50 ms (15 %) | 4.00 (2.5x) |" in text
    assert "| vocabulary_1x512x51865 | 1.300 | 1.400 |  |" in text  # written before the shipped layout was named
    prof["kernels_ms"]["vocabulary_1x512x51865"]["shipped"] = "int8"
    assert "| vocabulary_1x512x51865 | 1.300 | 1.400 | int8 |" in "\n".join(int4_recipe.profile_section({"Now": prof}))
    v = prof["variants"]["onnx_int4"]
    v["decoder_first_step"] = part(40.0, [("MatMulNBits", 30.0)])
    for name, ms in (("encoder", 290.0), ("decoder_first_step", 38.0), ("decoder_step", 5.0)):
        v[name]["plain_ms"] = ms  # timed without the profiler: the times shown, the profile only splits them
    text = "\n".join(int4_recipe.profile_section({"Now": prof}))
    assert "| onnx_int4 | 290.0 | MatMulNBits 200.00 ms (67 %) | 38.0 | MatMulNBits 30.00 ms (75 %) | 5.00 |" in text
