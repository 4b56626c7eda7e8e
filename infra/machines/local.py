"""`LocalMachine`: the Machine interface on this computer (backend `local`); the file selection,
tarball and line helpers it shares with the SSH machine are in streams.py."""
from __future__ import annotations

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

from .archive import (DEFAULT_ALLOW, MAX_BYTES, MAX_MEMBERS, UnsafeArchive,
                      extract_archive)
from .machine import CommandFailed, CommandTimeout, LineCallback, MachineError, build_command
from .streams import LineSplitter, collect_files, copy_capped, make_tarball, masked_command, tar_tree

log = logging.getLogger("qat.machine")

# What a step process on this machine inherits from the orchestrator's environment: the basics and what
# the steps read (caches, offline switches, thread counts, GPUs). Nothing else: never VAST_API_KEY,
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
def _unpack_own_tarball(fileobj: IO[bytes], dest: Path) -> None:
    """Unpack a tarball WE made (LocalMachine.put) into dest, merged over what is there. Never for
    anything that comes from a machine: that goes through infra/machines/archive.py extract_archive."""
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=fileobj, mode="r:*") as tar:
        tar.extractall(dest, filter="data")


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
        through the same checked archive as from a rented machine (infra/machines/archive.py: no links, caps,
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
