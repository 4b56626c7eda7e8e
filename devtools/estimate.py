"""The pre-rent estimate of a config on the emulator's offers, as the flow's `estimate cost` task logs it:

    python -m devtools.estimate [CONFIG] [key=value ...]     (default: int8)

Starts a throwaway Vast.ai emulator, asks the product for its estimate (infra/backends/vast/backend.py
price_estimate: the offer it would rent, every step's hours and bytes, the offers the market
filters left out; the disk the run needs) and prints the table; says whether machine.max_cost_usd would refuse it.
"""
from __future__ import annotations

import sys

from contract.config import load_config
from devtools.emulator.testing import EmulatorProcess
from infra.backends.vast.credentials import VastCredentials
from tasks.rental import estimate_table, pre_rent_estimate


def main(argv: list[str]) -> int:
    name = argv[0] if argv and "=" not in argv[0] else "int8"
    overrides = dict(a.split("=", 1) for a in argv if "=" in a)
    cfg = load_config(name, overrides)
    emu = EmulatorProcess().start()
    try:
        est = pre_rent_estimate(cfg, VastCredentials(emu.api_key, emu.url))
    finally:
        emu.cleanup()
    print(f"{name} on offer {est['offer_id']} ({est['gpu_name']}, ${est['dph']:.4f}/h, "
          f"${est.get('inet_up_cost', 0):g}/GB up, ${est.get('inet_down_cost', 0):g}/GB down; "
          f"{est['offers']} offer(s) matched); the market filters left out {est['left_out']}")
    print(estimate_table(est) or f"{est['basis']}: ${est['estimated_usd']}")
    if est.get("clock"):
        print(f"train clock: {est['clock']}")
    over = est["estimated_usd"] > cfg.machine.max_cost_usd
    print(f"estimated ${est['estimated_usd']:.2f} vs machine.max_cost_usd ${cfg.machine.max_cost_usd:.2f}: "
          f"{'REFUSED before renting' if over else 'accepted'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
