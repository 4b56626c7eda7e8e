"""A hostile machine, end to end: the emulator's `evil` fault knob (devtools/emulator/evil.py) makes
a rented instance answer the orchestrator's `tar -czf - -C DIR .` with crafted archives (absolute
and `..` names, links, devices, oversized and too-many members, crafted names) or with forged
outputs (evaluate's result.json claiming a passing gate over failing transcripts, code and a
pickle planted in the export folder). Everything goes through real SSH to a real sshd.

Each case must be refused with a clear error; nothing outside the run directory is written or
deleted (a sentinel tree's hash, the crafted members' target), the run directory is unchanged by a
refused archive, nothing reaches the (fake) Hub, and the machine is still destroyed."""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import pytest

from conftest import require_sshd
from contract.config import load_config
from infra.machines.archive import UnsafeArchive
from tasks.remote_step import CheckpointSync, fetch_outputs

# mode -> what the refusal must say (infra/machines/archive.py's rule)
CASES = {
    "abs_path": "absolute names are not allowed",
    "dotdot": "'..' parts are not allowed",
    "symlink": "a symlink",
    "hardlink": "a hard link",
    "device": "a character device",
    "oversized": "more than 1000000000 bytes",  # contract/catalogue.py OUTPUT_CAP_BYTES["evaluate"]
    "too_many": "more than 200000 members",
    "bad_name": "does not match the allowlist",
    "deep_tree": "1101 levels deep (at most 32)",
    "pax_chain": "a chain of over 16 headers",
    "bomb": "a compression bomb",
}


def tree_hash(root: Path) -> str:
    """Names, types, modes and contents of everything under root (links not followed)."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        h.update(f"{p.relative_to(root)}|{st.st_mode:o}\n".encode())
        if p.is_symlink():
            h.update(os.readlink(p).encode())
        elif p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture
def world(evil_machine, tmp_path):
    """A run directory at home holding an earlier evaluate/, a sentinel tree beside it, and the
    machine's evaluate/ outputs (a plain result.json)."""
    emu, lease, m, _ = evil_machine
    run_dir = tmp_path / "runs" / "r"
    local_work = run_dir / "work"
    (local_work / "evaluate").mkdir(parents=True)
    (local_work / "evaluate" / "result.json").write_text('{"earlier": true}')
    sentinel = tmp_path / "sentinel"
    (sentinel / "keep").mkdir(parents=True)
    (sentinel / "keep" / "secret.txt").write_text("do not touch")
    m.run(["sh", "-c", "rm -rf qat/work && mkdir -p qat/work/evaluate qat/work/train/checkpoints/step-4 && "
                       "echo '{\"status\": \"ok\"}' > qat/work/evaluate/result.json && "
                       "echo weights > qat/work/train/checkpoints/step-4/model.safetensors"])
    yield emu, lease, m, run_dir, local_work, sentinel
    emu.set_faults(id=lease.instance_id, evil=None)


@pytest.mark.parametrize("mode", list(CASES))
def test_crafted_archive_is_refused_and_nothing_outside_changes(world, mode):
    emu, lease, m, run_dir, local_work, sentinel = world
    emu.set_faults(id=lease.instance_id, evil=mode, evil_target=str(sentinel / "keep"))
    before, home_before = tree_hash(sentinel), tree_hash(run_dir)
    with pytest.raises(UnsafeArchive) as e:
        fetch_outputs(m, "evaluate", local_work, succeeded=True)
    assert CASES[mode] in str(e.value), str(e.value)
    assert str(e.value).startswith("refused ")
    assert tree_hash(sentinel) == before, "something outside the run directory was written or deleted"
    assert tree_hash(run_dir) == home_before, "the run directory changed after a refused archive"
    assert not list(sentinel.rglob("pwned*")) and not Path("/tmp/qat-evil-target").exists()
    # the machine still answers honestly once the knob is off: the refusal was about the archive
    emu.set_faults(id=lease.instance_id, evil=None)
    fetch_outputs(m, "evaluate", local_work, succeeded=True)
    assert (local_work / "evaluate" / "result.json").read_text().strip() == '{"status": "ok"}'


