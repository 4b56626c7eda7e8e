"""Command line for the on-machine steps: python -m steps <step> --config FILE --workdir DIR."""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from contract.catalogue import EXIT_DETERMINISTIC, STEPS, error_line
from contract.config import ConfigError, load_config

from . import distributed
from .common import execute_step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m steps", description=__doc__)
    parser.add_argument("step", choices=STEPS)
    parser.add_argument("--config", required=True, help="config name (configs/<name>.yaml) or path")
    parser.add_argument("--workdir", required=True, type=Path, help="where every step reads and writes")
    parser.add_argument("--resume", action="store_true", help="train: continue from the latest checkpoint")
    parser.add_argument("--force", action="store_true", help="run even if outputs exist for this config")
    parser.add_argument("--save-every", type=int, default=None, help="train: checkpoint at least this often "
                        "(optimizer steps), below train.save_every; set by the orchestrator from the GPU's expected "
                        "speed, not part of the config hash")
    # Not --nproc: torchrun, which gets these arguments after `-m steps`, would read it as its own --nproc-per-node.
    parser.add_argument("--cpu-ranks", type=int, default=None, help="train with machine.gpu none: this many CPU "
                        "processes instead of train.nproc; set by the orchestrator to the GPUs the machine lists (the "
                        "emulator's N-GPU offers), not part of the config hash")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, {"train.nproc": args.cpu_ranks} if args.cpu_ranks is not None else None)
    except ConfigError as e:
        print(error_line(args.step, "ConfigError", str(e), False), flush=True)
        print(str(e), file=sys.stderr)
        return EXIT_DETERMINISTIC
    if args.step == "train" and not distributed.under_torchrun():
        n = distributed.world_size_for(cfg)
        if n > 1:  # torchrun runs this same command line in n processes (steps/distributed.py)
            return distributed.launch(sys.argv[1:] if argv is None else argv, n, args.workdir / args.step)
    module = importlib.import_module(f"steps.{args.step}")
    return execute_step(args.step, cfg, args.workdir, module.run, resume=args.resume, force=args.force,
                        save_every=args.save_every)


if __name__ == "__main__":
    sys.exit(main())
