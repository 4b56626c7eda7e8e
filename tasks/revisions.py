"""The exact Hub commits a run starts from, resolved at home before anything is rented.

`pin_revisions` asks the Hub (huggingface_hub's model_info / dataset_info, against $HF_ENDPOINT or
the public Hub, with the HF token if any) for the commit of `model.revision` / `data.revision`
(unset: main) and returns the config with those fields set to the 40-hex commit ids. That config
is the one written to run.yaml, hashed (contract/fingerprint.py records the commit) and pushed,
so every download on the machine uses exactly that commit, and a new commit of the model or the
dataset on the Hub changes the steps' hash: they run again. A fixture model or a manifest dataset
has no Hub revision: the step hash records the fixture's name (its builder is in the code hash) or
the files' content (`contract.fingerprint.inputs_in_words` says which).

A repository or revision the Hub does not know, or a Hub that cannot be reached, is refused here,
before any cost, naming the field and what to do.
"""
from __future__ import annotations

import os
from typing import Optional

import requests
from huggingface_hub import HfApi
from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, RepositoryNotFoundError,
                                    RevisionNotFoundError)
from prefect import get_run_logger, task

from contract.config import ConfigError, RunConfig, hub_model_id
from contract.fingerprint import COMMIT, inputs_in_words
from contract.hub_config import resolve_endpoint

from . import secrets
from .upload import redact


class RevisionError(ConfigError):
    """A Hub input whose commit could not be resolved; nothing was rented."""


def resolve_commit(kind: str, repo_id: str, revision: Optional[str], *, endpoint: Optional[str] = None,
                   token: Optional[str] = None) -> str:
    """The commit id of `repo_id` (kind "model" or "dataset") at `revision` (None: main) on the Hub."""
    endpoint = resolve_endpoint(endpoint)
    field = "model.revision" if kind == "model" else "data.revision"
    where = f"{kind} {repo_id!r} at revision {revision or 'main'!r} on {endpoint}"
    api = HfApi(endpoint=endpoint, token=token or False)  # False: no token from the environment's login
    failure: Optional[RevisionError] = None
    try:
        info = api.model_info(repo_id, revision=revision) if kind == "model" else api.dataset_info(repo_id, revision=revision)
        if not info.sha or not COMMIT.fullmatch(info.sha):
            raise RevisionError(f"the Hub answered no commit id for {where} (got {info.sha!r})")
        return info.sha
    except RevisionNotFoundError:
        failure = RevisionError(f"{where}: no such revision. Set {field} to an existing commit id, branch or tag "
                                f"(or remove it for main)")
    except (RepositoryNotFoundError, GatedRepoError) as e:
        failure = RevisionError(f"{where}: the repository does not exist or this token may not read it "
                                f"({type(e).__name__}). Check the {kind} id, and set HF_TOKEN (or the 'hf-token' "
                                f"secret) for a private or gated repository")
    except (requests.ConnectionError, requests.Timeout) as e:
        failure = RevisionError(f"{where}: the Hub could not be reached ({type(e).__name__}), so the commit the run "
                                f"would start from is unknown; nothing was rented. Check the network or HF_ENDPOINT, "
                                f"and run again")
    except HfHubHTTPError as e:
        status = getattr(e.response, "status_code", None)
        failure = RevisionError(f"{where}: the Hub answered {status}: {redact(str(e), token)[:300]}. Nothing was "
                                f"rented; check HF_TOKEN / HF_ENDPOINT, or run again later if the Hub is failing")
    raise failure  # outside the except blocks: no chained context holding the request


def pinned(cfg: RunConfig, *, endpoint: Optional[str] = None, token: Optional[str] = None) -> RunConfig:
    """`cfg` with model.revision / data.revision set to their commit ids (Hub inputs only)."""
    model, data = cfg.model, cfg.data
    if hub_model_id(model.name_or_path):
        model = model.model_copy(update={"revision": resolve_commit(
            "model", model.name_or_path, model.revision, endpoint=endpoint, token=token)})
    if data.source == "hf":
        data = data.model_copy(update={"revision": resolve_commit(
            "dataset", data.dataset, data.revision, endpoint=endpoint, token=token)})
    return cfg.model_copy(update={"model": model, "data": data})


def hub_endpoint_env() -> dict[str, str]:
    """{"HF_ENDPOINT": ...} when home uses another Hub than the public one: the machine downloads the
    commits from the Hub they were resolved on (an endpoint is no secret; the token never goes there)."""
    endpoint = os.environ.get("HF_ENDPOINT", "").strip()
    return {"HF_ENDPOINT": endpoint} if endpoint else {}


@task(name="pin revisions")
def pin_revisions(cfg: RunConfig) -> RunConfig:
    """The config with the Hub commits of its model and dataset (refused before renting when unknown)."""
    out = pinned(cfg, token=secrets.hf_token())
    for what, text in inputs_in_words(out).items():
        get_run_logger().info("%s: %s", what, text)
    return out
