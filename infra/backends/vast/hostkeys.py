"""Host keys over a second channel, and the SSH endpoints of an instance's row.

The onstart script prints one `QAT_HOSTKEY <type> SHA256:<fingerprint>` line per host key of the
instance's sshd into the container's log (PID 1's stdout: in SSH launch mode onstart's own output
goes to /var/log/onstart.log, which the log API does not serve); launch (instances.py) reads that
log over the HTTPS API (the SDK's `logs`: request_logs, then the result URL) before the first SSH
connection, and the lease carries the fingerprints, so SSH accepts only a key among them
(infra/machines/ssh.py). An attempt whose log shows no such line within `hostkey_wait_s` of running
is failed, destroyed, and the next offer tried. What this protects: the SSH path (a man in the
middle, a recycled address). What it cannot: the machine itself writes its log, so a hostile host
can print its own keys (it is the machine we rented, and everything it sends is checked as
untrusted anyway).
"""
from __future__ import annotations

import re
import shlex
from typing import Optional

from .api import VastAPIError

HOSTKEY_MARK = "QAT_HOSTKEY"
# How long the QAT_HOSTKEY lines may take to reach the log API once the instance runs with an SSH
# endpoint (onstart prints them within seconds): an instance whose lines never come is failed then,
# not at the end of machine.provision_timeout_s.
HOSTKEY_WAIT_S = 120.0
# One line per host key, exactly: the mark, the key type, OpenSSH's SHA256 fingerprint (43 base64 chars).
_HOSTKEY_LINE = re.compile(rf"{HOSTKEY_MARK} ((?:ssh|ecdsa|sk)-[A-Za-z0-9@.-]+) (SHA256:[A-Za-z0-9+/]{{43}})")

# SHA256 fingerprint of an OpenSSH public key file (what `ssh-keygen -l -E sha256` prints), for
# images without ssh-keygen: base64 of the key blob's sha256, unpadded. No single quotes (shell).
_FINGERPRINT_PY = ("import base64,hashlib,sys; b=open(sys.argv[1]).read().split()[1]; "
                   "print(\"SHA256:\"+base64.b64encode(hashlib.sha256(base64.b64decode(b)).digest()).decode().rstrip(\"=\"))")


def onstart_script(public_key: str) -> str:
    """What a rented instance runs at start (docs/REFERENCE.md section 7), in this order:
    1. `touch ~/.no_auto_tmux`: Vast images attach SSH sessions to tmux otherwise, and a command
       sent without a terminal does not run;
    2. the image's container environment (its Docker ENV: PATH to its python, CUDA variables)
       written to /etc/environment, which SSH sessions read (SSH launch mode replaces the image's
       entrypoint, so they get a minimal PATH otherwise); names that look like secrets (KEY,
       TOKEN, SECRET, PASSW) and per-shell ones are left out;
    3. the host keys' fingerprints printed (one `QAT_HOSTKEY <type> SHA256:<fp>` line each, host
       keys generated first if the image has none; computed by the image's python where it has no
       ssh-keygen of its own, as `pytorch/pytorch`) to the container's log, PID 1's stdout
       (`/proc/1/fd/1`), which the log API serves, and to onstart's own output (Vast's
       /var/log/onstart.log, which it does not serve); the product connects only after reading
       them, so 1 and 2 are in place by its first command;
    4. our key installed for root (keys may also be attached through the API).
    `VAST_EMULATED_ETC` / `VAST_EMULATED_PROC` are the emulator's stand-ins for the image's /etc
    and /proc (it runs no container); unset on Vast.ai."""
    k = shlex.quote(public_key)
    shell = ('touch ~/.no_auto_tmux; etc="${VAST_EMULATED_ETC:-/etc}"; '
             "env | grep -E '^[A-Za-z_][A-Za-z0-9_]*=' "
             "| grep -vE '^(HOME|PWD|OLDPWD|SHLVL|_|HOSTNAME|TERM|SSH_[A-Z_]*)=' "
             "| grep -viE '^[A-Za-z0-9_]*(KEY|TOKEN|SECRET|PASSW)[A-Za-z0-9_]*=' "
             '> "$etc/environment.qat" && mv -f "$etc/environment.qat" "$etc/environment"; ')
    hostkeys = ('ls "$etc"/ssh/ssh_host_*_key.pub >/dev/null 2>&1 || ssh-keygen -A >/dev/null 2>&1; '
                f"fp() {{ if command -v ssh-keygen >/dev/null 2>&1; then ssh-keygen -l -E sha256 -f \"$1\" | cut -d' ' -f2; "
                f"else for py in python3 python /opt/conda/bin/python; do command -v $py >/dev/null 2>&1 && "
                f"{{ $py -c '{_FINGERPRINT_PY}' \"$1\"; break; }}; done; fi; }}; "
                'hk="$(for f in "$etc"/ssh/ssh_host_*_key.pub; do [ -f "$f" ] && '
                f'echo "{HOSTKEY_MARK} $(cut -d" " -f1 "$f") $(fp "$f")"; '
                'done)"; printf "%s\\n" "$hk"; '
                'printf "%s\\n" "$hk" 2>/dev/null >> "${VAST_EMULATED_PROC:-/proc}/1/fd/1"; ')
    return (shell + hostkeys + "mkdir -p ~/.ssh && chmod 700 ~/.ssh && touch ~/.ssh/authorized_keys && "
            f"(grep -qxF {k} ~/.ssh/authorized_keys || echo {k} >> ~/.ssh/authorized_keys) && "
            "chmod 600 ~/.ssh/authorized_keys")


def parse_host_keys(log_text: str) -> list[str]:
    """["<type> SHA256:<fp>", ...] from the `QAT_HOSTKEY` lines of an instance log (whole lines
    only, so a name an attacker gets into an sshd log line cannot pass for one), in order, once each."""
    found: list[str] = []
    for line in (log_text or "").splitlines():
        m = _HOSTKEY_LINE.fullmatch(line.strip())
        if m and f"{m[1]} {m[2]}" not in found:
            found.append(f"{m[1]} {m[2]}")
    return found


def ssh_endpoints(row: dict) -> list[tuple[str, int]]:
    """Direct (public_ipaddr + mapped 22/tcp) first, then the proxy (ssh_host:ssh_port)."""
    out: list[tuple[str, int]] = []
    ports = row.get("ports") or {}
    mapped = ports.get("22/tcp") if isinstance(ports, dict) else None
    if row.get("public_ipaddr") and isinstance(mapped, list) and mapped and isinstance(mapped[0], dict):
        try:
            out.append((str(row["public_ipaddr"]).strip(), int(mapped[0].get("HostPort"))))
        except (TypeError, ValueError):
            pass
    if row.get("ssh_host") and row.get("ssh_port"):
        try:
            proxy = (str(row["ssh_host"]).strip(), int(row["ssh_port"]))
        except (TypeError, ValueError):
            raise VastAPIError(f"malformed instance: ssh_port is {row.get('ssh_port')!r}") from None
        if proxy not in out:
            out.append(proxy)
    return out


def ssh_endpoint(row: dict) -> tuple[Optional[str], Optional[int]]:
    found = ssh_endpoints(row)
    return found[0] if found else (None, None)

