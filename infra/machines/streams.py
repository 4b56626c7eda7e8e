"""The byte streams between home and a machine, shared by both Machines (ssh.py, local.py): which
files are sent (git's view) and their tarball, a tar of a tree, a command's environment sent on stdin
(never on its command line), the output line splitter (lines cut, terminal escapes stripped), and
the capped, metered copies of what a machine sends."""
from __future__ import annotations

import collections
import os
import re
import subprocess
import tarfile
from pathlib import Path
from typing import IO, BinaryIO, Callable, Mapping, Optional, Sequence

from .archive import CHUNK, UnsafeArchive
from .machine import LineCallback, MachineError, build_command

# Reads NAME=value lines from stdin up to an empty line and exports them (values taken literally).
ENV_FROM_STDIN = 'while IFS= read -r __kv && [ -n "$__kv" ]; do export "$__kv"; done; unset __kv'


def env_lines(env: Optional[Mapping[str, str]]) -> bytes:
    """The stdin block ENV_FROM_STDIN reads: one NAME=value per line, then an empty line."""
    lines = []
    for k, v in (env or {}).items():
        v = str(v)
        if not k.isidentifier() or "\n" in v or "\0" in v:
            raise ValueError(f"environment variable {k!r}: names must be identifiers and values one line")
        lines.append(f"{k}={v}\n")
    return ("".join(lines) + "\n").encode()


TAIL_LINES = 60
# A line from a machine is shown up to MAX_LINE_BYTES; the rest is cut, with a note every CUT_NOTE_BYTES
# (each note is a line: on_line, and so the budget check, still runs while an endless line streams).
MAX_LINE_BYTES = 16 * 1024
CUT_NOTE_BYTES = 1024 * 1024
# Terminal escape sequences (CSI, OSC, other ESC sequences) and control characters but tab: never
# shown, so a machine cannot clear or retitle the worker's console, or hide text from the logs.
_ESCAPES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]?|\x9b[0-?]*[ -/]*[@-~]?"  # CSI (ESC [ or the 8-bit one)
                      r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?"  # OSC (a title, a hyperlink), to BEL or ST
                      r"|\x1b[ -/]*[0-~]?"  # any other escape sequence
                      r"|[\x00-\x08\x0a-\x1f\x7f-\x9f]")  # control characters but tab


def printable(text: str) -> str:
    """text without terminal escape sequences and control characters (tab kept)."""
    return _ESCAPES.sub("", text)


ALWAYS_SKIPPED = {"__pycache__", ".git", ".pytest_cache", ".hypothesis"}


def masked_command(argv: Sequence[str], env: Optional[Mapping[str, str]], cwd: Optional[str]) -> str:
    """The command line as it may be logged: env values replaced by ***."""
    return build_command(argv, {k: "***" for k in (env or {})}, cwd)


def _in_git_repo(path: Path) -> bool:
    try:
        r = subprocess.run(["git", "-C", str(path), "rev-parse", "--is-inside-work-tree"],
                           capture_output=True, text=True)
    except FileNotFoundError:  # no git installed: no checkout we can read
        return False
    return r.returncode == 0 and r.stdout.strip() == "true"


def _walk(root: Path, rel: str) -> list[str]:
    p = root / rel
    if p.is_file():
        return [rel]
    out = []
    for dirpath, dirnames, filenames in os.walk(p):
        dirnames[:] = sorted(d for d in dirnames if d not in ALWAYS_SKIPPED)
        for f in sorted(filenames):
            out.append(os.path.relpath(os.path.join(dirpath, f), root))
    return out


def collect_files(local_dir: Path, include: Sequence[str], respect_gitignore: bool = True) -> list[str]:
    """Relative paths of the files under local_dir named by `include` (files or folders).

    respect_gitignore=True (code): only the files git tracks (`git ls-files`): untracked files, ignored
    or not (a configs/.env, a fixtures/.netrc), stay home; outside a git checkout nothing can tell our
    code from a stray file, so MachineError says to run from a clone. False (run outputs): every file
    under the entries. Missing include entries are skipped."""
    local_dir = Path(local_dir).resolve()
    present = [i.strip("/") for i in include if (local_dir / i).exists()]
    if not present:
        return []
    if respect_gitignore:
        if not _in_git_repo(local_dir):
            raise MachineError(f"{local_dir} is not a git checkout (or git is not installed): the code sent to a "
                               "machine is what git tracks there; run from a clone of the repository")
        r = subprocess.run(["git", "-C", str(local_dir), "ls-files", "-z", "--cached", "--", *present],
                           capture_output=True)
        if r.returncode != 0:
            raise MachineError(f"git ls-files failed in {local_dir}: {r.stderr.decode(errors='replace').strip()}")
        files = {f for f in r.stdout.decode().split("\0") if f}
        return sorted(f for f in files if (local_dir / f).is_file()
                      and not ALWAYS_SKIPPED.intersection(Path(f).parts))
    files: set[str] = set()
    for rel in present:
        files.update(_walk(local_dir, rel))
    return sorted(files)


def make_tarball(local_dir: Path, files: Sequence[str], fileobj: IO[bytes]) -> int:
    """Write a tar.gz of `files` (relative to local_dir) into fileobj; returns its size in bytes."""
    with tarfile.open(fileobj=fileobj, mode="w:gz") as tar:
        for rel in files:
            tar.add(str(Path(local_dir) / rel), arcname=rel, recursive=False)
    size = fileobj.tell()
    fileobj.seek(0)
    return size


