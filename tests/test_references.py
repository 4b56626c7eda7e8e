"""The test set home holds (tasks/references.py): read without the machine, chosen as prepare chooses."""
from __future__ import annotations

import json

import pytest

from contract.config import load_config
from tasks.references import HomeTestSetUnreadable, home_test_set


def test_the_manifest_is_read_at_home_as_prepare_selects(tmp_path):
    rows = [{"id": "a", "audio": "a.ogg", "text": "Un  texte.", "split": "test", "duration": 3.0},
            {"id": "train-1", "audio": "t.ogg", "text": "Pas le test.", "split": "train"},
            {"id": "empty", "audio": "e.ogg", "text": "  ", "split": "test"},
            {"id": "short", "audio": "s.ogg", "text": "Trop court.", "split": "test", "duration": 0.2},
            "not json",
            {"audio": "dir/no-id.ogg", "text": "Sans identifiant.", "split": "test"},
            {"id": "c", "audio": "c.ogg", "text": "Au-delà de max_eval_samples.", "split": "test"}]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    cfg = load_config("tiny", {"data.manifest": str(manifest), "data.max_eval_samples": 2, "machine.backend": "local"})
    test = home_test_set(cfg)
    assert test.refs == {"a": "Un texte.", "no-id": "Sans identifiant."}
    assert str(manifest) in test.source


def test_the_fixture_test_set_is_the_first_eval_samples_of_its_test_split():
    cfg = load_config("demo")
    test = home_test_set(cfg)
    lines = [json.loads(x) for x in cfg.data.manifest_path().read_text().splitlines() if x.strip()]
    assert list(test.refs) == [r["id"] for r in lines if r["split"] == "test"][:cfg.data.max_eval_samples]


def _parquet_dataset(folder):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True)
    audio = pa.array([{"bytes": b"\0" * 8, "path": None}] * 4,
                     type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    test = pa.table({"id": ["u1", "u2", "u3", "u4"], "transcript": ["bonjour", "", "merci  bien", "au revoir"],
                     "audio": audio})
    pq.write_table(test, folder / "test.parquet")
    pq.write_table(test.slice(0, 1), folder / "train.parquet")


def test_a_hub_dataset_is_read_at_home_once_and_cached(tmp_path, monkeypatch):
    """The Hub code path (datasets, streamed id and text columns), on a parquet dataset the offline
    test machine can serve: a local dataset folder. The second read comes from home's cache."""
    monkeypatch.setenv("QAT_RUNS_DIR", str(tmp_path / "runs"))
    ds = tmp_path / "mls"
    _parquet_dataset(ds)
    cfg = load_config("int8", {"data.dataset": str(ds), "data.config": None, "data.max_eval_samples": 2})
    test = home_test_set(cfg)
    assert test.refs == {"u1": "bonjour", "u3": "merci bien"}
    (cached,) = (tmp_path / "runs" / ".home-references").glob("*.json")
    assert json.loads(cached.read_text())["refs"] == test.refs
    for f in ds.iterdir():
        f.unlink()
    assert home_test_set(cfg).refs == test.refs  # from the cache: the dataset is not read again

    other = load_config("int8", {"data.dataset": str(tmp_path / "missing"), "data.config": None})
    with pytest.raises(HomeTestSetUnreadable, match="home could not read the Hub dataset"):
        home_test_set(other)
