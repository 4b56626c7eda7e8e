"""LocalMachine (backend local) and the shared file selection for `put` (.gitignore honoured)."""
import time

import pytest

from file_trees import NASTY, make_tree, run_streamed
from infra.machines.local import LocalMachine
from infra.machines.machine import CommandFailed, CommandTimeout, MachineError
from infra.machines.streams import collect_files


def test_collect_files_sends_only_what_git_tracks(tmp_path):
    root = make_tree(tmp_path / "repo", git=True)
    files = collect_files(root, ["pkg", "top.txt", "missing-entry"])
    assert files == ["pkg/a.py", "pkg/sub/b.txt", "top.txt"]  # not .env, .netrc (untracked) nor big.bin (ignored)
    assert "pkg/big.bin" in collect_files(root, ["pkg"], respect_gitignore=False)


def test_collect_files_without_git(tmp_path):
    root = make_tree(tmp_path / "plain", git=False)
    with pytest.raises(MachineError, match="not a git checkout.*run from a clone"):
        collect_files(root, ["pkg"])  # code is chosen by git: without a checkout nothing is sent
    assert collect_files(root, ["pkg"], respect_gitignore=False) == ["pkg/a.py", "pkg/big.bin", "pkg/sub/b.txt"]


def test_run_streams_exit_codes_and_quotes(tmp_path):
    m = LocalMachine(tmp_path / "home")
    seen = []
    code = m.run(["sh", "-c", 'echo one; echo two >&2; sleep 0.5; printf "%s\\n" "$V"; pwd; exit 5'],
                 env={"V": NASTY}, cwd=f"dir {NASTY}", check=False,
                 on_line=lambda line: seen.append((time.monotonic(), line)))
    # the cwd does not exist yet: cd fails before anything runs
    assert code != 0
    (m.home / f"dir {NASTY}").mkdir()
    code, lines = run_streamed(m, tmp_path / "go", f"dir {NASTY}", {"V": NASTY})
    assert code == 5
    assert lines == ["one", "two", NASTY, str(m.home / f"dir {NASTY}")]
    assert not list(m.home.rglob("pwned*"))


def test_run_failure_and_timeout(tmp_path):
    m = LocalMachine(tmp_path)
    with pytest.raises(CommandFailed) as e:
        m.run(["sh", "-c", "for i in $(seq 1 100); do echo line$i; done; exit 7"], env={"SECRET": "hunter2hunter2"})
    assert e.value.exit_code == 7 and e.value.tail.splitlines()[-1] == "line100"
    assert "hunter2hunter2" not in str(e.value) and "SECRET='***'" in str(e.value)
    with pytest.raises(CommandTimeout):
        m.run(["sh", "-c", "echo started; sleep 2 && touch survived"], timeout=0.5)
    time.sleep(2)
    assert not (tmp_path / "survived").exists()  # stopped at its timeout: the whole process group was killed


def test_files(tmp_path):
    src = make_tree(tmp_path / "repo", git=True)
    m = LocalMachine(tmp_path / "home")
    m.put(src, "qat/code", include=["pkg", "top.txt"])
    got = sorted(str(p.relative_to(m.home / "qat/code")) for p in (m.home / "qat/code").rglob("*") if p.is_file())
    assert got == ["pkg/a.py", "pkg/sub/b.txt", "top.txt"]
    m.write_text("qat/run.yaml", "name: x\n")
    assert m.exists("qat/run.yaml") and not m.exists("qat/nope")
    m.get("qat/code/pkg", tmp_path / "back")
    assert (tmp_path / "back" / "sub" / "b.txt").read_text() == "b\n"
    m.get("qat/run.yaml", tmp_path / "back.yaml")
    assert (tmp_path / "back.yaml").read_text() == "name: x\n"
    assert m.free_disk_gb("qat/not-yet") > 0


def test_step_processes_get_a_minimal_environment(tmp_path, monkeypatch):
    """The orchestrator's secrets (VAST_API_KEY, HF_TOKEN, PREFECT_*) never reach a step process;
    what the workload reads (caches, thread counts) and the env passed to run do."""
    for k, v in {"VAST_API_KEY": "vast-secret-1234", "HF_TOKEN": "hf_secret1234", "PREFECT_API_KEY": "pf-secret",
                 "PREFECT_API_URL": "http://127.0.0.1:4200/api", "AWS_SECRET_ACCESS_KEY": "aws-secret",
                 "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "3", "LC_ALL": "C.UTF-8"}.items():
        monkeypatch.setenv(k, v)
    m = LocalMachine(tmp_path)
    lines: list[str] = []
    m.run(["env"], env={"PYTHONUNBUFFERED": "1"}, on_line=lines.append)
    env = dict(line.split("=", 1) for line in lines if "=" in line)
    assert not {"VAST_API_KEY", "HF_TOKEN", "PREFECT_API_KEY", "PREFECT_API_URL", "AWS_SECRET_ACCESS_KEY"} & set(env)
    assert not any(k.startswith("PREFECT_") for k in env)
    assert "secret" not in "\n".join(lines)
    assert env["HF_HOME"] == str(tmp_path / "hf") and env["OMP_NUM_THREADS"] == "3" and env["LC_ALL"] == "C.UTF-8"
    assert env["PYTHONUNBUFFERED"] == "1" and env["PATH"] and "HOME" in env and "LANG" in env
