"""Real OpenSSH servers for emulated instances: one sshd per instance, on loopback.

Layout of an sshd root directory (`root`):

    root/disk/                 the instance disk: HOME and cwd of every login, exec and SFTP
    root/disk/.ssh/authorized_keys   the only keys sshd accepts (written by onstart / attach_ssh)
    root/etc/sshd_config, root/etc/login.sh
    root/etc/ssh/ssh_host_ed25519_key(.pub)  the host key: the image's /etc/ssh (no container, so the
                               image's /etc is root/etc, exported as VAST_EMULATED_ETC to its processes)
    root/evil/bin/tar          only while the `evil` fault knob is set (cloud.py): first on PATH
    root/sshd.log, root/sshd.pid

Every command (exec, shell, SFTP) goes through `login.sh` (sshd ForceCommand), which sets
HOME and cwd to the disk and `VAST_EMULATED=1`. On an emulated instance, PATH is the minimal one
plus what onstart wrote to the image's /etc/environment (`root/etc/environment`), and commands
run only once `~/.no_auto_tmux` exists (`_write_login_script`); on a plain host (`sshd_host`), the
directory of the python that runs the emulator comes first on PATH.
"""
from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

SSHD = "/usr/sbin/sshd"
SFTP_SERVER = "/usr/lib/openssh/sftp-server"
ROOT_MARKER = "VAST_EMULATOR_ROOT"  # in the environment of every process run on an instance
ETC_VAR = "VAST_EMULATED_ETC"  # the image's /etc as this no-container emulator lays it out (root/etc)
PROC_VAR = "VAST_EMULATED_PROC"  # the container's /proc for onstart: $PROC_VAR/1/fd/1 is PID 1's stdout (cloud.py)
MINIMAL_PATH = "/usr/local/bin:/usr/bin:/bin"  # an instance's SSH session without /etc/environment


