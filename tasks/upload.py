"""Upload the shipped model to the Hugging Face Hub (or any Hub-compatible endpoint).

`upload_to_hub` is the Prefect task: it uploads only a model that passed the quality gate (the
orchestrator's own verdict, tasks/verdict.py, checked again here), with its model card.
`push_model_folder` does the pushing, plain code testable against tests/hub_server.py.
The token is used only in memory: it never reaches a log line, the returned dict or an exception
message.

The folder came from a rented machine (a stranger's computer), so what goes to the user's Hub
account is an allowlist (`check_model_folder`): regular files named like an ONNX export (graphs that
parse as ONNX, the external data files they reference inside the folder, configs, tokenizer and
processor files) plus the README.md model card rendered here (never the machine's). A symlink, code, a pickle, a JSON asking for remote code (`auto_map`,
`custom_pipelines`) or any other file refuses the whole upload, naming the files: nothing is sent.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import stat
import threading
from pathlib import Path
from typing import Iterator, Optional

import requests
from huggingface_hub import CommitOperationAdd, HfApi, constants
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError
from prefect import get_run_logger, task
from prefect.runtime import flow_run

from contract.catalogue import quantized_variant
from contract.config import RunConfig
from contract.hub_config import resolve_endpoint
from contract.redaction import redact

from . import secrets
from .champion import (EVAL_FILE, card_lines, commit_message, compare, describe, history, read_champion,
                       revisions_of, utterance_record)
from .hub_unchanged import hub_holds, produced_by
from .model_card import render_model_card
from .onnx_check import onnx_problems
from .retry import retry_transient
from .scorecard import step_metrics
from .verdict import verified_metrics, verify_evaluation, without_counts

log = logging.getLogger(__name__)
_ENDPOINT_LOCK = threading.Lock()
NO_TOKEN_REASON = ("no Hugging Face token: set HF_TOKEN (or the Prefect Secret block 'hf-token') "
                   "to a token with the 'write' role to upload")


class HubUploadError(RuntimeError):
    """An upload that failed. The message names the cause and the fix, never the token.

    `retryable` is False when trying again cannot help (bad token, no rights, bad card)."""

    def __init__(self, message: str, retryable: bool):
        super().__init__(message)
        self.retryable = retryable


CARD_NAME = "README.md"  # written here from the rendered card; the machine's own is replaced, never sent
# What steps/convert.py writes into convert/qat_<scheme>/ (optimum's export + ONNX Runtime's quantizers).
ALLOWED_NAMES = frozenset({
    "config.json", "generation_config.json", "preprocessor_config.json", "processor_config.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "merges.txt", "normalizer.json",
})
# One extension, from the allowlist: `evil.py.onnx` is no export name. Their content: tasks/onnx_check.py.
ONNX_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,200}\.(?:onnx|onnx_data|onnx\.data)")
CODE_SUFFIXES = (".py", ".pyc", ".pyo", ".pyd", ".so", ".dll", ".dylib", ".exe", ".sh", ".bash", ".js", ".mjs",
                 ".ipynb", ".bat", ".cmd", ".ps1", ".rb", ".pl", ".jar", ".wasm")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz", ".dill", ".h5",
                   ".keras", ".msgpack", ".safetensors")
REMOTE_CODE_KEYS = frozenset({"auto_map", "custom_pipelines"})
MAX_JSON_BYTES = 64 * 2**20


class UnsafeModelFolder(HubUploadError):
    """The model folder holds something that must not reach the Hub; nothing was uploaded."""

    def __init__(self, message: str):
        super().__init__(message, retryable=False)


def _remote_code_keys(data: bytes) -> set[str]:
    """Keys asking for remote code anywhere in a JSON document (duplicates included)."""
    found: set[str] = set()

    def pairs(items):
        found.update(k for k, _ in items if k in REMOTE_CODE_KEYS)
        return dict(items)

    json.loads(data.decode("utf-8"), object_pairs_hook=pairs)
    return found


def check_model_folder(model_dir: Path) -> list[str]:
    """The files to upload (sorted names, the card excluded), or UnsafeModelFolder naming every
    entry that is refused and why. Looks at entries without following links; reads the JSON files'
    keys and the ONNX graphs (tasks/onnx_check.py: each parses, its external data are referenced
    files of this folder)."""
    model_dir = Path(model_dir)
    refused: dict[str, list[str]] = {}
    ok: list[str] = []
    if model_dir.is_symlink() or model_dir.parent.is_symlink():
        raise UnsafeModelFolder(f"refusing to upload {model_dir}: the folder (or its parent) is a symlink")
    for entry in sorted(os.scandir(model_dir), key=lambda e: e.name):
        name, lower = entry.name, entry.name.lower()
        mode = entry.stat(follow_symlinks=False).st_mode
        if stat.S_ISLNK(mode):
            why = "symlink"
        elif stat.S_ISDIR(mode):
            why = "folder"
        elif not stat.S_ISREG(mode):
            why = "not a regular file"
        elif lower.endswith(CODE_SUFFIXES):
            why = "code"
        elif lower.endswith(PICKLE_SUFFIXES):
            why = "pickle or other unvetted weights format"
        elif name == CARD_NAME:
            continue  # replaced by the card rendered here
        elif name in ALLOWED_NAMES or ONNX_NAME.fullmatch(name):
            why = ""
            if name.endswith(".json"):
                try:
                    size = entry.stat(follow_symlinks=False).st_size
                    if size > MAX_JSON_BYTES:
                        why = f"JSON over {MAX_JSON_BYTES} bytes"
                    else:
                        with open(entry.path, "rb") as f:
                            keys = _remote_code_keys(f.read(MAX_JSON_BYTES + 1))
                        why = f"asks for remote code ({', '.join(sorted(keys))})" if keys else ""
                except (ValueError, RecursionError, OSError):
                    why = "not valid JSON"
            if not why:
                ok.append(name)
                continue
        else:
            why = "not an expected export file"
        refused.setdefault(why, []).append(name)
    for name, why in onnx_problems(model_dir, ok).items():
        ok.remove(name)
        refused.setdefault(why, []).append(name)
    if refused:
        listing = "; ".join(f"{why}: {', '.join(repr(n) for n in names[:20])}"
                            + (f" and {len(names) - 20} more" if len(names) > 20 else "")
                            for why, names in refused.items())
        raise UnsafeModelFolder(f"refusing to upload {model_dir}: it holds files that must not reach the Hub "
                                f"({listing}). Only ONNX graphs and their external data, config/tokenizer/processor "
                                f"JSON and text files are uploaded; nothing was sent")
    if not ok:
        raise UnsafeModelFolder(f"refusing to upload {model_dir}: it holds no model files")
    return ok


@contextlib.contextmanager
def _client_endpoint(endpoint: str) -> Iterator[None]:
    """huggingface_hub builds CommitInfo/RepoUrl against `constants.ENDPOINT` (frozen at import from
    $HF_ENDPOINT) and fails on any other endpoint; point it at ours for the duration of the call."""
    with _ENDPOINT_LOCK:
        saved = constants.ENDPOINT
        constants.ENDPOINT = endpoint
        try:
            yield
        finally:
            constants.ENDPOINT = saved


def _explain(err: Exception, repo_id: str, endpoint: str, token: str) -> HubUploadError:
    """A clear, token-free error for what the Hub answered."""
    detail = redact(str(err), [token]).strip().splitlines()
    detail = " ".join(line.strip() for line in detail if line.strip())[:600]
    status = getattr(getattr(err, "response", None), "status_code", None)
    if isinstance(err, RepositoryNotFoundError) or status == 404:
        msg, retry = (f"repository {repo_id} not found on {endpoint} after creating it, or the token cannot see it: "
                      f"check hub.repo_id and the token's account"), False
    elif status == 401:
        msg, retry = (f"the Hugging Face token was rejected by {endpoint} (401): it is invalid or expired; "
                      f"set HF_TOKEN / the 'hf-token' secret to a valid token with the 'write' role"), False
    elif status == 403:
        msg, retry = (f"the token may not write to {repo_id} on {endpoint} (403): use a 'write' token of the "
                      f"owner of '{repo_id.split('/')[0]}' or change hub.repo_id"), False
    elif isinstance(err, ValueError) and "README.md" in str(err):
        msg, retry = f"the Hub refused the model card metadata for {repo_id}", False
    elif isinstance(err, (requests.ConnectionError, requests.Timeout)):
        msg, retry = f"could not reach {endpoint}: check the network or HF_ENDPOINT", True
    elif status is not None and status >= 500:
        msg, retry = f"the Hub at {endpoint} failed ({status}); try again later", True
    else:
        msg, retry = f"upload of {repo_id} to {endpoint} failed ({type(err).__name__})", status is None
    return HubUploadError(f"{msg}. Details: {detail}" if detail else msg, retryable=retry)


def push_model_folder(model_dir: Path, repo_id: str, token: Optional[str], private: bool = True, *, card: str,
                      endpoint: Optional[str] = None, commit_title: Optional[str] = None,
                      commit_description: str = "", extra_files: Optional[dict[str, bytes]] = None) -> dict:
    """Create (or reuse) `repo_id` and upload the allowlisted files (`check_model_folder`) with `card`
    as README.md, plus `extra_files` ({path in the repo: bytes} written at home, e.g. tasks/champion.py's
    per-utterance errors), in one commit; the folder is left as it is (it is a step's output, recorded
    at home).

    Without a token nothing is sent: {"uploaded": False, "reason", "path"}. When the repo already
    holds these files byte for byte (tasks/hub_unchanged.py) no commit is made: {"uploaded": False,
    "unchanged": True, "commit", "reason", ...}. Otherwise returns
    {"uploaded": True, "url", "commit", "files", "bytes", "private", "path"}; raises HubUploadError
    (UnsafeModelFolder, before anything is sent, for a folder that is not a clean export)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir() or not any(model_dir.iterdir()):
        raise HubUploadError(f"model folder {model_dir} is missing or empty: run the convert step first", retryable=False)
    if not card or not card.strip():
        raise HubUploadError("the model card is empty: render it with tasks.model_card.render_model_card", retryable=False)
    model_files = check_model_folder(model_dir)
    if not token:
        log.warning("not uploading %s: %s", model_dir, NO_TOKEN_REASON)
        return {"uploaded": False, "reason": NO_TOKEN_REASON, "path": model_dir}

    endpoint = resolve_endpoint(endpoint)
    api = HfApi(endpoint=endpoint, token=token)
    failure: Optional[HubUploadError] = None
    try:
        role = ((api.whoami().get("auth") or {}).get("accessToken") or {}).get("role")
        if role == "read":
            raise HubUploadError("the Hugging Face token has the 'read' role: create a token with the 'write' "
                                 "role and set HF_TOKEN / the 'hf-token' secret", retryable=False)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        is_private = bool(api.repo_info(repo_id, repo_type="model").private)
        if private and not is_private:
            log.warning("repository %s exists and is public; making it private as hub.private asks", repo_id)
            api.update_repo_settings(repo_id, private=True, repo_type="model")
            is_private = True
        elif not private and is_private:
            log.warning("repository %s exists and is private; it stays private (change it on the Hub)", repo_id)
        contents = {**{f: model_dir / f for f in model_files}, CARD_NAME: card.encode("utf-8"), **(extra_files or {})}
        files = sorted(contents)
        size = sum(len(c) if isinstance(c, bytes) else c.stat().st_size for c in contents.values())
        # the model's own files decide "nothing new": the card's history and the eval file's run id change every run
        same = hub_holds(api, repo_id, {f: model_dir / f for f in model_files})
        if same:
            log.info("%s already holds these %d model files (commit %s): nothing to upload", repo_id, len(model_files),
                     same["commit"])
            return {"uploaded": False, "unchanged": True, "url": f"{endpoint}/{repo_id}", "commit": same["commit"],
                    "reason": f"nothing new since the Hub commit {same['commit'][:12]} of {same['date']}: "
                              f"{repo_id} already holds these {len(model_files)} model files byte for byte",
                    "private": is_private, "path": model_dir}
        log.info("uploading %d files (%.1f MB) from %s to %s/%s", len(files), size / 1e6, model_dir, endpoint, repo_id)
        operations = [CommitOperationAdd(path_in_repo=f, path_or_fileobj=c if isinstance(c, bytes) else str(c))
                      for f, c in sorted(contents.items())]
        with _client_endpoint(endpoint):
            commit = api.create_commit(repo_id=repo_id, operations=operations, repo_type="model",
                                       commit_message=commit_title or f"Upload {model_dir.name} with its model card",
                                       commit_description=commit_description)
        missing = sorted(set(files) - set(api.list_repo_files(repo_id, repo_type="model")))
        if missing:
            raise HubUploadError(f"after the commit {repo_id} lacks {len(missing)} files: {missing[:5]}", retryable=True)
    except HubUploadError as e:
        failure = e
    except (HfHubHTTPError, requests.RequestException, ValueError, OSError) as e:
        failure = _explain(e, repo_id, endpoint, token)
    if failure is not None:  # raised outside the except block: no chained context holding the request
        raise failure
    return {"uploaded": True, "url": f"{endpoint}/{repo_id}", "commit": commit.oid, "files": len(files),
            "bytes": size, "private": is_private, "path": model_dir}


