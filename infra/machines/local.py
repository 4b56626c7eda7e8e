"""`LocalMachine`: the Machine interface on this computer (backend `local`), plus the file
selection and tarball helpers that the SSH machine shares."""
from __future__ import annotations

import collections
import logging
import os
import re
import shutil
import signal
import subprocess
import tarfile
import tempfile
import threading
from pathlib import Path
from typing import IO, Callable, Mapping, Optional, Sequence

from .archive import (DEFAULT_ALLOW, MAX_BYTES, MAX_MEMBERS, UnsafeArchive, copy_capped,
                      extract_archive)
from .machine import CommandFailed, CommandTimeout, LineCallback, MachineError, build_command

log = logging.getLogger("qat.machine")

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
# What a step process on this machine inherits from the orchestrator's environment: the basics and what
# the workload reads (caches, offline switches, thread counts, GPUs). Nothing else: never VAST_API_KEY,
# HF_TOKEN, PREFECT_* or other credentials; a step gets only these plus the env passed to `run`.
STEP_ENV_NAMES = frozenset({
    "PATH", "HOME", "LANG", "LANGUAGE", "TMPDIR", "TZ", "TERM", "USER", "LOGNAME", "SHELL",
    "WHISPER_QAT_CACHE", "XDG_CACHE_HOME", "HF_HOME", "HF_HUB_CACHE", "HF_DATASETS_CACHE", "TRANSFORMERS_CACHE",
    "TORCH_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY",
    "TOKENIZERS_PARALLELISM", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
    "NUMEXPR_NUM_THREADS", "OMP_WAIT_POLICY", "CUDA_VISIBLE_DEVICES", "CUDA_HOME", "LD_LIBRARY_PATH",
    "PYTORCH_CUDA_ALLOC_CONF", "VIRTUAL_ENV",
})
STEP_ENV_PREFIXES = ("LC_", "TORCH_", "TORCHINDUCTOR_")


def step_environment(extra: Optional[Mapping[str, str]] = None, base: Optional[Mapping[str, str]] = None) -> dict:
    """The environment of a process run on the local machine: the names in STEP_ENV_NAMES (and
    STEP_ENV_PREFIXES) taken from `base` (default os.environ), then `extra` (the env passed to run)."""
    base = os.environ if base is None else base
    env = {k: v for k, v in base.items() if k in STEP_ENV_NAMES or k.startswith(STEP_ENV_PREFIXES)}
    env.setdefault("PATH", os.defpath)
    env.setdefault("LANG", "C.UTF-8")
    return {**env, **{k: str(v) for k, v in (extra or {}).items()}}
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


def _unpack_own_tarball(fileobj: IO[bytes], dest: Path) -> None:
    """Unpack a tarball WE made (LocalMachine.put) into dest, merged over what is there. Never for
    anything that comes from a machine: that goes through infra.archive.extract_archive."""
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=fileobj, mode="r:*") as tar:
        tar.extractall(dest, filter="data")


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


class LocalMachine:
    """This computer, rooted at `home` (relative paths resolve there)."""

    def __init__(self, home: Path, name: str = "local"):
        self.home = Path(home).resolve()
        self.home.mkdir(parents=True, exist_ok=True)
        self.name = name

    def _path(self, p: str | Path) -> Path:
        p = Path(os.path.expanduser(str(p))) if str(p).startswith("~/") else Path(p)
        return p if p.is_absolute() else self.home / p

    def run(self, argv: Sequence[str], *, env: Optional[Mapping[str, str]] = None, cwd: Optional[str] = None,
            on_line: Optional[LineCallback] = None, timeout: Optional[float] = None, check: bool = True) -> int:
        cmd = build_command(argv, None, str(self._path(cwd)) if cwd else None)  # env: not on the command line
        shown = masked_command(argv, env, cwd)
        log.debug("local run: %s", shown)
        full_env = step_environment(env)  # never the orchestrator's whole environment (its secrets)
        proc = subprocess.Popen(["/bin/sh", "-c", cmd], cwd=self.home, env=full_env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        timed_out = threading.Event()

        def kill() -> None:
            timed_out.set()
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                threading.Timer(5, lambda: _killpg(proc.pid, signal.SIGKILL)).start()
            except ProcessLookupError:
                pass

        timer = threading.Timer(timeout, kill) if timeout else None
        if timer:
            timer.daemon = True
            timer.start()
        lines = LineSplitter(on_line)
        try:
            assert proc.stdout is not None
            for chunk in iter(lambda: proc.stdout.read1(65536), b""):
                lines.feed(chunk)
            lines.flush()
            code = proc.wait()
        except BaseException:
            _killpg(proc.pid, signal.SIGKILL)
            raise
        finally:
            if timer:
                timer.cancel()
        if timed_out.is_set():
            raise CommandTimeout(shown, timeout or 0, lines.tail_text())
        if code != 0 and check:
            raise CommandFailed(shown, code, lines.tail_text())
        return code

    def put(self, local_dir: Path, remote_dir: str, *, include: Sequence[str],
            respect_gitignore: bool = True) -> int:
        files = collect_files(local_dir, include, respect_gitignore)
        with tempfile.TemporaryFile() as tmp:
            size = make_tarball(local_dir, files, tmp)
            _unpack_own_tarball(tmp, self._path(remote_dir))
        return size

    def get(self, remote_path: str, local_path: Path, *, max_bytes: int = MAX_BYTES,
            max_members: int = MAX_MEMBERS, allow: Optional[re.Pattern] = DEFAULT_ALLOW,
            exclude: Sequence[str] = (), on_bytes: Optional[Callable[[int], None]] = None) -> None:
        """As SSHMachine.get: a file is copied to local_path (at most max_bytes); a directory goes
        through the same checked archive as from a rented machine (infra.archive: no links, caps,
        names matching `allow`; top-level names in `exclude` stay behind) and replaces local_path."""
        src, dest = self._path(remote_path), Path(local_path)
        if not src.exists():
            raise MachineError(f"{self.name}: {remote_path} does not exist")
        if src.is_dir():
            with tempfile.TemporaryFile() as tmp:
                tar_tree(src, tmp, exclude)
                if on_bytes is not None:  # nothing crosses a network here: the archive's size stands for it
                    on_bytes(tmp.tell())
                extract_archive(tmp, dest, allow=allow, max_bytes=max_bytes, max_members=max_members, exclude=exclude)
        elif src.is_file():
            with open(src, "rb") as f:
                copy_capped(f, dest, max_bytes, remote_path)
        else:
            raise UnsafeArchive(remote_path, "not a regular file or a directory")

    def write_text(self, remote_path: str, text: str) -> None:
        p = self._path(remote_path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)

    def exists(self, remote_path: str) -> bool:
        return self._path(remote_path).exists()

    def free_disk_gb(self, remote_path: str = ".") -> float:
        p = self._path(remote_path)
        while not p.exists():
            p = p.parent
        return shutil.disk_usage(p).free / 1024**3

    def close(self) -> None:
        pass


def _killpg(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