class SshdError(RuntimeError):
    """sshd could not be set up or started."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now, for a server that cannot bind port 0 and report
    its own (sshd): another process may take it before the server binds it, so its caller retries
    with another port on "Address already in use"."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int, host: str = "127.0.0.1", timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def pid_alive(pid: Optional[int]) -> bool:
    """True if pid runs and is not a zombie."""
    if not pid:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def image_path_dir() -> str:
    """The directory put first on PATH on every instance: where this python lives."""
    return os.path.dirname(sys.executable)


def check_sshd_installed() -> None:
    for exe in (SSHD, SFTP_SERVER, "/usr/bin/ssh-keygen"):
        if not os.path.exists(exe):
            raise SshdError(f"{exe} is missing: install Debian's openssh-server and openssh-client "
                            "(apt-get install openssh-server) to run emulated instances")


def _write_login_script(path: Path, disk: Path, env: Mapping[str, str], instance: bool = False) -> None:
    """The sshd ForceCommand. A plain host (`instance=False`, the `sshd_host` fixture): this python's
    directory first on PATH and `env` exported. An emulated Vast.ai instance (`instance=True`), as a real
    one's SSH session is (docs/REFERENCE.md section 7): the minimal PATH plus what onstart wrote to the
    image's /etc/environment (read as pam_env does: NAME=value lines), the host's /usr/bin stand-in
    (`root/usr-bin`: nvidia-smi) last; and a command runs only once `~/.no_auto_tmux` exists (otherwise
    the image's auto-tmux answers a session without a terminal the way tmux does). SFTP is never gated."""
    root = disk.parent
    evil_bin = shlex.quote(str(root / "evil" / "bin"))
    etc = shlex.quote(str(root / "etc"))
    exports = [f"export HOME={shlex.quote(str(disk))}"]
    if instance:
        exports += [f"export PATH={MINIMAL_PATH}",
                    f"if [ -f {etc}/environment ]; then",
                    "  while IFS= read -r line || [ -n \"$line\" ]; do",
                    "    case \"$line\" in [A-Za-z_]*=*) ;; *) continue ;; esac",
                    "    name=${line%%=*}; value=${line#*=}",
                    "    case \"$name\" in *[!A-Za-z0-9_]*) continue ;; esac",
                    "    value=${value#\\\"}; value=${value%\\\"}",
                    "    export \"$name=$value\"",
                    f"  done < {etc}/environment",
                    "fi",
                    f"export PATH=\"$PATH:{shlex.quote(str(root / 'usr-bin'))}\""]
    else:
        exports.append(f"export PATH={shlex.quote(image_path_dir())}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin")
        exports += [f"export {k}={shlex.quote(str(v))}" for k, v in env.items() if k.isidentifier()]
    exports += [  # the `evil` fault knob (cloud.py) shadows commands such as tar; absent otherwise
        f"if [ -d {evil_bin} ]; then export PATH={evil_bin}:$PATH; fi",
        "export VAST_EMULATED=1",
        f"export {ETC_VAR}={etc}",
        f"export {ROOT_MARKER}={shlex.quote(str(root))}"]
    gate = []
    if instance:
        gate = [f'case "$SSH_ORIGINAL_COMMAND" in {SFTP_SERVER}*) exec /bin/bash -c "$SSH_ORIGINAL_COMMAND" ;; esac',
                'if [ ! -e "$HOME/.no_auto_tmux" ]; then echo "open terminal failed: not a terminal" >&2; exit 1; fi']
    script = "\n".join([
        "#!/bin/bash",
        "# sshd ForceCommand: every session runs with HOME and cwd = the instance disk.",
        *exports,
        'cd "$HOME" || exit 1',
        'if [ -z "$SSH_ORIGINAL_COMMAND" ]; then exec /bin/bash -l; fi',
        *gate,
        'exec /bin/bash -c "$SSH_ORIGINAL_COMMAND"',
        "",
    ])
    path.write_text(script)
    path.chmod(0o755)


@dataclass
class Sshd:
    """One sshd bound to 127.0.0.1:port whose logins land in root/disk."""

    root: Path
    port: int
    pid: Optional[int] = None

    @property
    def disk(self) -> Path:
        return self.root / "disk"

    @property
    def etc(self) -> Path:
        return self.root / "etc"

    @property
    def host_key_pub(self) -> str:
        """The host public key line ('ssh-ed25519 AAAA...'), for pinning."""
        return " ".join((self.host_key_path.with_name(self.host_key_path.name + ".pub")).read_text().split()[:2])

    @property
    def host_key_path(self) -> Path:
        """The private host key, where an image keeps it: <image /etc>/ssh/ssh_host_ed25519_key."""
        return self.etc / "ssh" / "ssh_host_ed25519_key"

    @property
    def authorized_keys(self) -> Path:
        return self.disk / ".ssh" / "authorized_keys"

    @property
    def log_path(self) -> Path:
        return self.root / "sshd.log"

    def prepare(self, env: Optional[Mapping[str, str]] = None, instance: bool = False) -> None:
        """Create the disk, host key, login wrapper and sshd_config (idempotent); `instance`: logins
        as on an emulated Vast.ai instance (`_write_login_script`)."""
        check_sshd_installed()
        self.disk.mkdir(parents=True, exist_ok=True)
        self.etc.mkdir(parents=True, exist_ok=True)
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # Debian's privilege separation dir
        key = self.host_key_path
        key.parent.mkdir(parents=True, exist_ok=True)
        old = self.etc / "host_ed25519_key"  # where state dirs made before kept it: keep the same key
        if not key.exists() and old.exists():
            old.rename(key)
            Path(str(old) + ".pub").rename(str(key) + ".pub")
        if not key.exists():
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "emulated-instance",
                            "-f", str(key)], check=True, capture_output=True)
        _write_login_script(self.etc / "login.sh", self.disk, env or {}, instance)
        config = f"""\
ListenAddress 127.0.0.1:{self.port}
HostKey {key}
PidFile {self.root / 'sshd.pid'}
AuthorizedKeysFile {self.authorized_keys}
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PrintMotd no
X11Forwarding no
AllowTcpForwarding yes
MaxStartups 50:30:100
MaxSessions 50
LogLevel VERBOSE
Subsystem sftp {SFTP_SERVER} -d {self.disk}
ForceCommand {self.etc / 'login.sh'}
"""
        (self.etc / "sshd_config").write_text(config)

    def start(self, wait: float = 5.0) -> int:
        """Start sshd (not daemonized, in its own session) and wait until it accepts connections."""
        if self.alive():
            return self.pid
        cfg = self.etc / "sshd_config"
        test = subprocess.run([SSHD, "-t", "-f", str(cfg)], capture_output=True, text=True)
        if test.returncode != 0:
            raise SshdError(f"sshd rejected {cfg}: {test.stderr.strip()}")
        log = open(self.log_path, "ab")
        offset = log.tell()
        proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(cfg)], stdin=subprocess.DEVNULL,
                                stdout=log, stderr=log, start_new_session=True)
        log.close()
        self.pid = proc.pid
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:  # wait for its "Server listening" line (no probe connection)
            if proc.poll() is not None:
                raise SshdError(f"sshd exited with {proc.returncode} on port {self.port}; "
                                f"log {self.log_path}:\n{self.log_tail(20)}")
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                if b"Server listening" in f.read():
                    return self.pid
            time.sleep(0.02)
        self.stop()
        raise SshdError(f"sshd did not listen on 127.0.0.1:{self.port} within {wait}s; log {self.log_path}")

    def alive(self) -> bool:
        return pid_alive(self.pid) and _is_sshd(self.pid, self.root)

    def stop(self) -> None:
        """Kill this sshd, its sessions and every process started on this instance."""
        kill_instance_processes(self.root, self.pid if self.pid and _is_sshd(self.pid, self.root) else None)
        self.pid = None

    def log_tail(self, lines: int = 50) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def authorize(self, public_key: str) -> None:
        """Append a public key line to the disk's authorized_keys."""
        self.authorized_keys.parent.mkdir(parents=True, exist_ok=True)
        with open(self.authorized_keys, "a") as f:
            f.write(public_key.strip() + "\n")