def _plan(cfg: RunConfig, results: dict, gate: dict, local_work: Path) -> dict:
    """What an upload of this run would do: {"link"} (the report's model link and why nothing is sent)
    when the gate failed (or fails when checked again at home), hub.repo_id is unset, or the model
    published there is better on the same test utterances; else what to send: {"model_dir", "token",
    "card", "title", "description", "extra", "decision"}."""
    run_log = get_run_logger()
    model_dir = Path(local_work) / "convert" / quantized_variant(cfg.quant.scheme)
    if not gate.get("passed"):
        run_log.warning("quality gate failed: not uploading; the model stays in %s", model_dir)
        return {"link": {"uploaded": False, "reason": "quality gate failed", "path": str(model_dir)}}
    if not cfg.hub.repo_id:
        return {"link": {"uploaded": False, "reason": "hub.repo_id is not set in the config", "path": str(model_dir)}}
    verdict = verify_evaluation(cfg, results.get("evaluate"), local_work, keep_counts=True)
    if not verdict["passed"]:
        run_log.warning("quality gate failed when checked at home (%s): not uploading; the model stays in %s",
                        verdict["reason"], model_dir)
        return {"link": {"uploaded": False, "reason": f"quality gate failed: {verdict['reason']}", "path": str(model_dir)}}
    mine = verdict["recomputed"][quantized_variant(cfg.quant.scheme)]
    verdict = {**verdict, "recomputed": without_counts(verdict["recomputed"])}
    token, run_id, repo = secrets.hf_token(), flow_run.get_id(), cfg.hub.repo_id
    decision, past, extra, title, description = None, [], None, None, ""
    if token:  # without one push_model_folder says why nothing is sent
        decision, past = _champion(cfg, repo, token, mine)
        if not decision["publish"]:
            run_log.warning("not uploading: %s", decision["reason"])
            return {"link": {"uploaded": False, "reason": decision["reason"], "path": str(model_dir),
                             "champion": describe(decision)}}
        extra = {EVAL_FILE: utterance_record(cfg, mine["ids"], *mine["counts"], run_id)}
        title, description = commit_message(cfg, verdict, decision, run_id, revisions_of(cfg, results))
    card = render_model_card(cfg, verified_metrics(step_metrics(results), verdict), card_lines(decision, past))
    return {"model_dir": model_dir, "token": token, "card": card, "title": title, "description": description,
            "extra": extra, "decision": decision}


