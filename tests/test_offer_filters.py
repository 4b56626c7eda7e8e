"""The Vast.ai offer filters are one table (infra/backends/vast/offers.py FILTERS): every row is in
the search query (unless checked here only), named in the refusal's description with its setting,
and re-checked on each offer the server returns: an offer that breaks that row alone is refused, the
row's field named."""
from __future__ import annotations

import pytest

from contract.machine_config import VastConfig
from infra.backends.vast import offers

V = VastConfig(interruptible=True, bid_dph=0.5, min_disk_gb=80)  # every row applies
GOOD = {"id": 1, "machine_id": 9, "gpu_name": "RTX_4090", "gpu_ram": 24000, "num_gpus": 1, "disk_space": 100,
        "reliability": 0.99, "cuda_max_good": 13.0, "inet_down": 500, "inet_down_cost": 0.01, "inet_up_cost": 0.01,
        "rentable": True, "rented": False, "verified": True, "dph_total": 1.0, "min_bid": 0.1}


def breaking(f: offers.Filter):
    """A value of the row's field that this row alone refuses."""
    want = f.value(V, V.min_disk_gb)
    if f.op == "in":
        return "GTX 1080"
    if isinstance(want, bool):
        return not want
    return {"gte": 0, "lte": want * 10 + 1, "eq": want + 1}[f.op]


def test_the_good_offer_fits():
    assert offers.mismatch(GOOD, V, V.min_disk_gb) is None


@pytest.mark.parametrize("f", offers.FILTERS, ids=lambda f: f.field)
def test_each_filter_is_queried_described_and_rechecked(f):
    query, described = offers.query(V, V.min_disk_gb), offers.describe(V, V.min_disk_gb)
    assert (f.field in query) == f.on_wire
    assert f.describe(V, V.min_disk_gb) in described and f.field in described
    if f.setting:
        assert f"({f.setting})" in described
    assert offers.mismatch({**GOOD, f.field: breaking(f)}, V, V.min_disk_gb) == f.field


def test_the_market_filters_are_left_out_of_their_own_count():
    left = offers.query(V, V.min_disk_gb, leave_out=offers.MARKET_FILTERS)
    assert set(offers.MARKET_FILTERS) == {"cuda_max_good", "inet_down_cost", "inet_up_cost"}
    assert not set(left) & set(offers.MARKET_FILTERS) and set(left) < set(offers.query(V, V.min_disk_gb))
