"""`SSHMachine`: the Machine interface over paramiko (a Vast.ai instance or any SSH host).

- connect: retried with exponential backoff until SSH answers or the deadline passes
- host key: pinned on the first connection (kept in the Lease), a changed key is refused. When the
  lease carries fingerprints from a second channel (a Vast.ai instance prints its host keys in its
  log, read over the HTTPS API: infra/backends/vast/hostkeys.py), the first connection accepts only a key among them
  ("provider log"); otherwise the first key seen is trusted ("first use", an SSH host of the user's)
- idempotent operations (put/get/exists/free_disk/write_text) reconnect once after a drop;
  `run` never retries itself (the caller decides), it raises TransientMachineError instead
- env values are never logged: the logged command line masks them
"""
from __future__ import annotations

import logging
import posixpath
import re
import shlex
import socket
import stat
import tempfile
import time
import uuid
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence, TypeVar

import paramiko

from .archive import DEFAULT_ALLOW, MAX_BYTES, MAX_MEMBERS, UnsafeArchive, extract_archive
from .machine import (CommandFailed, CommandTimeout, Lease, LineCallback, MachineError,
                      TransientMachineError)
from .ssh_host_keys import HostKeyChanged, PinHostKey, host_key_string, parse_host_key
from .streams import (ENV_FROM_STDIN, CappedWriter, LineSplitter, MeteredReader, collect_files, copy_capped,
                      env_lines, make_tarball, masked_command)

log = logging.getLogger("qat.machine")
T = TypeVar("T")

PID_MARK = "__QAT_PID__"
KEEPALIVE_S = 15
# What a dropped or refused connection looks like to paramiko and the socket layer.
NETWORK_ERRORS = (paramiko.SSHException, socket.error, EOFError, ConnectionError)


class SSHUnreachable(TransientMachineError):
    """SSH did not answer before the connect deadline."""