@task(name="what would be published", retries=2, retry_delay_seconds=[10, 60], retry_jitter_factor=0.5,
      retry_condition_fn=retry_transient)
def upload_held(cfg: RunConfig, results: dict, gate: dict, local_work: Path) -> Optional[dict]:
    """The report's model link when this run would publish nothing (see `_plan`; also: no token, or
    the repo already holds these model files byte for byte: "nothing new since <run>"), else None.
    Asked before a person is asked to approve an upload (tasks/approval.py)."""
    plan = _plan(cfg, results, gate, local_work)
    if "link" in plan:
        return plan["link"]
    model_dir, token = plan["model_dir"], plan["token"]
    if not token:
        return {"uploaded": False, "reason": NO_TOKEN_REASON, "path": str(model_dir)}
    endpoint = resolve_endpoint(None)
    failure: Optional[HubUploadError] = None
    try:
        api = HfApi(endpoint=endpoint, token=token)
        same = hub_holds(api, cfg.hub.repo_id, {f: model_dir / f for f in check_model_folder(model_dir)})
    except RepositoryNotFoundError:
        return None  # nothing published yet
    except (HfHubHTTPError, requests.RequestException, OSError) as e:
        failure = _explain(e, cfg.hub.repo_id, endpoint, token)
    if failure is not None:  # raised outside the except block: no chained context holding the request
        raise failure
    if not same:
        return None
    return {"uploaded": False, "unchanged": True, "url": f"{endpoint}/{cfg.hub.repo_id}", "commit": same["commit"],
            "path": str(model_dir),
            "reason": f"nothing new since run {produced_by(Path(local_work)) or '(not found at home)'}; "
                      f"{cfg.hub.repo_id} already holds these model files byte for byte (Hub commit "
                      f"{same['commit'][:12]} of {same['date']})"}


