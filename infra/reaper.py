"""Destroy forgotten instances: labelled ones older than a deadline, or whose run is gone for sure.

    python -m infra.reaper --max-age-hours 24 [--label-prefix qat-] [--dry-run] [--url URL]

Every registered backend is asked for its labelled instances with its own credentials (this CLI:
read from the environment by the backend itself, VAST_API_KEY for Vast.ai, checked against its
endpoint before any request, never printed). Without Prefect (this CLI), age alone decides. The Prefect reap flow passes `run_status`, which asks the Prefect API and answers LIVE,
ACTIVE, GONE, FOREIGN or UNKNOWN (tasks/reaping.py), and `suspects`, the labels judged GONE by the
previous pass: an instance is destroyed for its run only on the second GONE verdict in a row.
ACTIVE, UNKNOWN or an exception clears the count; it is kept, and age decides in the end.

Age never overrides what is known: a LIVE run (heartbeats) or another installation's machine
(FOREIGN) is never destroyed by age; past the limit the reaper says so through `alarm` instead.
Age is never guessed: a row without a start date (an instance being created) is aged from the
reaper's first sighting of it (`first_seen`, instance id -> time, kept by the caller between passes;
this CLI keeps none, so it ages such a row 0 h and keeps it).
A malformed row is skipped and logged (the backend's find_instances), never the end of the pass.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Callable, Mapping, Optional

from .backends import registry
from .backends.base import ProviderError, no_secret_blocks

LIVE, ACTIVE, GONE, FOREIGN, UNKNOWN = "live", "active", "gone", "foreign", "unknown"
CONFIRMATIONS = 2  # consecutive GONE verdicts before an instance is destroyed for its run


def reap_instances(credentials: Mapping[str, Any], max_age_hours: float = 24.0,
                   label_prefix: str = "qat-", run_status: Optional[Callable[[str], str]] = None,
                   suspects: Optional[dict] = None, dry_run: bool = False, log: Callable[[str], None] = print,
                   now: Optional[float] = None, first_seen: Optional[dict] = None,
                   alarm: Optional[Callable[[dict], None]] = None) -> list[dict]:
    """Returns one row per instance to destroy: id, label, age_h, reason, destroyed (confirmed), error.
    `credentials`: backend name -> that backend's credentials (what its `credentials` returned).

    `suspects` (label -> consecutive GONE verdicts so far) is updated in place to what the next pass
    needs: the labels judged GONE now and still alive. `first_seen` (str(instance id) -> epoch s) is
    updated in place to the instances listed now without a start date. The caller persists both
    (not on a dry run). `alarm` receives {backend, instance_id, label, age_h, verdict, message} for a machine
    past the age limit that is kept because its run is live or it is another installation's
    (default: `log` the message)."""
    now = now if now is not None else time.time()
    previous = dict(suspects or {})
    sighted = dict(first_seen or {})
    judged: dict[str, int] = {}
    seen_now: dict[str, float] = {}
    out = []
    found = [(b, lease) for b in registry.BACKENDS.values()
             for lease in b.find_instances(label_prefix, credentials.get(b.name), log=log)]
    for backend, lease in found:
        label = lease.label
        if lease.created_at:
            age_h = (now - lease.created_at) / 3600.0
        else:  # no start date (being created): age unknown, counted from the first sighting
            key = str(lease.instance_id)
            seen_now[key] = since = float(sighted.get(key, now))
            age_h = (now - since) / 3600.0
            log(f"instance {lease.instance_id} ({label}): no start date in its row (being created?); "
                f"aged from the reaper's first sighting: {age_h:.1f} h")
        verdict = None
        if run_status is not None:
            try:
                verdict = run_status(label)
            except Exception as e:  # cannot tell: keep it, age will decide later
                log(f"instance {lease.instance_id} ({label}): could not check its run ({type(e).__name__}); kept")
                verdict = UNKNOWN
        reason = None
        if verdict == GONE:
            count = int(previous.get(label, 0)) + 1
            judged[label] = count
            if count >= CONFIRMATIONS:
                reason = f"its run is gone ({count} checks in a row)"
            else:
                log(f"instance {lease.instance_id} ({label}): its run is gone (check {count} of "
                    f"{CONFIRMATIONS}); kept until the next check")
        if reason is None and age_h > max_age_hours:
            if verdict in (LIVE, FOREIGN):
                why = ("its run is live (it sends heartbeats)" if verdict == LIVE else
                       "it is another installation's machine (its own reaper judges it)")
                message = (f"instance {lease.instance_id} ({label}) is {age_h:.1f} h old, past the reaper's "
                           f"{max_age_hours:g} h, but {why}: kept, not destroyed by age. Check that run "
                           "(machine.step_timeout_s x attempts must stay under the reaper's limit)")
                (alarm or (lambda a: log(a["message"])))({"backend": backend.name, "instance_id": lease.instance_id,
                                                          "label": label, "age_h": round(age_h, 2),
                                                          "verdict": verdict, "message": message})
            else:
                reason = f"older than {max_age_hours:g} h"
        elif reason is None and verdict == FOREIGN:
            log(f"instance {lease.instance_id} ({label}): another installation's machine; kept (its own reaper "
                "judges it)")
        elif reason is None and verdict not in (None, GONE, ACTIVE, LIVE):
            log(f"instance {lease.instance_id} ({label}): its run cannot be judged; kept "
                f"(age decides: {age_h:.1f} of {max_age_hours:g} h)")
        if reason is None:
            continue
        entry = {"instance_id": lease.instance_id, "label": label, "age_h": round(age_h, 2), "reason": reason,
                 "destroyed": False, "error": None}
        if dry_run:
            log(f"[dry run] would destroy instance {entry['instance_id']} ({label}): {reason}")
        else:
            try:
                entry["destroyed"] = backend.release(lease, credentials.get(backend.name))
                log(f"destroyed instance {entry['instance_id']} ({label}): {reason}")
            except ProviderError as e:
                entry["error"] = str(e)
                log(f"could not destroy instance {entry['instance_id']} ({label}): {e}")
        if entry["destroyed"]:
            judged.pop(label, None)
            seen_now.pop(str(lease.instance_id), None)
        out.append(entry)
    if suspects is not None:
        suspects.clear()
        suspects.update(judged)
    if first_seen is not None:
        first_seen.clear()
        first_seen.update(seen_now)
    return out


def _credentials(url: Optional[str]) -> dict[str, Any]:
    """Every backend's own credentials from the environment; `url` stands for VAST_URL while they are read."""
    saved = os.environ.get("VAST_URL")
    if url:
        os.environ["VAST_URL"] = url
    try:
        return {b.name: b.credentials(no_secret_blocks) for b in registry.BACKENDS.values()}
    finally:
        if saved is None:
            os.environ.pop("VAST_URL", None)
        else:
            os.environ["VAST_URL"] = saved


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m infra.reaper", description=__doc__.split("\n\n")[0])
    p.add_argument("--max-age-hours", type=float, required=True, help="destroy labelled instances older than this")
    p.add_argument("--label-prefix", default="qat-", help="only instances whose label starts with this (default qat-)")
    p.add_argument("--dry-run", action="store_true", help="list what would be destroyed, destroy nothing")
    p.add_argument("--url", help="Vast.ai API endpoint (default: env VAST_URL, else the console)")
    args = p.parse_args(argv)
    if not args.label_prefix:
        p.error("--label-prefix must not be empty: the reaper only touches instances it labelled")
    try:  # each backend reads and checks its own credentials before any request, as for the flow
        credentials = _credentials(args.url)
        rows = reap_instances(credentials, max_age_hours=args.max_age_hours, label_prefix=args.label_prefix,
                              dry_run=args.dry_run)
    except ProviderError as e:
        print(f"reaper: {e}", file=sys.stderr)
        return 2
    failed = [r for r in rows if r["error"]]
    print(f"reaper: {len(rows)} instance(s) {'to destroy' if args.dry_run else 'reaped'}, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
