"""A missing model is deterministic (exit 3, never retried on a paid machine); an unreachable Hub
stays transient."""
from __future__ import annotations

import json

import pytest

from contract.catalogue import EXIT_DETERMINISTIC
from contract.result_file import ERROR_FILE
from steps.common import _classify, execute_step
from steps.models import ModelNotFound, load_model, load_processor
from conftest import tiny_config


def test_missing_local_directory_is_deterministic(tmp_path):
    with pytest.raises(ModelNotFound, match="does not exist"):
        load_model(str(tmp_path / "no-such-model"))
    with pytest.raises(ModelNotFound):
        load_processor("./no/such/model/dir")


def test_hub_not_found_errors_are_classed_deterministic():
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    for cause in (RepositoryNotFoundError("404 Client Error: Repository Not Found for url"),
                  GatedRepoError("403: access to model x is restricted")):
        try:
            try:
                raise cause
            except Exception as c:  # what transformers does: an OSError from the Hub's error
                raise OSError("x is not a local folder and is not a valid model identifier listed on "
                              "'https://huggingface.co/models'") from c
        except OSError as wrapped:
            retryable, message = _classify(wrapped)
        assert retryable is False and message.startswith("model not found"), message
    # the Hub could not be reached (online): still worth a retry
    try:
        try:
            raise LocalEntryNotFoundError("Cannot find the requested files in the disk cache")
        except Exception as c:
            raise OSError("We couldn't connect to 'https://huggingface.co' to load the files") from c
    except OSError as wrapped:
        assert _classify(wrapped)[0] is True


def test_a_step_on_a_missing_model_exits_deterministic(tmp_path):
    cfg = tiny_config(**{"model.name_or_path": str(tmp_path / "gone"), "machine.backend": "local"})
    code = execute_step("train", cfg, tmp_path / "work", lambda ctx: load_model(cfg.model.name_or_path))
    assert code == EXIT_DETERMINISTIC
    err = json.loads((tmp_path / "work" / "train" / ERROR_FILE).read_text())
    assert err["retryable"] is False and err["type"] == "ModelNotFound" and "gone" in err["message"]
