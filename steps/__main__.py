"""Command line for the on-machine steps: python -m steps <step> --config FILE --workdir DIR."""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from contract.catalogue import EXIT_DETERMINISTIC, STEPS, error_line
from contract.config import ConfigError, load_config

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
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        print(error_line(args.step, "ConfigError", str(e), False), flush=True)
        print(str(e), file=sys.stderr)
        return EXIT_DETERMINISTIC
    module = importlib.import_module(f"steps.{args.step}")
    return execute_step(args.step, cfg, args.workdir, module.run, resume=args.resume, force=args.force,
                        save_every=args.save_every)


if __name__ == "__main__":
    sys.exit(main())
