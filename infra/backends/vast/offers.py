"""Vast.ai offers: ONE table of filters, from which the search query, its description in messages,
the local re-check of every offer the server returns (never trust the server-side filter alone) and
the market-filter counts all come; then the offers are ranked by the whole run's cost
(infra/gpu_speed.py). A new filter is one row of FILTERS."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

from contract.machine_config import TrainWorkload, VastConfig

from ...gpu_count import describe_gpu_count, gpu_count_fits, gpu_filter
from ...gpu_speed import rank_offers
from .api import NoOffersError, VastAPI, VastAPIError, brief, num

_SYMBOL = {"in": "in", "gte": ">=", "lte": "<=", "eq": "="}


def _norm_gpu(name: Any) -> str:
    return str(name).replace("_", " ").strip().lower()


def _truthy(value: Any) -> bool:
    return value in (True, 1, "true", "True")


@dataclass(frozen=True)
class Filter:
    """One filter on the offers' `field`: `op` against `value(v, disk_gb)` (as sent on the wire)."""

    field: str
    op: str  # in | gte | lte | eq
    value: Callable[[VastConfig, float], Any]
    setting: str = ""  # the machine.vast setting it comes from (named in messages)
    show: str = "{}"  # how the value reads in messages
    applies: Callable[[VastConfig], bool] = lambda v: True
    on_wire: bool = True  # sent in the search query (else checked here only)
    market: bool = False  # a market filter: left_out counts the offers it alone leaves out
    slack: float = 1.0  # the local re-check's tolerance on a gte (units rounded on the server's side)
    missing: Any = None  # the local re-check's value for an offer without the field (None: malformed)

    def condition(self, v: VastConfig, disk_gb: float) -> dict:
        """The query's condition on `field`."""
        return {self.op: self.value(v, disk_gb)}

    def describe(self, v: VastConfig, disk_gb: float) -> str:
        value = self.value(v, disk_gb)
        shown = self.show.format(value / 1000 if self.field == "gpu_ram" else value)
        return f"{self.field} {_SYMBOL[self.op]} {shown}" + (f" ({self.setting})" if self.setting else "")

    def admits(self, o: dict, v: VastConfig, disk_gb: float) -> bool:
        want = self.value(v, disk_gb)
        if self.op == "in":
            return _norm_gpu(o.get(self.field, "")) in {_norm_gpu(n) for n in want}
        if self.op == "eq" and isinstance(want, bool):
            return _truthy(o.get(self.field, self.missing)) == want
        missing = o.get(self.missing) if isinstance(self.missing, str) else self.missing
        got = num(o, self.field, "offer", missing)
        if self.op == "eq":
            return int(got) == want
        return got >= want * self.slack if self.op == "gte" else got <= want


class GpuCount(Filter):
    """num_gpus: an exact count or a range of counts (infra/gpu_count.py)."""

    def condition(self, v: VastConfig, disk_gb: float) -> dict:
        return gpu_filter(v)

    def describe(self, v: VastConfig, disk_gb: float) -> str:
        return f"{self.field} {describe_gpu_count(v)}"

    def admits(self, o: dict, v: VastConfig, disk_gb: float) -> bool:
        return gpu_count_fits(int(num(o, self.field, "offer", self.missing)), v)


FILTERS: tuple[Filter, ...] = (
    Filter("gpu_name", "in", lambda v, d: list(v.gpu_names), "machine.vast.gpu_names"),
    Filter("gpu_ram", "gte", lambda v, d: v.min_gpu_ram_gb * 1000, "min_gpu_ram_gb, per GPU", "{:g} GB",
           slack=0.97),  # MB
    GpuCount("num_gpus", "eq", lambda v, d: v.gpu_range()[0], "machine.vast.num_gpus"),
    Filter("disk_space", "gte", lambda v, d: d, "min_disk_gb", "{:g} GB"),
    Filter("reliability", "gte", lambda v, d: v.min_reliability, "min_reliability", "{:g}", missing="reliability2"),
    Filter("cuda_max_good", "gte", lambda v, d: v.min_cuda, "min_cuda", "{:g}", market=True),
    Filter("inet_down", "gte", lambda v, d: v.min_inet_down_mbps, "min_inet_down_mbps", "{:g} Mb/s"),
    Filter("inet_down_cost", "lte", lambda v, d: v.max_inet_cost_per_gb, "max_inet_cost_per_gb", "${:g}/GB",
           market=True, missing=0),
    Filter("inet_up_cost", "lte", lambda v, d: v.max_inet_cost_per_gb, "max_inet_cost_per_gb", "${:g}/GB",
           market=True, missing=0),
    Filter("rentable", "eq", lambda v, d: True, missing=True),
    Filter("rented", "eq", lambda v, d: False, missing=False),
    Filter("verified", "eq", lambda v, d: True, "verified", applies=lambda v: v.verified),
    Filter("dph_total", "lte", lambda v, d: v.max_dph, "max_dph", "${:g}/h"),
    Filter("min_bid", "lte", lambda v, d: v.bid_dph or 0, "bid_dph", "${:g}/h", applies=lambda v: v.interruptible,
           on_wire=False, missing=0),
)
MARKET_FILTERS = tuple(f.field for f in FILTERS if f.market)


