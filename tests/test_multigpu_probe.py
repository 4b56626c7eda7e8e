"""`python -m benchmarks.gpu_probe --nproc N`: the train step's core on N DDP ranks under torchrun
(gloo on this CPU), the scaling efficiency against one process, and the scaling table it would write."""
from __future__ import annotations

import json

import pytest

from benchmarks import gpu_probe, gpu_probe_ddp
from infra import gpu_speed


@pytest.mark.slow
def test_the_probe_runs_two_ranks_and_reports_their_scaling_but_records_no_cpu_figure(tmp_path):
    table_before = gpu_probe_ddp.SCALING_TABLE.read_bytes()
    out = tmp_path / "gpu.json"
    code = gpu_probe.main(["--shapes", "tiny", "--batch", "2", "--steps", "2", "--warmup", "0", "--label-tokens", "8",
                           "--modes", "int8_eager", "--nproc", "2", "--record", "--out", str(out)])
    report = json.loads(out.read_text())
    assert code == 1  # --record refused: a CPU's ranks share its cores, the figure says nothing about GPUs
    assert gpu_probe_ddp.SCALING_TABLE.read_bytes() == table_before
    assert report["nproc"] == 2 and report["ranks"]["world_size"] == 2 and report["is_gpu"] is False
    got = report["scaling"]["int8_eager"]
    assert got["samples_per_s"] > 0 and got["one_process_samples_per_s"] > 0
    assert got["efficiency"] == pytest.approx(got["samples_per_s"] / (2 * got["one_process_samples_per_s"]), abs=1e-3)
    # both ranks trained the same model: the same fake-quantized linears, a finite loss
    assert report["ranks"]["results"]["int8_eager"]["fake_quant_linears"] == report["results"]["int8_eager"]["fake_quant_linears"]


def test_a_measured_efficiency_replaces_its_counts_row_and_the_ranking_uses_it(tmp_path, monkeypatch):
    table = tmp_path / "gpu_scaling.csv"
    table.write_bytes(gpu_probe_ddp.SCALING_TABLE.read_bytes())
    gpu_probe_ddp.record(table, 2, 0.93, "measured: python -m benchmarks.gpu_probe --nproc 2 on 2 x H200")
    for other in ("gpu_speed.csv", "train_throughput.csv"):
        (tmp_path / other).write_bytes((gpu_speed.HERE / other).read_bytes())
    monkeypatch.setattr(gpu_speed, "HERE", tmp_path)
    gpu_speed._scaling.cache_clear()
    try:
        two = gpu_speed.scaling(2)
        assert two["efficiency"] == 0.93 and two["source"].startswith("measured")
        assert gpu_speed.scaling(8)["source"].startswith("estimate")  # the other rows are kept
        w = gpu_speed.TrainWorkload(scheme="int8", micro_batch=8, samples=1000)
        speed = gpu_speed.expected_speed("H200", w, 2)
        assert speed["samples_per_s"] == pytest.approx(52.2 * 2 * 0.93, abs=0.01) and speed["source"].startswith("measured")
    finally:
        gpu_speed._scaling.cache_clear()
