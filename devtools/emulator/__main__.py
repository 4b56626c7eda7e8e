"""python -m devtools.emulator --port PORT [--state-dir DIR] [--api-key KEY] [--boot-seconds S] [--fault K=V ...]

Runs the offline Vast.ai emulator until SIGINT/SIGTERM or POST /_emulator/shutdown. See
devtools/emulator/README.md for the API, the instance model and the fault knobs.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from pathlib import Path

from devtools.emulator.cloud import ApiError, Cloud
from devtools.emulator.server import EmulatorServer


def _fault(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--fault wants KEY=VALUE (e.g. http_429=2), got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value  # bare strings: preempt_mode=vanish, malformed=html


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m devtools.emulator", description="Offline Vast.ai API emulator.")
    ap.add_argument("--port", type=int, default=8765, help="port on 127.0.0.1 (0: any free port)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--state-dir", default=os.path.expanduser("~/.cache/vast-emulator"),
                    help="SQLite state and instance disks (survives restarts)")
    ap.add_argument("--api-key", default=os.environ.get("VAST_EMULATOR_KEY", "emulator-key"),
                    help="the only key accepted (default: $VAST_EMULATOR_KEY or 'emulator-key')")
    ap.add_argument("--boot-seconds", type=float, default=3.0, help="created -> running takes this long")
    ap.add_argument("--credit", type=float, default=50.0, help="starting account balance in $")
    ap.add_argument("--fault", type=_fault, action="append", default=[], metavar="KEY=VALUE",
                    help="global fault knob, repeatable: stuck_loading=true ssh_refuse_s=5 http_429=3 "
                         "preempt_after_s=10 preempt_mode=vanish destroy_fail_once=true disk_full_mb=20 "
                         "malformed=html malformed_count=2")
    ap.add_argument("--keep-instances-on-exit", action="store_true",
                    help="on SIGTERM/SIGINT leave instances' sshd running (a restart picks them up)")
    args = ap.parse_args(argv)

    cloud = Cloud(Path(args.state_dir), boot_seconds=args.boot_seconds, credit=args.credit)
    if args.fault:
        try:
            cloud.set_faults(dict(args.fault))
        except ApiError as e:
            ap.error(e.msg)
    server = EmulatorServer((args.host, args.port), cloud, args.api_key)
    cloud.start()
    done = threading.Event()

    def stop(kill_instances: bool) -> None:
        if done.is_set():
            return
        done.set()
        cloud.shutdown(kill_instances=kill_instances)
        server.shutdown()

    server.on_shutdown = stop
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: threading.Thread(target=stop, args=(not args.keep_instances_on_exit,)).start())
    url = f"http://{args.host}:{server.server_address[1]}"
    print(f"EMULATOR_READY {url} state={args.state_dir}", flush=True)
    try:
        server.serve_forever(poll_interval=0.1)
    finally:
        server.server_close()
        cloud.store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
