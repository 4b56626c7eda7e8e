"""Home's side of a multi-GPU machine: the GPUs setup counted, how many ranks a CPU run trains with, and
the cost table's expected-vs-measured speed with N (tasks/gpu_ranks.py, tasks/billing.py)."""
from __future__ import annotations

from contract.config import load_config
from contract.workload import run_workload
from infra import run_estimate
from infra.machines.machine import Lease
from tasks.billing import estimate_rows
from tasks.gpu_ranks import counted_gpus, cpu_ranks, with_counted_gpus


def lease(n: int) -> Lease:
    return Lease(backend="vast", label="qat-x", instance_id=1, gpu_name="RTX 4090", num_gpus=n)


def test_the_counts_setup_printed_are_kept_and_insane_ones_read_as_none():
    assert counted_gpus({"nvidia_smi": 2, "torch": 0}) == {"nvidia_smi": 2, "torch": 0}
    assert counted_gpus({"nvidia_smi": 10**9, "torch": "8", "x": 1}) == {"nvidia_smi": 0, "torch": 0}
    assert counted_gpus({"nvidia_smi": True, "torch": -1}) == {"nvidia_smi": 0, "torch": 0}
    kept = with_counted_gpus(lease(2), {"venv": "v", "gpus": {"nvidia_smi": 2, "torch": 0}})
    assert kept.gpus_counted == {"nvidia_smi": 2, "torch": 0} and kept.label == "qat-x"
    assert with_counted_gpus(lease(2), {"venv": None}) == lease(2)  # the local backend sets nothing up


def test_a_cpu_run_trains_one_process_per_listed_gpu_a_gpu_run_lets_the_step_count():
    cpu, gpu = load_config("tiny", {"train.grad_accum": 2}), load_config("tiny", {"machine.gpu": "required"})
    two = with_counted_gpus(lease(2), {"gpus": {"nvidia_smi": 2, "torch": 0}})
    one = with_counted_gpus(lease(1), {"gpus": {"nvidia_smi": 1, "torch": 0}})
    eight = with_counted_gpus(lease(8), {"gpus": {"nvidia_smi": 8, "torch": 0}})
    assert cpu_ranks(two, cpu) == 2 and cpu_ranks(eight, cpu) == 2  # grad_accum 2: 2 ranks, one micro-batch each
    assert cpu_ranks(two, load_config("tiny")) is None  # grad_accum 1 cannot be shared
    assert cpu_ranks(one, cpu) is None and cpu_ranks(lease(2), cpu) is None  # train.nproc stands
    assert cpu_ranks(two, gpu) is None  # on GPUs the train step starts one rank per GPU torch sees


def test_the_cost_table_shows_expected_speed_with_n_gpus_beside_the_measured_ranks():
    w = run_workload(load_config("int8"))
    offer = {"id": 1, "gpu_name": "H200", "dph_total": 5.0, "gpu_ram": 143771, "num_gpus": 2}
    est = {**run_estimate.estimate(offer, w, planned_hours=1, setup_hours=0.5), "gpu_name": "H200", "dph": 5.0}
    costs = [{"step": "total", "seconds": 100.0, "usd": 0.2, "usd_per_hour": 5.0, "instance": 1, "total": True}]
    row = estimate_rows(est, costs, {"samples_per_s": 90.0, "world_size": 2, "first_step_s": 30.0})[2]["step"]
    assert f"expected {est['expected_samples_per_s']:g} with 2 GPU(s)" in row and "x 2 GPUs x scaling" in row
    assert "measured 90 with 2 rank(s)" in row and "45 per rank" in row
