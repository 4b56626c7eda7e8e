"""Offers with several GPUs: machine.vast.num_gpus as an exact count or a range, VRAM checked per GPU,
and the run's cost priced with N GPUs x the per-GPU speed x the scaling efficiency (infra/gpu_count.py,
infra/gpu_speed.py, infra/gpu_scaling.csv, infra/run_estimate.py); against the emulator's catalogue."""
from __future__ import annotations

import pytest

from contract.config import ConfigError, load_config
from contract.machine_config import TrainWorkload, VastConfig
from infra import gpu_speed, run_estimate
from infra.backends.vast import offers
from infra.backends.vast.instances import VastProvider

INT8 = TrainWorkload(scheme="int8", micro_batch=8, compile=True, gradient_checkpointing=True, samples=300_000)
# Too long for one RTX 4090 (or two) within the reaper's age limit; an 8 x RTX 4090 machine trains it in
# hours, its 8 ranks each accumulating one of the 8 micro-batches of the global batch.
BIG = INT8.model_copy(update={"samples": 2_000_000, "samples_per_step": 64})


def offer(i, gpu, dph, ram_mb, n=1):
    return {"id": i, "gpu_name": gpu, "dph_total": dph, "gpu_ram": ram_mb, "gpu_total_ram": ram_mb * n,
            "num_gpus": n, "machine_id": 100 + i}


def search(emulator, workload=None, **vast) -> list[dict]:
    provider = VastProvider(api_key=emulator.api_key, server_url=emulator.url, poll_s=0.2, backoff_s=0.02)
    return provider.search_offers(VastConfig(**vast), workload=workload)


def test_num_gpus_is_an_exact_count_a_range_or_a_minimum_and_bad_ones_are_refused_before_renting():
    assert load_config("tiny").machine.vast.gpu_range() == (1, 1)
    assert load_config("tiny", {"machine.vast.num_gpus": 2}).machine.vast.gpu_range() == (2, 2)
    assert load_config("tiny", {"machine.vast.num_gpus": {"min": 1, "max": 8}}).machine.vast.gpu_range() == (1, 8)
    assert load_config("tiny", {"machine.vast.num_gpus": {"min": 2}}).machine.vast.gpu_range() == (2, None)
    for bad, says in [(0, "at least 1"), ({"min": 4, "max": 2}, "max 2 is below min 4"), ({"min": 0}, "min: Input should be greater than 0"),
                      ({"most": 8}, "most"), ("eight", "a range like {min: 1, max: 8}")]:
        with pytest.raises(ConfigError) as e:
            load_config("tiny", {"machine.vast.num_gpus": bad})
        assert "num_gpus" in str(e.value) and says in str(e.value), str(e.value)


def test_a_range_searches_every_count_in_it_an_exact_count_only_that_one(emulator):
    one = search(emulator, gpu_names=["RTX 4090"], max_dph=3.0)
    assert one and {o["num_gpus"] for o in one} == {1}
    some = search(emulator, gpu_names=["RTX 4090"], max_dph=3.0, num_gpus={"min": 1, "max": 8})
    assert {o["num_gpus"] for o in some} == {1, 2, 8}
    assert {o["num_gpus"] for o in search(emulator, gpu_names=["RTX 4090"], max_dph=3.0,
                                          num_gpus={"min": 2, "max": 4})} == {2}
    assert {o["num_gpus"] for o in search(emulator, gpu_names=["RTX 4090"], max_dph=3.0, num_gpus={"min": 3})} == {8}
    assert "num_gpus in 1..8 (machine.vast.num_gpus)" in offers.describe(
        VastConfig(num_gpus={"min": 1, "max": 8}), 80)


def test_an_8_gpu_offer_wins_when_it_is_the_cheapest_run(emulator):
    """2M samples: one (or two) RTX 4090 would outlive the reaper's age limit and one H200 costs more per
    sample than 8 x RTX 4090 at 0.8 scaling; with num_gpus 1 the 8-GPU machine is not even a candidate."""
    wide = search(emulator, max_dph=3.0, num_gpus={"min": 1, "max": 8}, workload=BIG)
    best = wide[0]
    assert (best["gpu_name"], best["num_gpus"]) == ("RTX 4090", 8), [(o["gpu_name"], o["num_gpus"]) for o in wide[:4]]
    per_gpu = gpu_speed.expected_speed("RTX 4090", BIG)["samples_per_s"]
    assert best["expected_samples_per_s"] == pytest.approx(per_gpu * 8 * gpu_speed.scaling(8)["efficiency"], abs=0.01)
    assert best["speed_source"].startswith("estimate") and "x 8 GPUs x scaling 0.8" in best["speed_source"]
    narrow = search(emulator, max_dph=3.0, workload=BIG)
    assert narrow[0]["num_gpus"] == 1 and narrow[0]["expected_usd"] > best["expected_usd"]


def test_an_offer_is_priced_on_the_gpus_that_divide_grad_accum():
    """grad_accum 4: an 8-GPU machine trains on 4 of them (the others bill idle), a 3-GPU one on 2."""
    four = INT8  # 32 samples per step of micro-batch 8
    eight = run_estimate.estimate(offer(1, "H200", 20.0, 143771, n=8), four, planned_hours=1, setup_hours=0)
    three = run_estimate.estimate(offer(2, "H200", 7.5, 143771, n=3), four, planned_hours=1, setup_hours=0)
    assert (eight["num_gpus"], three["num_gpus"]) == (4, 2)
    assert eight["expected_samples_per_s"] == pytest.approx(52.2 * 4 * gpu_speed.scaling(4)["efficiency"], abs=0.01)


def test_memory_is_checked_per_gpu_not_over_the_machines_total():
    """int8 at micro-batch 8 peaks at 16.1 GiB on each rank: two 12 GB GPUs (24 GB in all) cannot hold it."""
    ranked = gpu_speed.rank_offers([offer(1, "RTX 3060", 0.10, 12288, n=2), offer(2, "RTX 4090", 0.60, 24564, n=2)],
                                   INT8)
    assert [o["id"] for o in ranked] == [2]


def test_the_estimate_trains_on_n_gpus_at_the_scaling_efficiency_of_the_table():
    one, two = offer(1, "H200", 2.50, 143771), offer(2, "H200", 5.00, 143771, n=2)
    e1 = run_estimate.estimate(one, INT8, planned_hours=12, setup_hours=0)
    e2 = run_estimate.estimate(two, INT8, planned_hours=12, setup_hours=0)
    eff = gpu_speed.scaling(2)
    assert eff["efficiency"] < 1 and eff["source"].startswith("estimate")
    assert (e1["num_gpus"], e2["num_gpus"]) == (1, 2)
    assert e2["expected_samples_per_s"] == pytest.approx(52.2 * 2 * eff["efficiency"], abs=0.01)
    assert e2["train_hours"] == pytest.approx(300_000 / (52.2 * 2 * eff["efficiency"]) / 3600, abs=1e-3)
    assert e1["speed_source"].startswith("measured") and e2["speed_source"].startswith("estimate")
    # a count the table does not list takes the row of the largest count below it
    assert gpu_speed.scaling(3) == gpu_speed.scaling(2) and gpu_speed.scaling(16) == gpu_speed.scaling(8)