def test_bulk_outputs_the_machine_sends_anyway_stay_out_of_home(world, caplog):
    """train's checkpoints are bulk (contract/catalogue.py BULK_OUTPUTS): a machine whose tar ignores
    `--exclude` sends them; they are dropped at home, the rest lands."""
    emu, lease, m, run_dir, local_work, sentinel = world
    m.run(["sh", "-c", "echo '{\"status\": \"ok\"}' > qat/work/train/result.json && echo w > qat/work/train/model.bin"])
    emu.set_faults(id=lease.instance_id, evil="ignore_exclude")
    with caplog.at_level(logging.WARNING, logger="qat.machine"):
        fetch_outputs(m, "train", local_work, succeeded=True)
    assert sorted(p.name for p in (local_work / "train").iterdir()) == ["model.bin", "result.json"]
    assert "under checkpoints/" in caplog.text
    assert sorted(p.name for p in local_work.iterdir()) == ["evaluate", "train"]  # no .incoming-* left


def test_each_step_has_its_own_cap_on_unpacked_bytes(world, monkeypatch):
    from contract.catalogue import OUTPUT_CAP_BYTES

    emu, lease, m, run_dir, local_work, sentinel = world
    m.run(["sh", "-c", "head -c 5000 /dev/urandom > qat/work/evaluate/big.bin"])
    monkeypatch.setitem(OUTPUT_CAP_BYTES, "evaluate", 4000)
    home_before = tree_hash(run_dir)
    with pytest.raises(UnsafeArchive, match="more than 4000 bytes"):
        fetch_outputs(m, "evaluate", local_work, succeeded=True)
    assert tree_hash(run_dir) == home_before


def test_a_deeply_nested_result_json_does_not_stop_later_runs(world, tmp_path, monkeypatch, caplog):
    """A result.json nested 100 000 levels deep comes home (its name is valid); the next run of the
    config opens its run directory (nothing reused from that run) instead of dying in RecursionError."""
    from contract.result_file import is_done, read_result
    from tasks.run_dir import open_run_dir

    emu, lease, m, *_ = world
    cfg = load_config("tiny")
    earlier = tmp_path / "runs" / cfg.name / "20260101-000000-000000-earlier" / "work"
    earlier.mkdir(parents=True)
    emu.set_faults(id=lease.instance_id, evil="deep_json")
    fetch_outputs(m, "evaluate", earlier, succeeded=True)
    assert (earlier / "evaluate" / "result.json").stat().st_size == 200_000
    monkeypatch.setenv("QAT_RUNS_DIR", str(tmp_path / "runs"))
    with caplog.at_level(logging.WARNING):
        run_dir, local_work = open_run_dir(cfg, run_id="later")
        assert read_result(earlier, "evaluate") is None and not is_done(cfg, earlier, "evaluate")
    assert not (local_work / "evaluate").exists()
    assert "nested more than 32 levels deep" in caplog.text and "counts as not done" in caplog.text


def test_checkpoint_copy_refuses_a_crafted_archive(world):
    emu, lease, m, run_dir, local_work, sentinel = world
    emu.set_faults(id=lease.instance_id, evil="symlink", evil_target=str(sentinel / "keep"))
    before = tree_hash(sentinel)
    sync = CheckpointSync(lease, None, local_work, every_s=1, log=logging.getLogger("test"))
    with pytest.raises(UnsafeArchive, match="a symlink"):
        sync.sync(m)
    assert sync.synced is None
    assert tree_hash(sentinel) == before
    ckpt = local_work / "train" / "checkpoints"  # may have been created, empty: nothing landed in it
    assert not ckpt.exists() or not list(ckpt.iterdir())
    assert not list(sentinel.rglob("pwned*"))


