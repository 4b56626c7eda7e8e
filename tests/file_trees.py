"""A file tree to push (tracked, ignored and untracked files; git or not) and a name that breaks naive
shell quoting, for LocalMachine and SSHMachine alike (tests/test_local.py, tests/test_ssh.py)."""
from __future__ import annotations

import subprocess
from pathlib import Path

NASTY = "  it's \"quoted\" $HOME; `touch pwned` $(touch pwned2) & | > < back\\slash\\n *"


def make_tree(root: Path, git: bool) -> Path:
    (root / "pkg" / "sub").mkdir(parents=True)
    (root / "pkg" / "a.py").write_text("print('a')\n")
    (root / "pkg" / "sub" / "b.txt").write_text("b\n")
    (root / "pkg" / "big.bin").write_bytes(b"\0" * 10)
    (root / "pkg" / "__pycache__").mkdir()
    (root / "pkg" / "__pycache__" / "a.pyc").write_bytes(b"x")
    (root / "top.txt").write_text("top\n")
    (root / "other").mkdir()
    (root / "other" / "c.txt").write_text("c\n")
    if git:
        (root / ".gitignore").write_text("*.bin\n")
        subprocess.run(["git", "init", "-q", str(root)], check=True)
        subprocess.run(["git", "-C", str(root), "add", "pkg/a.py", "pkg/sub/b.txt", "top.txt"], check=True)
        # untracked and not ignored: a secret left in the tree must never be pushed (issue 19 finding 16)
        (root / "pkg" / ".env").write_text("HF_TOKEN=hf_untracked\n")
        (root / "pkg" / "sub" / ".netrc").write_text("machine example password untracked\n")
    return root


def run_streamed(machine, go: Path, cwd: str, env: dict) -> tuple[int, list[str]]:
    """Run a command on `machine` that prints one, two (stderr), then waits for `go` before printing $V
    and its cwd and exiting 5: it goes on only once "two" reached on_line, so lines arrive as printed.
    Returns the exit code and the lines on_line saw."""
    lines: list[str] = []

    def on_line(line):
        lines.append(line)
        if line == "two":
            go.touch()
    code = machine.run(["sh", "-c", 'echo one; echo two >&2; until [ -e "$GO" ]; do sleep 0.05; done; '
                                    'printf "%s\\n" "$V"; pwd; exit 5'],
                       env={**env, "GO": str(go)}, cwd=cwd, check=False, on_line=on_line, timeout=120)
    return code, lines