def _is_sshd(pid: int, root: Path) -> bool:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    # a running sshd rewrites its title: "sshd: /usr/sbin/sshd -D -e -f <root>/etc/sshd_config [listener]..."
    return bool(cmd) and b"sshd" in cmd[0] and str(root).encode() in b" ".join(cmd)


def _proc_table() -> dict[int, int]:
    """pid -> parent pid, for every live process."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    table[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    return table


def _has_marker(pid: int, root: Path) -> bool:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False
    return f"{ROOT_MARKER}={root}".encode() in env


def instance_processes(root: Path, sshd_pid: Optional[int] = None) -> list[int]:
    """sshd_pid, its descendants, and every process whose environment marks it as run on root."""
    table = _proc_table()
    found = {p for p in table if _has_marker(p, root)}
    if sshd_pid:
        found.add(sshd_pid)
    grew = True
    while grew:
        kids = {p for p, pp in table.items() if pp in found} - found
        found |= kids
        grew = bool(kids)
    return sorted(p for p in found if p != os.getpid() and pid_alive(p))


def kill_instance_processes(root: Path, sshd_pid: Optional[int] = None, rounds: int = 20) -> None:
    """SIGKILL everything `instance_processes` finds, repeating until nothing is left."""
    for _ in range(rounds):
        pids = instance_processes(root, sshd_pid)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.02)
        for pid in pids:
            _reap(pid)
    left = instance_processes(root, sshd_pid)
    if left:
        raise SshdError(f"processes of {root} survived SIGKILL: {left}")


def _reap(pid: int) -> None:
    """Collect a zombie child of ours, if pid is one."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def sshd_pids_under(path: Path) -> list[int]:
    """PIDs of live sshd processes whose command line mentions `path` (leak checks)."""
    found = []
    needle = str(path).encode()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if b"sshd" in cmd.split(b"\0")[0] and needle in cmd and pid_alive(int(entry)):
                found.append(int(entry))
    return found


def make_client_key(path: Path) -> str:
    """Generate an ed25519 client key pair at path (and path.pub); returns the public key line."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "emulator-test", "-f", str(path)],
                       check=True, capture_output=True)
    return Path(str(path) + ".pub").read_text().strip()