def test_pushing_code_still_works_on_an_evil_machine(world, tmp_path):
    """Only `tar -czf - -C DIR .` is crafted: unpacking what we send is the real tar."""
    emu, lease, m, *_ = world
    emu.set_faults(id=lease.instance_id, evil=list(CASES))
    src = tmp_path / "src"
    (src / "pkg").mkdir(parents=True)
    (src / "pkg" / "a.txt").write_text("hello\n")
    m.put(src, "qat/code-test", include=["pkg"], respect_gitignore=False)
    lines: list[str] = []
    m.run(["cat", "qat/code-test/pkg/a.txt"], on_line=lines.append)
    assert lines == ["hello"]


# ------------------------------------------------------------------ a whole run on an evil machine

FAST = {"train.max_steps": 2, "train.save_every": 2, "train.eval_every": 2, "data.max_eval_samples": 2,
        "bench.max_clips": 1, "eval.bootstrap_samples": 20, "hub.repo_id": "evil/should-not-exist"}


@pytest.mark.slow
def test_a_whole_run_on_an_evil_machine_uploads_nothing(tmp_path, monkeypatch):
    """evaluate's result.json claims a passing gate over transcripts that fail it, and the export
    folder comes home with a .py and a pickle: the gate fails (recomputed at home), nothing reaches
    the Hub (whose token would allow it), the export would be refused anyway, the instance is destroyed."""
    from prefect_api import prefect_harness

    from devtools.emulator.testing import EmulatorProcess
    from hub_server import HubServer
    from tasks.upload import UnsafeModelFolder, check_model_folder

    require_sshd()
    token = "hf_evilrun" + "0" * 24
    sentinel = tmp_path / "sentinel"
    (sentinel / "keep").mkdir(parents=True)
    (sentinel / "keep" / "secret.txt").write_text("do not touch")
    before = tree_hash(sentinel)
    emu = EmulatorProcess(state_dir=tmp_path / "emulator").start()
    try:
        with HubServer(tmp_path / "hub", {token: ("evil", "write")}) as hub:
            for k, v in {"VAST_API_KEY": emu.api_key, "VAST_URL": emu.url, "QAT_RUNS_DIR": str(tmp_path / "runs"),
                         "HF_ENDPOINT": hub.url, "HF_TOKEN": token}.items():
                monkeypatch.setenv(k, v)
            emu.set_faults(label_prefix="qat-", evil=["forge_result", "plant_py"], evil_target=str(sentinel / "keep"))
            from flows.qat import qat

            with prefect_harness():
                state = qat(config="tiny", overrides=FAST, return_state=True)
            assert state.is_completed(), state.message
            out = state.result()
            assert out["gate"]["passed"] is False, out["gate"]
            assert "did not match" in out["gate"]["reason"], out["gate"]["reason"]
            assert out["link"]["uploaded"] is False and "quality gate failed" in out["link"]["reason"]
            assert hub.repo_files("evil/should-not-exist") in ({}, None, []), "something reached the Hub"
            # the planted files came home (their names are valid output names) and would refuse an upload
            (export,) = [p for p in (tmp_path / "runs").rglob("qat_int8") if p.parent.name == "convert"]
            assert (export / "evil.py").is_file() and (export / "weights.pkl").is_file()
            with pytest.raises(UnsafeModelFolder, match="evil.py"):
                check_model_folder(export)
        rows = [r for r in emu.ledger()["instances"] if (r["label"] or "").startswith("qat-")]
        assert rows and all(r["ended_at"] is not None and r["end_reason"] == "destroyed" for r in rows), rows
        assert emu.live_instances() == []
        assert tree_hash(sentinel) == before
        assert not list((tmp_path / "runs").rglob("ssh/*/id_ed25519")), "the run's SSH key outlived its machine"
    finally:
        emu.cleanup()
    assert emu.sshd_pids() == []
