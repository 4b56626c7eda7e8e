"""What a machine sends home goes through one checked archive: a step's outputs (bulk left on the
machine after a success) and the newest training checkpoint. Crafted names and links are refused
and nothing outside the run directory changes."""
import hashlib
import logging
import os
from pathlib import Path

import pytest

from contract.catalogue import BULK_OUTPUTS
from infra.machines.archive import UnsafeArchive
from infra.machines.local import LocalMachine
from tasks.remote_step import CheckpointSync, fetch_outputs


def tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(str(p.relative_to(root)).encode())
        if p.is_file() and not p.is_symlink():
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture
def world(tmp_path):
    """A machine home with a step's outputs, a run dir at home, and a sentinel tree beside them."""
    machine = LocalMachine(tmp_path / "machine")
    work = machine.home / "qat" / "work"
    local_work = tmp_path / "runs" / "r" / "work"
    local_work.mkdir(parents=True)
    sentinel = tmp_path / "sentinel"
    (sentinel / "keep").mkdir(parents=True)
    (sentinel / "keep" / "secret.txt").write_text("do not touch")
    return machine, work, local_work, sentinel


def test_success_brings_all_but_bulk_home(world):
    machine, work, local_work, _ = world
    out = work / "prepare"
    for name in BULK_OUTPUTS["prepare"]:
        (out / name).mkdir(parents=True)
        (out / name / "data.arrow").write_bytes(b"x" * 100)
    (out / "result.json").write_text("{}")
    fetch_outputs(machine, "prepare", local_work, succeeded=True)
    assert sorted(p.name for p in (local_work / "prepare").iterdir()) == ["result.json"]


@pytest.mark.parametrize("evil", ["link-out", "bad name"])
def test_crafted_outputs_are_refused_and_nothing_outside_changes(world, evil):
    machine, work, local_work, sentinel = world
    out = work / "evaluate"
    out.mkdir(parents=True)
    (out / "result.json").write_text('{"status": "ok"}')
    (local_work / "evaluate").mkdir()
    (local_work / "evaluate" / "result.json").write_text("earlier")
    if evil == "link-out":
        os.symlink(sentinel / "keep", out / "link")
    else:
        (out / "bad name").write_text("a space is not an output name")
    before, home_before = tree_hash(sentinel), tree_hash(local_work)
    with pytest.raises(UnsafeArchive):
        fetch_outputs(machine, "evaluate", local_work, succeeded=True)
    assert tree_hash(sentinel) == before and tree_hash(local_work) == home_before


class ListingMachine:
    """A machine whose `ls` answers crafted names; records what was fetched."""

    def __init__(self, names):
        self.names, self.fetched = names, []

    def run(self, argv, on_line=None, check=True, **kw):
        for n in self.names:
            on_line(n)
        return 0

    def get(self, remote, local, **kw):
        self.fetched.append(remote)
        Path(local).mkdir(parents=True)


def test_checkpoint_sync_takes_only_step_digits_names(tmp_path):
    m = ListingMachine(["step-5-/../../X", "step-9/../../Y", "../step-7", "step-3", "step-12", "step-x", "/abs"])
    sync = CheckpointSync(lease=None, cfg=None, local_work=tmp_path, every_s=1, log=logging.getLogger("t"))
    sync.sync(m)
    assert m.fetched == ["qat/work/train/checkpoints/step-12"]
    assert sorted(p.name for p in (tmp_path / "train" / "checkpoints").iterdir()) == ["step-12"]