@task(name="upload to hub", retries=2, retry_delay_seconds=[10, 60], retry_jitter_factor=0.5,
      retry_condition_fn=retry_transient)
def upload_to_hub(cfg: RunConfig, results: dict, gate: dict, local_work: Path) -> dict:
    """Push convert/qat_<scheme> with its card if the gate passed and hub.repo_id is set; else say why not.

    The gate is checked again here from the files at home (tasks/verdict.py), so a verdict that
    is only the machine's word never uploads; the card prints the orchestrator's verdict and figures.
    A model already published in the repository is kept when this one is worse on the same test
    utterances (tasks/champion.py); each upload is its own commit with the run id, the revisions,
    the figures and that comparison in its message, and `eval/utterances.json` beside the model."""
    plan = _plan(cfg, results, gate, Path(local_work))
    if "link" in plan:
        return plan["link"]
    model_dir, decision = plan["model_dir"], plan["decision"]
    out = push_model_folder(model_dir, cfg.hub.repo_id, plan["token"], private=cfg.hub.private, card=plan["card"],
                            commit_title=plan["title"], commit_description=plan["description"], extra_files=plan["extra"])
    if out.get("unchanged"):
        out["reason"] = f"nothing new since run {produced_by(Path(local_work)) or '(not found at home)'}; {out['reason']}"
    get_run_logger().info("upload: %s", out.get("url") or out.get("reason"))
    out.setdefault("path", str(model_dir))
    if decision is not None:
        out["champion"] = describe(decision)
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in out.items()}


def _champion(cfg: RunConfig, repo: str, token: str, mine: dict) -> tuple[dict, list[str]]:
    """tasks/champion.py's decision for this run's model and the repository's history; a Hub error
    becomes a HubUploadError (token-free, retryable when it may pass)."""
    endpoint = resolve_endpoint(None)
    api = HfApi(endpoint=endpoint, token=token)
    failure: Optional[HubUploadError] = None
    try:
        found, past = read_champion(api, repo, cfg), history(api, repo)
    except (HfHubHTTPError, requests.RequestException, OSError) as e:
        failure = _explain(e, repo, endpoint, token)
    if failure is not None:  # raised outside the except block: no chained context holding the request
        raise failure
    return compare(cfg, found, mine["ids"], *mine["counts"]), past
