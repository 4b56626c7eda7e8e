"""Re-run integrity: the step hash covers code, data and model; a changed train.* trains anew (the
old run's checkpoints are set aside, not resumed); one run directory per flow run, earlier results
reused by hash; the GPU concurrency limit is created when missing and taken strictly."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import REPO, tiny_config
from contract import fingerprint, layout
from contract.catalogue import SET_ASIDE_DIR
from contract.result_file import config_hash, is_done, read_result

FAST = {"data.max_samples": 4, "train.max_steps": 4, "train.save_every": 2,
        "train.eval_every": 10}


# ---------------------------------------------------------------- the done-when: lr change trains anew

@pytest.mark.slow  # two runs of prepare and train through a LocalMachine: a minute or more on a CPU
def test_learning_rate_change_after_a_successful_run_trains_anew(tmp_path, monkeypatch):
    """Run 1 (prepare + train) completes; run 2 changes train.learning_rate: prepare is reused by hash,
    train is not done, and the old run's checkpoints - back on the machine as after a machine swap -
    are set aside while train runs --resume and trains all steps anew."""
    from steps import prepare, train
    from steps.common import execute_step
    from tasks.home_record import write_record
    from tasks.run_dir import all_steps_done, open_run_dir

    monkeypatch.setenv("QAT_RUNS_DIR", str(tmp_path / "runs"))
    code = fingerprint.code_hash()
    monkeypatch.setattr(fingerprint, "code_hash", lambda root=None: code)  # a source edited meanwhile changes nothing here
    first = tiny_config(**FAST)
    run1, work1 = open_run_dir(first, run_id="first")
    assert execute_step("prepare", first, work1, prepare.run) == 0
    assert execute_step("train", first, work1, train.run, resume=True) == 0
    for step in ("prepare", "train"):  # as the orchestrator does once a step's outputs came home
        assert write_record(first, work1, step)
    old_hash = read_result(work1, "train")["config_hash"]
    assert (work1 / "train" / "checkpoints" / "step-2").is_dir()

    second = tiny_config(**FAST, **{"train.learning_rate": 2e-3})
    run2, work2 = open_run_dir(second, run_id="second")
    assert run2 != run1 and run2.parent == run1.parent
    assert is_done(second, work2, "prepare"), "prepare (same model/data/code) is reused from run 1 by hash"
    assert not is_done(second, work2, "train") and not all_steps_done(second, work2)
    assert not (work2 / "train").exists(), "a train of another hash is never linked into the new run"

    # The machine gets the old checkpoints back (the path) and train runs with --resume.
    shutil.copytree(work1 / "train" / "checkpoints", work2 / "train" / "checkpoints")
    for split in ("train", "dev", "test"):  # prepare's bulk is re-derived on a machine; here: the same files
        shutil.copytree(work1 / "prepare" / split, work2 / "prepare" / split)
    assert execute_step("train", second, work2, train.run, resume=True) == 0
    result = read_result(work2, "train")
    assert result["config_hash"] == config_hash(second, "train") != old_hash
    assert result["metrics"]["resumed_from_step"] is None and result["metrics"]["optimizer_steps"] == 4
    history = [json.loads(line) for line in (work2 / "train" / "history.jsonl").read_text().splitlines()]
    assert [r["step"] for r in history if "loss" in r] == [1, 2, 3, 4], "trained from step 0, not resumed"
    assert (work2 / "train" / SET_ASIDE_DIR / old_hash / "step-2" / "state.pt").is_file(), "old checkpoint kept, named"
    assert is_done(second, work2, "train")
    assert is_done(first, work1, "train"), "run 1's results are untouched"


# ---------------------------------------------------------------- train: another config's checkpoint

def test_a_checkpoint_of_another_config_is_set_aside_not_resumed(tmp_path):
    from train_runs import context, train_until_interrupted

    from steps import train

    train_until_interrupted(tmp_path)
    old = train.checkpoint_hash(tmp_path / "train" / "checkpoints" / "step-1")
    new = context(tmp_path, resume=True, max_steps=3, save_every=1, eval_every=10, learning_rate=5e-4)
    m = train.run(new)
    assert m["resumed_from_step"] is None and m["optimizer_steps"] == 3
    aside = sorted(p.name for p in (tmp_path / "train" / SET_ASIDE_DIR / old).iterdir())
    assert aside == ["step-1"]  # named by the hash it was written under, kept
    assert all(train.checkpoint_hash(p) != old for _, p in train._checkpoints(tmp_path / "train" / "checkpoints"))


# ---------------------------------------------------------------- the hash covers code and data

def _code_copy(root: Path) -> None:
    for d in ("contract", "steps"):
        shutil.copytree(REPO / d, root / d, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / layout.REQUIREMENTS, root / layout.REQUIREMENTS)


def test_the_hash_changes_when_a_steps_source_file_changes(tmp_path, monkeypatch):
    _code_copy(tmp_path)
    cfg = tiny_config()
    monkeypatch.setattr(layout, "REPO_ROOT", tmp_path)
    before = {s: config_hash(cfg, s) for s in ("prepare", "train", "bench")}
    assert fingerprint.code_hash() == fingerprint.code_hash(tmp_path)
    with open(tmp_path / "steps" / "train.py", "a") as f:
        f.write("\n# a change\n")
    after = {s: config_hash(cfg, s) for s in before}
    assert all(before[s] != after[s] for s in before)
    (tmp_path / "steps" / "__pycache__").mkdir(exist_ok=True)
    (tmp_path / "steps" / "__pycache__" / "x.py").write_text("not code")  # caches do not count
    assert {s: config_hash(cfg, s) for s in before} == after


def test_the_hash_changes_when_the_manifest_or_its_audio_changes(tmp_path):
    rows = [json.loads(line) for line in (REPO / "fixtures/french/manifest.jsonl").read_text().splitlines()[:3]]
    for r in rows:
        dest = tmp_path / "audio" / Path(r["audio"]).name
        dest.parent.mkdir(exist_ok=True)
        shutil.copy(REPO / r["audio"], dest)
        r["audio"] = f"audio/{dest.name}"  # relative to the manifest's folder
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tiny_config(**{"data.manifest": str(manifest), "machine.backend": "local"})
    h0 = config_hash(cfg, "prepare")
    assert config_hash(cfg, "prepare") == h0  # stable

    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    assert config_hash(cfg, "prepare") != h0
    assert config_hash(cfg, "train") != config_hash(tiny_config(), "train")
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert config_hash(cfg, "prepare") == h0

    audio = tmp_path / rows[0]["audio"]
    data = bytearray(audio.read_bytes())
    data[-1] ^= 0xFF  # same size, other bytes
    audio.write_bytes(bytes(data))
    assert config_hash(cfg, "prepare") != h0
    audio.unlink()
    assert "missing" in json.dumps(fingerprint.data_fingerprint(cfg.data)) or config_hash(cfg, "prepare") != h0


def test_model_and_hf_fingerprints_say_what_they_could_not_resolve(tmp_path):
    assert fingerprint.model_fingerprint("fixture:tiny-random") == "fixture:tiny-random"
    assert fingerprint.model_fingerprint("openai/whisper-base").endswith(fingerprint.UNRESOLVED)
    assert fingerprint.model_fingerprint(str(tmp_path / "nope")).endswith(":absent")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    a = fingerprint.model_fingerprint(str(tmp_path / "m"))
    (tmp_path / "m" / "config.json").write_text('{"d_model": 8}')
    assert a.startswith("local:") and fingerprint.model_fingerprint(str(tmp_path / "m")) != a
    hf = tiny_config(**{"data.source": "hf", "data.dataset": "facebook/multilingual_librispeech", "data.config": "french"})
    assert fingerprint.data_fingerprint(hf.data) == f"hf:facebook/multilingual_librispeech/french@{fingerprint.UNRESOLVED}"


def test_result_json_records_the_inputs(tmp_path):
    from steps.common import execute_step

    cfg = tiny_config()
    assert execute_step("bench", cfg, tmp_path, lambda ctx: {"x": 1}) == 0
    r = read_result(tmp_path, "bench")
    assert set(r["inputs"]) == {"code", "data", "model"} and r["config_hash"] == config_hash(cfg, "bench")
    calls = []
    assert execute_step("bench", cfg, tmp_path, lambda ctx: calls.append(1) or {}) == 0
    assert calls == []  # same hash: skipped
    assert not list(tmp_path.glob("bench/*.tmp")) and not list(tmp_path.glob("bench/.*.tmp"))


# ---------------------------------------------------------------- run directories

def test_two_runs_of_one_config_get_distinct_run_dirs(tmp_path, monkeypatch):
    from tasks.run_dir import open_run_dir, run_dirs

    monkeypatch.setenv("QAT_RUNS_DIR", str(tmp_path / "runs"))
    cfg = tiny_config()
    a, wa = open_run_dir(cfg)
    b, wb = open_run_dir(cfg)
    assert a != b and wa.is_dir() and wb.is_dir() and (a / "run.yaml").is_file() and (b / "run.yaml").is_file()
    assert a.parent == b.parent == tmp_path / "runs" / cfg.name
    assert run_dirs(cfg.name) == [a, b]
    again, _ = open_run_dir(cfg, run_id="flowrun-1")
    assert again.name.endswith("-flowrun-1") and open_run_dir(cfg, run_id="flowrun-1")[0] == again  # a retry


def test_earlier_results_are_reused_by_hash_not_by_name(tmp_path, monkeypatch):
    from steps.common import execute_step
    from tasks.home_record import write_record
    from tasks.run_dir import open_run_dir

    monkeypatch.setenv("QAT_RUNS_DIR", str(tmp_path / "runs"))
    cfg = tiny_config()
    legacy = tmp_path / "runs" / cfg.name / "work"  # the old shared layout counts as an earlier run
    for step in ("prepare", "bench"):
        assert execute_step(step, cfg, legacy, lambda ctx: {"step": ctx.step}) == 0
        assert write_record(cfg, legacy, step)
    (legacy / "train" / "checkpoints" / "step-2").mkdir(parents=True)
    _, work = open_run_dir(cfg)
    assert is_done(cfg, work, "prepare") and is_done(cfg, work, "bench")
    assert (work / "prepare" / "result.json").stat().st_ino == (legacy / "prepare" / "result.json").stat().st_ino
    assert not (work / "train").exists()

    changed = tiny_config(**{"bench.max_clips": 3})
    _, work2 = open_run_dir(changed)
    assert is_done(changed, work2, "prepare") and not (work2 / "bench").exists()


# ---------------------------------------------------------------- the GPU concurrency limit

def test_gpu_slot_creates_the_limit_when_missing_and_takes_it_strictly(prefect_server):
    from prefect import get_client

    from tasks.rental import GPU_LIMIT, gpu_slot

    cfg = tiny_config()
    assert cfg.machine.backend == "vast"
    with get_client(sync_client=True) as client:
        assert not [g for g in client.read_global_concurrency_limits(limit=100) if g.name == GPU_LIMIT]
        with gpu_slot(cfg):
            gcl = client.read_global_concurrency_limit_by_name(GPU_LIMIT)
            assert gcl.limit == 1 and gcl.active_slots == 1
        assert client.read_global_concurrency_limit_by_name(GPU_LIMIT).active_slots == 0
        from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate

        client.update_global_concurrency_limit(GPU_LIMIT, GlobalConcurrencyLimitUpdate(limit=3))
        with gpu_slot(cfg):  # an existing limit is left as its owner set it
            assert client.read_global_concurrency_limit_by_name(GPU_LIMIT).limit == 3
    local = tiny_config(**{"machine.backend": "local"})
    with gpu_slot(local):  # hosts we own take no slot (and need no server)
        pass
