"""The emulator's offer catalogue and the Vast search filter language (POST /bundles/).

Prices and specs are plausible mid-2025 Vast.ai figures, not live data. Fields and units follow
docs/REFERENCE.md section 1: gpu_ram/cpu_ram in MB, disk_space in GB, dph in $/h, inet in Mb/s,
inet_up_cost/inet_down_cost in $/GB (hosts set their own: one row asks $2/GB, some hosts run drivers
older than the pinned torch's CUDA).
"""
from __future__ import annotations

import copy
import csv
from pathlib import Path
from typing import Any, Iterable

# The catalogue: one offer per row of offers.csv (per-GPU price in $/h); offer n (from 1) has id
# 3100000 + n and machine_id 41000 + n.
_TABLE = Path(__file__).with_name("offers.csv")

STORAGE_COST = 0.15  # $/GB/month
DEFAULT_STORAGE_GB = 5.0


def catalogue() -> list[dict]:
    """Every offer as a full Vast offer row (storage not yet priced in)."""
    offers = []
    with open(_TABLE, newline="") as f:
        rows = list(csv.DictReader(f))
    for i, r in enumerate(rows, 1):
        oid, mid, gpu, n, gram = 3100000 + i, 41000 + i, r["gpu_name"], int(r["num_gpus"]), int(r["gpu_ram_mb"])
        dph, rel, cuda, geo = float(r["dph_per_gpu"]), float(r["reliability"]), float(r["cuda"]), r["geolocation"]
        verified, disk, down = r["verified"] == "yes", int(r["disk_gb"]), float(r["inet_down"])
        cram, hosting = int(r["cpu_ram_mb"]), int(r["hosting_type"])
        offers.append({
            "id": oid, "ask_contract_id": oid, "bundle_id": oid, "machine_id": mid, "host_id": 9000 + mid % 100,
            "gpu_name": gpu, "num_gpus": n, "gpu_ram": gram, "gpu_total_ram": gram * n,
            "gpu_frac": 1.0, "gpu_arch": "nvidia", "cpu_ram": cram, "cpu_cores": 16 * n,
            "cpu_cores_effective": 16.0 * n, "cpu_name": "AMD EPYC 7543 32-Core Processor",
            "disk_space": float(disk), "disk_bw": 3200.0, "disk_name": "nvme",
            "dph_base": round(dph * n, 4), "storage_cost": STORAGE_COST,
            "inet_up": round(down * 0.8, 1), "inet_down": down, "inet_up_cost": float(r["inet_up_cost"]), "inet_down_cost": float(r["inet_down_cost"]),
            "min_bid": round(dph * n * 0.55, 4), "reliability": rel, "reliability2": rel,
            "cuda_max_good": cuda, "driver_version": r["driver_version"], "direct_port_count": 20,
            "verified": verified, "verification": "verified" if verified else "unverified",
            "rentable": True, "rented": False, "external": False, "hosting_type": hosting,
            "geolocation": geo, "duration": 30 * 86400.0, "end_date": None, "static_ip": hosting == 1,
            "compute_cap": 890 if "40" in gpu or "L40" in gpu else 800, "total_flops": 80.0 * n,
            "dlperf": 40.0 * n, "pci_gen": 4.0, "pcie_bw": 24.5, "os_version": "22.04",
            "public_ipaddr": f"203.0.113.{mid % 250}", "is_bid": False, "vms_enabled": False,
            "cluster_id": None,
        })
    return offers


def price(offer: dict, storage_gb: float, bid: bool) -> dict:
    """A copy of offer with dph_total / storage_total_cost for `storage_gb` of disk."""
    row = copy.deepcopy(offer)
    storage_dph = STORAGE_COST * storage_gb / 720.0
    base = row["min_bid"] if bid else row["dph_base"]
    row["storage_total_cost"] = round(storage_dph, 6)
    row["dph_total"] = round(base + storage_dph, 6)
    row["is_bid"] = bid
    row["score"] = round(row["dlperf"] / row["dph_total"] * row["reliability"], 3)
    row["dlperf_per_dphtotal"] = round(row["dlperf"] / row["dph_total"], 3)
    row["flops_per_dphtotal"] = round(row["total_flops"] / row["dph_total"], 3)
    return row


class QueryError(ValueError):
    """A search filter the emulator cannot apply: answered with 400 invalid_args."""