def tar_tree(root: Path, fileobj: IO[bytes], exclude: Sequence[str] = ()) -> None:
    """A tar of root's contents as `tar -C root .` makes it: links stay links (never followed);
    top-level names in `exclude` are left out."""
    with tarfile.open(fileobj=fileobj, mode="w") as tar:
        for name in sorted(set(os.listdir(root)) - set(exclude)):
            tar.add(os.path.join(root, name), arcname=name, recursive=True)
    fileobj.seek(0)


class LineSplitter:
    """Bytes in, lines out, in time linear in the bytes: a carriage return keeps only what follows
    it (like a terminal); a line is shown up to max_line bytes, the rest is cut and noted (a note line
    every CUT_NOTE_BYTES and at its end); escape sequences and control characters are stripped."""

    def __init__(self, on_line: Optional[LineCallback], tail_lines: int = TAIL_LINES, hidden_prefix: str = "",
                 max_line: int = MAX_LINE_BYTES):
        self.on_line, self.hidden_prefix, self.max_line = on_line, hidden_prefix, max_line
        self.parts: list[bytes] = []  # the current line so far (at most max_line bytes, and a \r)
        self.size = 0
        self.cut = 0  # bytes of the current line not shown (it went past max_line)
        self.noted = 0  # of which a note already told
        self.hidden: list[str] = []  # lines starting with hidden_prefix: neither shown nor in the tail
        self.tail: collections.deque[str] = collections.deque(maxlen=tail_lines)

    def feed(self, data: bytes) -> None:
        start = 0
        while True:
            end = data.find(b"\n", start)
            self._take(data[start:] if end < 0 else data[start:end])
            if end < 0:
                return
            self._end_line()
            start = end + 1

    def flush(self) -> None:
        if self.size or self.cut:
            self._end_line()

    def _take(self, seg: bytes) -> None:
        """Add seg (no newline in it) to the current line."""
        if not seg:
            return
        if self.parts and self.parts[-1].endswith(b"\r"):  # a \r not followed by \n: overwritten
            self._restart()
        cr = seg.rfind(b"\r", 0, len(seg) - 1)
        if cr >= 0:  # what came before the last \r (not the final byte: maybe \r\n) is overwritten
            self._restart()
            seg = seg[cr + 1:]
        if self.cut:
            self.cut += len(seg)
        else:
            self.parts.append(seg)
            self.size += len(seg)
            if self.size > self.max_line + 1:  # + 1: room for a final \r
                whole = b"".join(self.parts)
                self._emit(whole[:self.max_line], f" [line cut: over {self.max_line} bytes without a newline]")
                self.parts, self.size, self.cut = [], 0, len(whole) - self.max_line
        if self.cut - self.noted >= CUT_NOTE_BYTES:
            self.noted = self.cut
            self._emit(b"", f"[the line goes on: {self.cut} bytes cut so far]")

    def _restart(self) -> None:
        if self.cut:
            self._end_line()
        self.parts, self.size = [], 0

    def _end_line(self) -> None:
        if self.cut:
            if self.cut > self.noted:
                self._emit(b"", f"[end of a cut line: {self.cut} bytes were not shown]")
        else:
            self._emit(b"".join(self.parts).rstrip(b"\r"))
        self.parts, self.size, self.cut, self.noted = [], 0, 0, 0

    def _emit(self, raw: bytes, note: str = "") -> None:
        line = printable(raw.decode("utf-8", errors="replace")) + note
        if self.hidden_prefix and line.startswith(self.hidden_prefix):
            self.hidden.append(line)
            return
        self.tail.append(line)
        if self.on_line is not None:
            self.on_line(line)

    def tail_text(self) -> str:
        return "\n".join(self.tail)


class CappedWriter:
    """A write-only file wrapper that refuses more than `cap` bytes (a machine could send forever)."""

    def __init__(self, out, cap: int, label: str, on_bytes: Optional[Callable[[int], None]] = None):
        self.out, self.cap, self.label, self.n, self.on_bytes = out, cap, label, 0, on_bytes

    def write(self, data: bytes) -> int:
        self.n += len(data)
        if self.on_bytes is not None:  # billed as it arrives; it raises to abort the transfer
            self.on_bytes(len(data))
        if self.n > self.cap:
            raise UnsafeArchive(self.label, f"the machine sent more than {self.cap} bytes for it")
        return self.out.write(data)


class MeteredReader:
    """A readable file whose reads are reported to `on_bytes` (which may raise to stop the copy)."""

    def __init__(self, f, on_bytes: Callable[[int], None]):
        self.f, self.on_bytes = f, on_bytes

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        if data:
            self.on_bytes(len(data))
        return data


def copy_capped(src: BinaryIO, dest: Path, max_bytes: int, label: str) -> int:
    """Copy one file's bytes from a machine to dest (via dest.partial, then renamed), refusing more
    than max_bytes. Returns the bytes copied."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".partial")
    partial.unlink(missing_ok=True)
    written = 0
    try:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
        with os.fdopen(fd, "wb") as out:
            while True:
                chunk = src.read(CHUNK)
                if not chunk:
                    break
                written += len(chunk)
                if written > max_bytes:
                    raise UnsafeArchive(label, f"larger than the cap of {max_bytes} bytes")
                out.write(chunk)
        os.replace(partial, dest)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return written