def _active(v: VastConfig) -> list[Filter]:
    return [f for f in FILTERS if f.applies(v)]


def query(v: VastConfig, disk_gb: float, leave_out: Iterable[str] = ()) -> dict:
    """The search query: every filter sent on the wire, less those named in `leave_out`."""
    return {f.field: f.condition(v, disk_gb) for f in _active(v) if f.on_wire and f.field not in leave_out}


def describe(v: VastConfig, disk_gb: float) -> str:
    kind = f"interruptible (bid ${v.bid_dph}/h)" if v.interruptible else "on-demand"
    return ", ".join([f.describe(v, disk_gb) for f in _active(v)] + [kind])


def mismatch(o: dict, v: VastConfig, disk_gb: float) -> Optional[str]:
    """The first filter an offer fails (its field), or None when it fits."""
    return next((f.field for f in _active(v) if not f.admits(o, v, disk_gb)), None)


class VastOffers(VastAPI):
    """Searching the market (the account's calls: api.py)."""

    def _search(self, v: VastConfig, disk_gb: float, q: dict, limit: int) -> Any:
        return self._call("search offers", self._sdk.search_offers, query=q,
                          type="bid" if v.interruptible else "on-demand", order="dph_total",
                          limit=limit, storage=disk_gb, no_default=True)

    def search_offers(self, v: VastConfig, disk_gb: Optional[float] = None, exclude_machines: Iterable[int] = (),
                      workload: Optional[TrainWorkload] = None) -> list[dict]:
        """Matching offers, cheapest run of `workload` first (by $/h without one). Raises NoOffersError
        naming every filter when none fit."""
        disk_gb = float(disk_gb or v.min_disk_gb)
        offers = self._search(v, disk_gb, query(v, disk_gb), 100)
        if not isinstance(offers, list):
            raise VastAPIError(f"Vast.ai search offers: expected a list of offers, got {type(offers).__name__}")
        excluded = set(exclude_machines)
        good, rejected = [], {}
        for o in offers:
            for field in ("id", "gpu_name", "dph_total", "machine_id"):
                if not isinstance(o, dict) or field not in o:
                    raise VastAPIError(f"Vast.ai search offers: malformed offer without {field!r}: {brief(o)}")
            why = mismatch(o, v, disk_gb)
            if why is None and o.get("machine_id") in excluded:
                why = "excluded machine (failed earlier)"
            if why:
                rejected[why] = rejected.get(why, 0) + 1
            else:
                good.append(o)
        if not good:
            seen = f"{len(offers)} offer(s) returned" + (f", rejected by {rejected}" if rejected else "")
            raise NoOffersError(f"no Vast.ai offer matches: {describe(v, disk_gb)} ({seen}). "
                                "Loosen those machine.vast.* settings (or raise max_dph) and try again.")
        ranked = rank_offers(good, workload)  # the whole run: hours x $/h + bytes x $/GB; short of memory: left out
        if not ranked:
            raise NoOffersError(f"no Vast.ai offer has the GPU memory the training needs ({workload}): "
                                f"{len(good)} offer(s) matched the filters. Lower train.per_device_batch_size "
                                "or raise machine.vast.min_gpu_ram_gb.")
        return ranked

    def left_out(self, v: VastConfig, disk_gb: Optional[float] = None) -> dict:
        """How many offers that pass every other filter the market filters leave out, per filter
        (cuda_max_good: the host's driver is too old for the pinned torch's CUDA; inet_*_cost: the
        host's bandwidth price is over machine.vast.max_inet_cost_per_gb). One more search."""
        disk_gb = float(disk_gb or v.min_disk_gb)
        offers = self._search(v, disk_gb, query(v, disk_gb, leave_out=MARKET_FILTERS), 1000)
        counts = {f: 0 for f in MARKET_FILTERS}
        for o in offers if isinstance(offers, list) else []:
            try:
                why = mismatch(o, v, disk_gb) if isinstance(o, dict) else None
            except VastAPIError:
                continue
            if why in counts:
                counts[why] += 1
        return {"offers_seen": len(offers) if isinstance(offers, list) else 0, **counts}
