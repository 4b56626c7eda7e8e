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

from contract.catalogue import quantized_variant
from contract.config import RunConfig
from contract.redaction import redact

from . import secrets
from .model_card import render_model_card
from .onnx_check import onnx_problems
from .retry import retry_transient
from .scorecard import step_metrics
from .verdict import verified_metrics, verify_evaluation

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


def _write_card(model_dir: Path, card: str) -> None:
    """README.md in the folder, replacing whatever was there, without following a link."""
    path = model_dir / CARD_NAME
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        mode = None
    if mode is not None:
        if not stat.S_ISREG(mode):
            raise UnsafeModelFolder(f"refusing to upload {model_dir}: {CARD_NAME} is a symlink or not a regular file")
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(card)


def resolve_endpoint(endpoint: Optional[str]) -> str:
    """The argument, else $HF_ENDPOINT read now (not at import), else the public Hub."""
    return (endpoint or os.environ.get("HF_ENDPOINT") or constants._HF_DEFAULT_ENDPOINT).rstrip("/")


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
                 endpoint: Optional[str] = None) -> dict:
    """Create (or reuse) `repo_id`, write `card` as README.md into `model_dir` and upload the
    allowlisted files (`check_model_folder`) with it, in one commit.

    Without a token nothing is sent: {"uploaded": False, "reason", "path"}. Otherwise returns
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
        _write_card(model_dir, card)
        files = sorted(model_files + [CARD_NAME])
        log.info("uploading %d files (%.1f MB) from %s to %s/%s", len(files),
                 sum((model_dir / f).stat().st_size for f in files) / 1e6, model_dir, endpoint, repo_id)
        operations = [CommitOperationAdd(path_in_repo=f, path_or_fileobj=str(model_dir / f)) for f in files]
        with _client_endpoint(endpoint):
            commit = api.create_commit(repo_id=repo_id, operations=operations, repo_type="model",
                                       commit_message=f"Upload {model_dir.name} with its model card")
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
            "bytes": sum((model_dir / f).stat().st_size for f in files), "private": is_private, "path": model_dir}


@task(name="upload to hub", retries=2, retry_delay_seconds=[10, 60], retry_jitter_factor=0.5,
      retry_condition_fn=retry_transient)
def upload_to_hub(cfg: RunConfig, results: dict, gate: dict, local_work: Path) -> dict:
    """Push convert/qat_<scheme> with its card if the gate passed and hub.repo_id is set; else say why not.

    The gate is checked again here from the files at home (tasks/verdict.py), so a verdict that
    is only the machine's word never uploads; the card prints the orchestrator's verdict and figures."""
    run_log = get_run_logger()
    local_work = Path(local_work)
    model_dir = local_work / "convert" / quantized_variant(cfg.quant.scheme)
    if not gate.get("passed"):
        run_log.warning("quality gate failed: not uploading; the model stays in %s", model_dir)
        return {"uploaded": False, "reason": "quality gate failed", "path": str(model_dir)}
    if not cfg.hub.repo_id:
        return {"uploaded": False, "reason": "hub.repo_id is not set in the config", "path": str(model_dir)}
    verdict = verify_evaluation(cfg, results.get("evaluate"), local_work)
    if not verdict["passed"]:
        run_log.warning("quality gate failed when checked at home (%s): not uploading; the model stays in %s",
                        verdict["reason"], model_dir)
        return {"uploaded": False, "reason": f"quality gate failed: {verdict['reason']}", "path": str(model_dir)}
    card = render_model_card(cfg, verified_metrics(step_metrics(results), verdict))
    out = push_model_folder(model_dir, cfg.hub.repo_id, secrets.hf_token(), private=cfg.hub.private, card=card)
    run_log.info("upload: %s", out.get("url") or out.get("reason"))
    out.setdefault("path", str(model_dir))
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in out.items()}
