"""Destroy forgotten instances: labelled ones older than a deadline, or whose run has finished.

    python -m infra.reaper --max-age-hours 24 [--label-prefix qat-] [--dry-run] [--url URL]

The API key comes from env VAST_API_KEY (never printed). Without Prefect, age alone decides;
the Prefect reap flow passes `is_run_active` that asks the Prefect API.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable, Optional

from . import provision
from .vast import VastAPIError


def reap_instances(api_key: Optional[str] = None, server_url: Optional[str] = None, max_age_hours: float = 24.0,
                   label_prefix: str = "qat-", is_run_active: Optional[Callable[[str], bool]] = None,
                   dry_run: bool = False, log: Callable[[str], None] = print, now: Optional[float] = None) -> list[dict]:
    """Returns one row per instance judged: id, label, age_h, reason, destroyed (confirmed), error."""
    now = now if now is not None else time.time()
    out = []
    for lease in provision.find_instances(label_prefix, api_key=api_key, server_url=server_url):
        label = lease.label
        # no start date: treat as old, never leave it billing
        age_h = (now - lease.created_at) / 3600.0 if lease.created_at else float("inf")
        reason = None
        if age_h > max_age_hours:
            reason = f"older than {max_age_hours:g} h"
        elif is_run_active is not None:
            try:
                active = is_run_active(label)
            except Exception as e:  # cannot tell: keep it, age will decide later
                log(f"instance {lease.instance_id} ({label}): could not check its run ({e}); kept")
                active = True
            if not active:
                reason = "its run is no longer active"
        if reason is None:
            continue
        entry = {"instance_id": lease.instance_id, "label": label, "age_h": round(age_h, 2), "reason": reason,
                 "destroyed": False, "error": None}
        if dry_run:
            log(f"[dry run] would destroy instance {entry['instance_id']} ({label}): {reason}")
        else:
            try:
                entry["destroyed"] = provision.release(lease, api_key=api_key, server_url=server_url)
                log(f"destroyed instance {entry['instance_id']} ({label}): {reason}")
            except VastAPIError as e:
                entry["error"] = str(e)
                log(f"could not destroy instance {entry['instance_id']} ({label}): {e}")
        out.append(entry)
    return out


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m infra.reaper", description=__doc__.split("\n\n")[0])
    p.add_argument("--max-age-hours", type=float, required=True, help="destroy labelled instances older than this")
    p.add_argument("--label-prefix", default="qat-", help="only instances whose label starts with this (default qat-)")
    p.add_argument("--dry-run", action="store_true", help="list what would be destroyed, destroy nothing")
    p.add_argument("--url", default=os.environ.get("VAST_URL"), help="Vast.ai API endpoint (default: env VAST_URL or the console)")
    args = p.parse_args(argv)
    if not args.label_prefix:
        p.error("--label-prefix must not be empty: the reaper only touches instances it labelled")
    try:
        rows = reap_instances(api_key=os.environ.get("VAST_API_KEY"), server_url=args.url, max_age_hours=args.max_age_hours,
                    label_prefix=args.label_prefix, dry_run=args.dry_run)
    except VastAPIError as e:
        print(f"reaper: {e}", file=sys.stderr)
        return 2
    failed = [r for r in rows if r["error"]]
    print(f"reaper: {len(rows)} instance(s) {'to destroy' if args.dry_run else 'reaped'}, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
