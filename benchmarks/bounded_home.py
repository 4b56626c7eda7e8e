"""CPU time of the home side on two hostile inputs (issue 19 findings 4 and 7):

- the archive check (infra/machines/archive.py extract_archive) on 200 files at depth 900 (one deep
  directory chain, a file per member at its bottom), and at depth 32 (infra/machines/archive.py MAX_DEPTH);
- the line splitter (infra/machines/streams.py LineSplitter) on 32 MB without a newline, fed in 64 KiB chunks
  as SSHMachine.run receives them.

    python -m benchmarks.bounded_home

Prints one line per case: the CPU seconds (time.process_time) and the outcome."""
from __future__ import annotations

import io
import tarfile
import tempfile
import time
from pathlib import Path


def deep_archive(members: int = 200, depth: int = 900) -> io.BytesIO:
    buf = io.BytesIO()
    chain = "/".join(["d"] * (depth - 1))
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for i in range(members):
            ti = tarfile.TarInfo(f"{chain}/f{i}")
            ti.size = 1
            tar.addfile(ti, io.BytesIO(b"x"))
    buf.seek(0)
    return buf


def archive_case(depth: int) -> str:
    from infra.machines.archive import extract_archive

    src = deep_archive(200, depth)
    with tempfile.TemporaryDirectory() as d:
        t0 = time.process_time()
        try:
            extract_archive(src, Path(d) / "dest")
            outcome = "extracted"
        except Exception as e:  # noqa: BLE001 - the outcome is what we report
            outcome = f"{type(e).__name__}: {str(e)[-80:]}"
        cpu = time.process_time() - t0
        left = sorted(p.name for p in Path(d).iterdir())
    return f"archive 200 members at depth {depth}: {cpu:.3f} s CPU; {outcome}; left in its folder: {left}"


def splitter_case(megabytes: int = 32) -> str:
    from infra.machines.streams import LineSplitter

    calls: list[int] = []
    s = LineSplitter(lambda line: calls.append(len(line)))
    chunk = b"x" * 65536
    t0 = time.process_time()
    for _ in range(megabytes * 1024 * 1024 // len(chunk)):
        s.feed(chunk)
    s.flush()
    cpu = time.process_time() - t0
    return f"splitter {megabytes} MB without a newline: {cpu:.3f} s CPU; on_line called {len(calls)} times"


if __name__ == "__main__":
    print(archive_case(900), flush=True)
    print(archive_case(32), flush=True)
    print(splitter_case(), flush=True)