_NUM_OPS = {"gte": lambda a, b: a >= b, "lte": lambda a, b: a <= b, "gt": lambda a, b: a > b,
            "lt": lambda a, b: a < b}


def _coerce(value: Any, like: Any) -> Any:
    """Coerce a query value ("1", "0.98", "true", 16000.0) to the type of the field value `like`."""
    if isinstance(like, bool):
        if isinstance(value, str):
            return value.strip().lower() in ("true", "1")
        return bool(value)
    if isinstance(like, (int, float)):
        try:
            return float(value)
        except (TypeError, ValueError):
            raise QueryError(f"value {value!r} is not a number") from None
    return value if value is None else str(value)


def _norm(s: Any) -> Any:
    return s.replace("_", " ").lower() if isinstance(s, str) else s


def _same(want: Any, have: Any, field: str) -> bool:
    """Equality as Vast filters: case/underscore-insensitive; geolocation also matches its country code."""
    if want is None or have is None:
        return want is None and have is None
    if field == "geolocation" and isinstance(have, str) and _norm(str(want)) == _norm(have.split(",")[-1].strip()):
        return True
    return _norm(_coerce(want, have)) == _norm(have)


def matches(offer: dict, field: str, conditions: Any) -> bool:
    """Whether one offer satisfies {op: value, ...} on `field`. Unknown fields are ignored (as Vast does)."""
    if field not in offer:
        return True
    if not isinstance(conditions, dict):
        raise QueryError(f"filter for {field!r} must be an object like {{\"gte\": 1}}, got {conditions!r}")
    have = offer[field]
    for op, want in conditions.items():
        if op in _NUM_OPS:
            if have is None or not _NUM_OPS[op](float(have), _coerce(want, 0.0)):
                return False
        elif op in ("eq", "neq"):
            if _same(want, have, field) != (op == "eq"):
                return False
        elif op in ("in", "notin", "nin"):
            if not isinstance(want, (list, tuple)):
                want = [want]
            if any(_same(w, have, field) for w in want) != (op == "in"):
                return False
        else:
            raise QueryError(f"unknown operator {op!r} on {field!r}: use gte, lte, gt, lt, eq, neq, in, notin")
    return True


_CONTROL_KEYS = {"order", "type", "limit", "allocated_storage", "disable_bundling", "external"}


def search(query: dict, rented_offer_ids: Iterable[int] = ()) -> list[dict]:
    """Apply a /bundles/ query (filters, order, type, limit, allocated_storage) to the catalogue."""
    if not isinstance(query, dict):
        raise QueryError("search body must be a JSON object of filters")
    offer_type = query.get("type", "on-demand")
    if offer_type not in ("on-demand", "bid", "reserved", "interruptible"):
        raise QueryError(f"type must be on-demand, bid or reserved, got {offer_type!r}")
    try:
        storage = float(query.get("allocated_storage", DEFAULT_STORAGE_GB))
    except (TypeError, ValueError):
        raise QueryError("allocated_storage must be a number of GB") from None
    rented = set(rented_offer_ids)
    rows = []
    for offer in catalogue():
        offer["rented"] = offer["id"] in rented
        offer["rentable"] = not offer["rented"]
        row = price(offer, storage, bid=offer_type in ("bid", "interruptible"))
        if all(matches(row, f, c) for f, c in query.items() if f not in _CONTROL_KEYS or f == "external"):
            rows.append(row)
    for field, direction in reversed(_order(query.get("order"))):
        rows.sort(key=lambda r: (r.get(field) is None, r.get(field) if not isinstance(r.get(field), str)
                                 else r.get(field).lower()), reverse=direction == "desc")
    limit = query.get("limit")
    if limit is not None:
        try:
            rows = rows[: int(limit)]
        except (TypeError, ValueError):
            raise QueryError(f"limit must be an integer, got {limit!r}") from None
    return rows


def _order(order: Any) -> list[tuple[str, str]]:
    if order is None:
        return [("score", "desc")]
    if not isinstance(order, list):
        raise QueryError("order must be a list like [[\"dph_total\", \"asc\"]]")
    out = []
    for item in order:
        if not (isinstance(item, (list, tuple)) and len(item) == 2 and item[1] in ("asc", "desc")):
            raise QueryError(f"bad order entry {item!r}: use [field, \"asc\"|\"desc\"]")
        out.append((str(item[0]), item[1]))
    return out
