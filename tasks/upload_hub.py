"""Upload a converted model folder to the Hugging Face Hub (or any Hub-compatible endpoint).

Plain functions, no Prefect: the Prefect task in tasks/gate.py calls `upload_model`. The token is
used only in memory: it never reaches a log line, the returned dict or an exception message.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
from pathlib import Path
from typing import Iterator, Optional

import requests
from huggingface_hub import HfApi, constants
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

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


def redact(text: str, token: Optional[str]) -> str:
    return text.replace(token, "***") if token else text


def local_files(model_dir: Path) -> list[str]:
    """Paths (relative, posix) that upload_folder sends: everything but .git/ and .cache/."""
    return sorted(p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*")
                  if p.is_file() and not {".git", ".cache"} & set(p.relative_to(model_dir).parts))


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
    detail = redact(str(err), token).strip().splitlines()
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


def upload_model(model_dir: Path, repo_id: str, token: Optional[str], private: bool = True, *, card: str,
                 endpoint: Optional[str] = None) -> dict:
    """Create (or reuse) `repo_id`, write `card` as README.md into `model_dir` and upload the folder.

    Without a token nothing is sent: {"uploaded": False, "reason", "path"}. Otherwise returns
    {"uploaded": True, "url", "commit", "files", "bytes", "private", "path"}; raises HubUploadError."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir() or not any(model_dir.iterdir()):
        raise HubUploadError(f"model folder {model_dir} is missing or empty: run the convert step first", retryable=False)
    if not card or not card.strip():
        raise HubUploadError("the model card is empty: render it with tasks.model_card.render_model_card", retryable=False)
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
        (model_dir / "README.md").write_text(card, encoding="utf-8")
        files = local_files(model_dir)
        log.info("uploading %d files (%.1f MB) from %s to %s/%s", len(files),
                 sum((model_dir / f).stat().st_size for f in files) / 1e6, model_dir, endpoint, repo_id)
        with _client_endpoint(endpoint):
            commit = api.upload_folder(repo_id=repo_id, folder_path=model_dir, repo_type="model",
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