class SSHMachine:
    """A host reached over SSH with a private key. `lease.host_key` is set on first connect."""

    def __init__(self, lease: Lease, connect_timeout: float = 300.0, keepalive_s: int = KEEPALIVE_S):
        if not (lease.host and lease.port and lease.key_path):
            raise MachineError(f"lease {lease.label!r} has no SSH endpoint (host, port, key_path): "
                               "was the machine provisioned?")
        self.lease = lease
        self.name = f"{lease.user}@{lease.host}:{lease.port}"
        self.connect_timeout = connect_timeout
        self.keepalive_s = keepalive_s
        self._client: Optional[paramiko.SSHClient] = None
        self._sftp: Optional[paramiko.SFTPClient] = None

    # -- connection -----------------------------------------------------------------------------
    def connect(self, timeout: Optional[float] = None) -> "SSHMachine":
        """Connect, retrying with backoff (1 s, 2 s, 4 s ... 15 s) until `timeout` seconds passed."""
        deadline = time.monotonic() + (timeout if timeout is not None else self.connect_timeout)
        delay, attempt, last = 1.0, 0, None
        pkey = self._load_key()
        # Vast offers a direct port and a proxy: alternate between them until one answers.
        endpoints = [(self.lease.host, self.lease.port)] + [
            (str(h), int(p)) for h, p in self.lease.ssh_alternatives if (h, p) != (self.lease.host, self.lease.port)]
        while True:
            attempt += 1
            host, port = endpoints[(attempt - 1) % len(endpoints)]
            try:
                self._client = self._open(pkey, min(30.0, max(1.0, deadline - time.monotonic())), host, int(port))
                if (host, port) != (self.lease.host, self.lease.port):
                    log.info("ssh %s did not answer, %s:%s did: using it", self.name, host, port)
                    self.lease.host, self.lease.port = host, port
                    self.name = f"{self.lease.user}@{host}:{port}"
                if attempt > 1:
                    log.info("ssh %s answered after %d attempts", self.name, attempt)
                return self
            except HostKeyChanged:
                raise
            except paramiko.BadHostKeyException as e:
                raise HostKeyChanged(
                    f"{self.name} answered with host key {host_key_string(e.key)[:40]}..., not the one pinned on first "
                    "connect: refusing to talk to it (the machine was replaced or the connection is intercepted). "
                    "Release this lease and rent a new machine.") from None
            except (paramiko.AuthenticationException, *NETWORK_ERRORS) as e:
                last = e  # sshd not up yet, or the key not yet installed: both arrive late on Vast
            left = deadline - time.monotonic()
            if left <= 0:
                raise SSHUnreachable(
                    f"ssh {self.name} did not answer within {self.connect_timeout if timeout is None else timeout:.0f}s "
                    f"({attempt} attempts); last error: {type(last).__name__}: {last}")
            log.debug("ssh %s not ready (%s), retrying in %.0fs", self.name, type(last).__name__, delay)
            time.sleep(min(delay, left))
            delay = min(delay * 2, 15.0)

    def _load_key(self) -> paramiko.PKey:
        try:
            return paramiko.PKey.from_path(self.lease.key_path)
        except (OSError, paramiko.SSHException) as e:
            raise MachineError(f"cannot read the SSH private key {self.lease.key_path}: {e}") from None

    def _open(self, pkey: paramiko.PKey, timeout: float, host: str, port: int) -> paramiko.SSHClient:
        client = paramiko.SSHClient()
        policy = PinHostKey(self.lease.host_key, self.lease.host_key_fingerprints)
        client.set_missing_host_key_policy(policy)
        if self.lease.host_key:
            key = parse_host_key(self.lease.host_key)
            name = host if port == 22 else f"[{host}]:{port}"
            client.get_host_keys().add(name, key.get_name(), key)
        try:
            client.connect(host, port=port, username=self.lease.user, pkey=pkey,
                           timeout=timeout, banner_timeout=timeout, auth_timeout=timeout,
                           allow_agent=False, look_for_keys=False)
        except BaseException:
            client.close()
            raise
        if policy.seen and not self.lease.host_key:
            self.lease.host_key = policy.seen
            self.lease.host_key_source = "provider log" if policy.fingerprints else "first use"
            log.info("ssh %s: host key pinned (%s, from %s)", self.name, policy.seen.split()[0],
                     self.lease.host_key_source)
        transport = client.get_transport()
        if transport is not None:
            transport.set_keepalive(self.keepalive_s)
        return client

    @property
    def connected(self) -> bool:
        t = self._client.get_transport() if self._client else None
        return bool(t and t.is_active())

    def _transport(self) -> paramiko.Transport:
        if not self.connected:
            self._drop()
            self.connect()
        assert self._client is not None
        t = self._client.get_transport()
        assert t is not None
        return t

    def _drop(self) -> None:
        for obj in (self._sftp, self._client):
            try:
                if obj is not None:
                    obj.close()
            except Exception:
                pass
        self._sftp = self._client = None

    def _sftp_client(self) -> paramiko.SFTPClient:
        if self._sftp is None or not self.connected:
            t = self._transport()
            self._sftp = paramiko.SFTPClient.from_transport(t)
        return self._sftp

    def _idempotent(self, what: str, fn: Callable[[], T], attempts: int = 3) -> T:
        """Run fn, reconnecting and retrying after a dropped connection (safe: fn is idempotent)."""
        for i in range(attempts):
            try:
                return fn()
            except (HostKeyChanged, SSHUnreachable, CommandTimeout):
                raise  # a reconnect already waited its whole deadline, or retrying cannot help
            except (*NETWORK_ERRORS, TransientMachineError) as e:
                self._drop()
                if i == attempts - 1:
                    raise TransientMachineError(f"ssh {self.name}: {what} failed after {attempts} tries: "
                                                f"{type(e).__name__}: {e}") from None
                log.warning("ssh %s: connection lost during %s (%s), reconnecting", self.name, what, type(e).__name__)
                time.sleep(min(2.0 ** i, 5.0))
        raise AssertionError("unreachable")

    # -- commands -------------------------------------------------------------------------------
    def run(self, argv: Sequence[str], *, env: Optional[Mapping[str, str]] = None, cwd: Optional[str] = None,
            on_line: Optional[LineCallback] = None, timeout: Optional[float] = None, check: bool = True) -> int:
        shown = masked_command(argv, env, cwd)
        log.debug("ssh %s run: %s", self.name, shown)
        prefix = f"cd {shlex.quote(cwd)} && " if cwd else ""
        # The remote shell leads its own session (sshd calls setsid): a timeout kills its process
        # group. No `exec`, so a command killed by a signal still reports an exit code (128+N).
        # env values travel on stdin, not in the command line: they never show in `ps` on the machine.
        cmd = f"echo {PID_MARK}$$; {ENV_FROM_STDIN}; {prefix}{shlex.join(argv)} 2>&1"
        env_block = env_lines(env)
        try:
            chan = self._transport().open_session()
        except NETWORK_ERRORS as e:
            self._drop()
            raise TransientMachineError(f"ssh {self.name}: could not open a channel: {type(e).__name__}: {e}") from None
        lines = LineSplitter(on_line, hidden_prefix=PID_MARK)
        deadline = time.monotonic() + timeout if timeout else None
        try:
            chan.set_combine_stderr(True)
            chan.settimeout(0.5)
            chan.exec_command(cmd)
            chan.sendall(env_block)
            chan.shutdown_write()
            while True:
                try:
                    data = chan.recv(65536)
                except socket.timeout:
                    data = None
                if data:
                    lines.feed(data)
                elif data == b"":
                    break
                if deadline and time.monotonic() > deadline:
                    self._kill_group(self._await_pid(chan, lines))
                    lines.flush()
                    raise CommandTimeout(shown, timeout or 0, lines.tail_text())
                if data is None and not self.connected:
                    break
            lines.flush()
            if not chan.exit_status_ready() and not self.connected:
                raise TransientMachineError(f"ssh {self.name}: connection lost while running: {shown}\n"
                                            f"--- last output ---\n{lines.tail_text()}")
            code = chan.recv_exit_status()
        except NETWORK_ERRORS as e:
            self._drop()
            raise TransientMachineError(f"ssh {self.name}: connection lost while running: {shown} "
                                        f"({type(e).__name__}: {e})\n--- last output ---\n{lines.tail_text()}") from None
        finally:
            chan.close()
        if code == -1:  # no exit status: the channel closed under us
            self._drop()
            raise TransientMachineError(f"ssh {self.name}: no exit status (connection dropped?) for: {shown}")
        if code != 0 and check:
            raise CommandFailed(shown, code, lines.tail_text())
        return code

    @staticmethod
    def _await_pid(chan: paramiko.Channel, lines: LineSplitter, wait_s: float = 15.0) -> int:
        """The remote shell's pid (its first line); on a slow machine it may not have arrived yet."""
        end = time.monotonic() + wait_s
        while not lines.hidden and time.monotonic() < end and not chan.closed:
            try:
                data = chan.recv(65536)
            except socket.timeout:
                continue
            if not data:
                break
            lines.feed(data)
        pid = lines.hidden[0][len(PID_MARK):] if lines.hidden else ""
        return int(pid) if pid.isdigit() else 0

    def _kill_group(self, pid: int) -> None:
        if pid <= 1:
            return
        try:
            # TERM now; KILL in 5 s from a detached helper, so we need not wait (zombies may linger).
            self._exec(f"kill -TERM -- -{pid} 2>/dev/null; (sleep 5; kill -KILL -- -{pid}) </dev/null >/dev/null 2>&1 & true")
        except Exception as e:  # best effort: the caller is told about the timeout anyway
            log.warning("ssh %s: could not kill timed-out process group %d: %s", self.name, pid, e)

    def _exec(self, cmd: str, stdout_to: Optional[object] = None) -> tuple[int, str]:
        """Run a short internal command; returns (exit code, output). Raises on network errors."""
        chan = self._transport().open_session()
        try:
            chan.exec_command(cmd)
            out = bytearray()
            while True:
                data = chan.recv(65536)
                if not data:
                    break
                if stdout_to is not None:
                    stdout_to.write(data)  # type: ignore[attr-defined]
                else:
                    out += data
            err = chan.recv_stderr(65536) if chan.recv_stderr_ready() else b""
            code = chan.recv_exit_status()
            if code == -1:
                raise EOFError("channel closed without an exit status")
            return code, (bytes(out) + err).decode("utf-8", errors="replace")
        finally:
            chan.close()

    # -- files ----------------------------------------------------------------------------------
    def put(self, local_dir: Path, remote_dir: str, *, include: Sequence[str],
            respect_gitignore: bool = True) -> int:
        """One tar.gz of the selected files, uploaded over SFTP and unpacked into remote_dir
        (merged over what is there). Returns the archive's bytes."""
        files = collect_files(local_dir, include, respect_gitignore)
        with tempfile.TemporaryFile() as tmp:
            size = make_tarball(local_dir, files, tmp)
            remote_tar = f".qat-upload-{uuid.uuid4().hex[:12]}.tar.gz"

            def send() -> None:
                tmp.seek(0)
                self._sftp_client().putfo(tmp, remote_tar, file_size=size, confirm=True)
                q = shlex.quote(remote_dir)
                code, out = self._exec(f"mkdir -p {q} && tar -xzf {remote_tar} -C {q} --no-same-owner; "
                                       f"rc=$?; rm -f {remote_tar}; exit $rc")
                if code != 0:
                    raise MachineError(f"ssh {self.name}: unpacking into {remote_dir} failed (exit {code}): {out.strip()}")

            self._idempotent(f"put {local_dir} -> {remote_dir}", send)
        log.info("ssh %s: put %d files (%.1f MB) into %s", self.name, len(files), size / 1e6, remote_dir)
        return size

    def get(self, remote_path: str, local_path: Path, *, max_bytes: int = MAX_BYTES,
            max_members: int = MAX_MEMBERS, allow: Optional[re.Pattern] = DEFAULT_ALLOW,
            exclude: Sequence[str] = (), on_bytes: Optional[Callable[[int], None]] = None) -> None:
        """A file is copied to local_path (at most max_bytes); a directory's contents (less the
        top-level names in `exclude`, which stay on the machine: the remote tar leaves them out and
        the archive check drops them if it did not) replace local_path. The machine is untrusted: a directory comes as a tar that infra/machines/archive.py checks
        member by member (regular files and directories only, names inside local_path and matching
        `allow`, at most max_members members and max_bytes bytes) before anything lands; a refusal
        raises UnsafeArchive (never retried) and leaves local_path as it was. `on_bytes(n)` is called
        with each chunk's size as it arrives over the wire (what bandwidth bills); an exception it
        raises aborts the transfer."""
        local_path = Path(local_path)
        q = shlex.quote(remote_path)
        # the compressed stream may exceed the content by its headers (and gzip's few bytes per block)
        stream_cap = max_bytes + max_bytes // 500 + (max_members + 2) * 8192 + 1024 * 1024

        def fetch_file(st: paramiko.SFTPAttributes) -> None:
            if (st.st_size or 0) > max_bytes:
                raise UnsafeArchive(remote_path, f"{st.st_size} bytes, over the cap of {max_bytes}")
            with self._sftp_client().open(remote_path, "rb") as f:
                if st.st_size:
                    f.prefetch(st.st_size)
                copy_capped(MeteredReader(f, on_bytes) if on_bytes else f, local_path, max_bytes, remote_path)

        def fetch_tar(tmp) -> None:
            tmp.seek(0)
            tmp.truncate()
            skip = "".join(f" --exclude={shlex.quote('./' + name)}" for name in exclude)
            code, err = self._exec(f"tar -czf - -C {q} --anchored{skip} .", stdout_to=CappedWriter(tmp, stream_cap, remote_path, on_bytes))
            if code != 0:
                raise MachineError(f"ssh {self.name}: tar of {remote_path} failed (exit {code}): {err.strip()}")

        st = self._idempotent(f"stat {remote_path}", lambda: self._stat(remote_path))
        if st is None:
            raise MachineError(f"ssh {self.name}: {remote_path} does not exist")
        if stat.S_ISREG(st.st_mode or 0):
            self._idempotent(f"get {remote_path}", lambda: fetch_file(st))
        elif stat.S_ISDIR(st.st_mode or 0):
            with tempfile.TemporaryFile() as tmp:
                self._idempotent(f"get {remote_path}", lambda: fetch_tar(tmp))
                tmp.seek(0)
                # local work, outside the retry loop: a refusal or a full local disk is not a dropped link
                extract_archive(tmp, local_path, allow=allow, max_bytes=max_bytes, max_members=max_members,
                                exclude=exclude)
        else:
            raise UnsafeArchive(remote_path, "not a regular file or a directory")

    def _stat(self, remote_path: str) -> Optional[paramiko.SFTPAttributes]:
        try:
            return self._sftp_client().stat(remote_path)
        except FileNotFoundError:
            return None

    def write_text(self, remote_path: str, text: str) -> None:
        def write() -> None:
            sftp, parts, path = self._sftp_client(), posixpath.dirname(remote_path).split("/"), ""
            for part in parts:  # mkdir -p over SFTP
                path = posixpath.join(path, part) if path else (part or "/")
                if part and self._stat(path) is None:
                    sftp.mkdir(path)
            with sftp.open(remote_path, "w") as f:
                f.write(text.encode())

        self._idempotent(f"write {remote_path}", write)

    def exists(self, remote_path: str) -> bool:
        return self._idempotent(f"exists {remote_path}", lambda: self._stat(remote_path) is not None)

    def free_disk_gb(self, remote_path: str = ".") -> float:
        def df() -> float:
            # the nearest existing parent, so a folder not yet created still has an answer
            code, out = self._exec(f"p={shlex.quote(remote_path)}; while [ ! -e \"$p\" ]; do "
                                   f"p=$(dirname \"$p\"); done; df -Pk \"$p\"")
            rows = [r.split() for r in out.strip().splitlines()]
            if code != 0 or len(rows) < 2 or len(rows[-1]) < 4 or not rows[-1][3].isdigit():
                raise MachineError(f"ssh {self.name}: df -Pk {remote_path} failed (exit {code}): {out.strip()[:200]}")
            return int(rows[-1][3]) / 1024**2

        return self._idempotent(f"free_disk_gb {remote_path}", df)

    def close(self) -> None:
        self._drop()

    def __enter__(self) -> "SSHMachine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
