"""An offline stand-in for the Hugging Face Hub: the HTTP endpoints `huggingface_hub` calls to upload.

Serves whoami, repo create / settings / info / tree / commit list, README metadata validation, preupload,
the git-LFS batch API with basic transfer (a one-time upload URL it serves, like a pre-signed S3
URL) + verify, the NDJSON commit endpoint and file download (resolve). Repositories live on disk
under `root/repos/<owner>/<name>/` (`meta.json` + `files/`), LFS objects under `root/lfs/`.
Model and dataset info answer for a revision too: "main", any commit id of the repo's history or a
tag (`HubServer.tag`), with that commit's sha and file list, as the Hub does; file contents are
served for the head commit only. `HubServer.publish` commits files straight into a model or
dataset repo (a dataset's stand-in: its info and revisions, not its rows).
Like the Hub, a new repo starts with a `.gitattributes` whose patterns (and files of 10 MB or
more) go through LFS. Tokens never appear in what it stores or logs.

    with HubServer(tmp_path, tokens={"hf_secret": ("alice", "write")}) as hub:
        HfApi(endpoint=hub.url, token="hf_secret").create_repo("alice/m")
"""
from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import re
import secrets
import shutil
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, Optional
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

LFS_SIZE_THRESHOLD = 10 * 1024 * 1024  # the Hub stores files of 10 MB or more in LFS
DEFAULT_GITATTRIBUTES = "".join(
    f"{p} filter=lfs diff=lfs merge=lfs -text\n"
    for p in ("*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gz", "*.h5", "*.joblib", "*.lfs",
              "*.mlmodel", "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot", "*.parquet", "*.pb",
              "*.pickle", "*.pkl", "*.pt", "*.pth", "*.rar", "*.safetensors", "saved_model/**/*", "*.tar.*",
              "*.tar", "*.tflite", "*.tgz", "*.wasm", "*.xz", "*.zip", "*.zst", "*tfevents*"))
BAD_TOKEN = "Invalid credentials in Authorization header"
REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"
REV = r"(?P<rev>[^/]+)"
DATASETS = "datasets/"  # a dataset repo's key in HubState: "datasets/<owner>/<name>"
# The Hub answers with its public URLs whatever endpoint was asked; the client maps them back
# onto its endpoint (and CommitInfo only parses URLs of the public Hub or of HF_ENDPOINT).
PUBLIC_URL = "https://huggingface.co"


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(oid: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n".encode()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


class HubError(Exception):
    def __init__(self, status: int, message: str, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


def validate_card_metadata(content: str) -> list[str]:
    """Errors in a README's YAML front matter, checked the way the Hub checks model-index."""
    m = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", content, re.S)
    if not m:
        return []
    try:
        meta = yaml.safe_load(m.group(1))
    except yaml.YAMLError as e:
        return [f"YAML front matter does not parse: {e}"]
    if not isinstance(meta, dict):
        return ["YAML front matter must be a mapping"]
    errors = []
    for key in ("license", "pipeline_tag", "base_model"):
        if key in meta and not isinstance(meta[key], (str, list)):
            errors.append(f'"{key}" must be a string')
    if "tags" in meta and not (isinstance(meta["tags"], list) and all(isinstance(t, str) for t in meta["tags"])):
        errors.append('"tags" must be a list of strings')
    index = meta.get("model-index")
    if index is None:
        return errors
    if not isinstance(index, list) or not index:
        return errors + ['"model-index" must be a non-empty list']
    for i, model in enumerate(index):
        if not isinstance(model, dict) or not isinstance(model.get("name"), str):
            errors.append(f'"model-index[{i}].name" must be a string')
            continue
        for j, res in enumerate(model.get("results") or []):
            where = f"model-index[{i}].results[{j}]"
            if not isinstance((res.get("task") or {}).get("type"), str):
                errors.append(f'"{where}.task.type" is required')
            ds = res.get("dataset") or {}
            if not (isinstance(ds.get("name"), str) and isinstance(ds.get("type"), str)):
                errors.append(f'"{where}.dataset" needs "name" and "type"')
            metrics = res.get("metrics")
            if not isinstance(metrics, list) or not metrics:
                errors.append(f'"{where}.metrics" must be a non-empty list')
                continue
            for k, met in enumerate(metrics):
                if not isinstance(met.get("type"), str) or isinstance(met.get("value"), bool) \
                        or not isinstance(met.get("value"), (int, float, str)):
                    errors.append(f'"{where}.metrics[{k}]" needs "type" and a "value"')
    return errors


class HubState:
    """The repositories and LFS objects on disk; every method holds the lock."""

    def __init__(self, root: Path, tokens: dict[str, tuple[str, str]]):
        self.root = Path(root)
        self.tokens = dict(tokens)
        self.lock = threading.RLock()
        self.upload_tickets: dict[str, tuple[str, int]] = {}
        (self.root / "lfs").mkdir(parents=True, exist_ok=True)
        (self.root / "repos").mkdir(parents=True, exist_ok=True)

    # -- auth -------------------------------------------------------------------------------------
    def user(self, authorization: Optional[str]) -> Optional[tuple[str, str]]:
        """(name, role) for the bearer token; None when anonymous; 401 for an unknown token."""
        if not authorization:
            return None
        token = authorization.removeprefix("Bearer ").strip()
        if token not in self.tokens:
            raise HubError(401, BAD_TOKEN)
        return self.tokens[token]

    def need_write(self, user: Optional[tuple[str, str]], repo_id: str) -> None:
        if user is None:
            raise HubError(401, "You must be authenticated to write to this repository")
        name, role = user
        if role != "write":
            raise HubError(403, f"Your token has the '{role}' role: a 'write' token is needed to write to {repo_id}")
        if repo_id.split("/")[0] != name:
            raise HubError(403, f"You don't have the rights to write to namespace '{repo_id.split('/')[0]}'")

    def need_read(self, user: Optional[tuple[str, str]], repo_id: str) -> dict:
        meta = self.meta(repo_id)
        if meta is None or (meta["private"] and (user is None or user[0] != repo_id.split("/")[-2])):
            raise HubError(404 if user else 401, "Repository not found", "RepoNotFound")
        return meta

    # -- storage ----------------------------------------------------------------------------------
    def repo_dir(self, repo_id: str) -> Path:
        if repo_id.startswith(DATASETS):
            return self.root / "dataset-repos" / repo_id.removeprefix(DATASETS)
        return self.root / "repos" / repo_id

    def meta(self, repo_id: str) -> Optional[dict]:
        p = self.repo_dir(repo_id) / "meta.json"
        return json.loads(p.read_text()) if p.is_file() else None

    def save_meta(self, repo_id: str, meta: dict) -> None:
        p = self.repo_dir(repo_id) / "meta.json"
        tmp = p.with_suffix(".tmp")
        tmp.write_text(json.dumps(meta, indent=1))
        tmp.replace(p)

    def file_path(self, repo_id: str, path: str) -> Path:
        if path.startswith("/") or ".." in Path(path).parts or not path:
            raise HubError(400, f"invalid path in repo: {path!r}")
        return self.repo_dir(repo_id) / "files" / path

    def lfs_path(self, oid: str) -> Path:
        if not re.fullmatch(r"[0-9a-f]{64}", oid):
            raise HubError(400, f"invalid LFS oid {oid!r}")
        return self.root / "lfs" / oid

    def is_lfs(self, repo_id: str, path: str, size: int) -> bool:
        if size >= LFS_SIZE_THRESHOLD:
            return True
        attrs = self.file_path(repo_id, ".gitattributes")
        patterns = [ln.split()[0] for ln in attrs.read_text().splitlines() if "filter=lfs" in ln] if attrs.is_file() else []
        name = path.rsplit("/", 1)[-1]
        return any(fnmatch.fnmatch(path, p) or fnmatch.fnmatch(name, p) for p in patterns)

    # -- operations -------------------------------------------------------------------------------
    def create_repo(self, user, body: dict, base: str) -> tuple[int, dict]:
        repo_type = body.get("type") or "model"
        if repo_type != "model":
            raise HubError(400, f"this test hub serves model repos only, not {repo_type!r}")
        name, org = body.get("name"), body.get("organization") or (user[0] if user else None)
        if not name or not re.fullmatch(r"[\w.-]+", name) or not org:
            raise HubError(400, f"invalid repo name {name!r}")
        repo_id = f"{org}/{name}"
        self.need_write(user, repo_id)
        with self.lock:
            if self.meta(repo_id) is not None:
                return 409, {"error": "You already created this model repo", "url": f"{base}/{repo_id}"}
            self.repo_dir(repo_id).mkdir(parents=True)
            meta = {"id": repo_id, "private": bool(body.get("private", False)), "createdAt": _now(),
                    "sha": None, "commits": [], "files": {}}
            self.save_meta(repo_id, meta)
            self.commit(repo_id, [{"key": "header", "value": {"summary": "initial commit"}},
                                  {"key": "file", "value": {"path": ".gitattributes", "encoding": "base64",
                                                            "content": base64.b64encode(DEFAULT_GITATTRIBUTES.encode()).decode()}}])
        return 200, {"url": f"{base}/{repo_id}", "name": repo_id, "id": repo_id}

    def commit(self, repo_id: str, items: list[dict]) -> str:
        """Apply an NDJSON commit payload; returns the new commit id."""
        with self.lock:
            meta = self.meta(repo_id)
            header = next((it["value"] for it in items if it.get("key") == "header"), None)
            if header is None:
                raise HubError(400, "commit payload has no header line")
            parent = header.get("parentCommit")
            if parent and parent != meta["sha"]:
                raise HubError(412, f"parent commit {parent} is not the head of main ({meta['sha']})")
            files = dict(meta["files"])
            writes: list[tuple[str, Optional[bytes], Optional[str]]] = []
            for it in items:
                key, val = it.get("key"), it.get("value") or {}
                if key == "file":
                    data = base64.b64decode(val["content"]) if val.get("encoding") == "base64" else val["content"].encode()
                    files[val["path"]] = {"size": len(data), "blob": git_blob_sha1(data), "lfs": None}
                    writes.append((val["path"], data, None))
                elif key == "lfsFile":
                    obj = self.lfs_path(val["oid"])
                    if not obj.is_file() or obj.stat().st_size != val["size"]:
                        raise HubError(400, f"LFS object {val['oid']} for {val['path']} was not uploaded")
                    pointer = lfs_pointer(val["oid"], val["size"])
                    files[val["path"]] = {"size": val["size"], "blob": git_blob_sha1(pointer), "lfs": val["oid"]}
                    writes.append((val["path"], None, val["oid"]))
                elif key in ("deletedFile", "deletedFolder"):
                    prefix = val["path"].rstrip("/") + "/"
                    gone = [p for p in files if p == val["path"] or (key == "deletedFolder" and p.startswith(prefix))]
                    if not gone:
                        raise HubError(404, f"A file with this name doesn't exist: {val['path']}", "EntryNotFound")
                    for p in gone:
                        del files[p]
                        writes.append((p, None, None))
                elif key != "header":
                    raise HubError(400, f"unsupported commit operation {key!r}")
            for path, data, oid in writes:
                target = self.file_path(repo_id, path)
                target.parent.mkdir(parents=True, exist_ok=True)
                if data is not None:
                    target.write_bytes(data)
                elif oid is not None:
                    shutil.copyfile(self.lfs_path(oid), target)
                else:
                    target.unlink(missing_ok=True)
            listing = json.dumps(sorted(files.items()), sort_keys=True)
            oid = hashlib.sha1(f"{meta['sha']}\n{header.get('summary')}\n{time.time_ns()}\n{listing}".encode()).hexdigest()
            meta.update(sha=oid, files=files, lastModified=_now())
            meta["commits"].append({"oid": oid, "summary": header.get("summary", ""),
                                    "description": header.get("description", ""), "date": meta["lastModified"],
                                    "files": files})
            self.save_meta(repo_id, meta)
            return oid

    def commit_at(self, meta: dict, rev: str) -> dict:
        """The commit a revision names: "main", a commit id of the history or a tag; else 404."""
        rev = unquote(rev)
        oid = meta["sha"] if rev == "main" else meta.get("tags", {}).get(rev, rev)
        found = next((c for c in meta["commits"] if c["oid"] == oid), None)
        if found is None:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return found

    def info(self, repo_id: str, meta: dict, rev: str = "main") -> dict:
        at = self.commit_at(meta, rev)
        files = at.get("files", meta["files"])
        siblings = [{"rfilename": p, "size": f["size"], "blobId": f["blob"],
                     **({"lfs": {"size": f["size"], "sha256": f["lfs"], "pointerSize": len(lfs_pointer(f["lfs"], f["size"]))}}
                        if f["lfs"] else {})} for p, f in sorted(files.items())]
        card = {}
        readme = self.file_path(repo_id, "README.md")
        if readme.is_file():
            m = re.match(r"^---\s*\n(.*?)\n---", readme.read_text(), re.S)
            card = (yaml.safe_load(m.group(1)) or {}) if m else {}
        name = repo_id.removeprefix(DATASETS)
        out = {"id": name, **({} if name != repo_id else {"modelId": name}), "author": name.split("/")[0],
               "sha": at["oid"], "private": meta["private"], "disabled": False, "gated": False,
               "createdAt": meta["createdAt"], "lastModified": at["date"], "siblings": siblings,
               "tags": card.get("tags", []), "pipeline_tag": card.get("pipeline_tag"), "downloads": 0, "likes": 0}
        if card:
            out["cardData"] = card
            if "model-index" in card:
                out["model-index"] = card["model-index"]
        return out

    def tree(self, meta: dict, path: str, recursive: bool) -> list[dict]:
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        entries, dirs = [], set()
        for p, f in sorted(meta["files"].items()):
            if not p.startswith(prefix):
                continue
            rest = p[len(prefix):]
            parts = rest.split("/")
            for i in range(1, len(parts) if recursive else min(2, len(parts))):
                dirs.add(prefix + "/".join(parts[:i]))
            if recursive or len(parts) == 1:
                e = {"type": "file", "oid": f["blob"], "size": f["size"], "path": p}
                if f["lfs"]:
                    e["lfs"] = {"oid": f["lfs"], "size": f["size"], "pointerSize": len(lfs_pointer(f["lfs"], f["size"]))}
                entries.append(e)
        if prefix and not entries and not dirs:
            raise HubError(404, f"{path} does not exist on main", "EntryNotFound")
        folders = [{"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d}
                   for d in sorted(dirs)]
        return folders + entries


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "_Server"

    def log_message(self, format, *args):  # quiet; the request list is in HubServer.requests
        pass

    # -- plumbing ---------------------------------------------------------------------------------
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, payload=None, headers: Optional[dict] = None, raw: Optional[bytes] = None,
              head: bool = False) -> None:
        body = raw if raw is not None else json.dumps(payload if payload is not None else {}).encode()
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if raw is None:
            self.send_header("Content-Type", "application/json")
        if "Content-Length" not in (headers or {}):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        path, query = unquote(url.path), parse_qs(url.query)
        self.server.hub.requests.append((method, path))
        body = self._body() if method in ("POST", "PUT") else b""
        try:
            for m, pattern, fn in _ROUTES:
                match = re.fullmatch(pattern, path)
                if m == method or (m == "GET" and method == "HEAD" and fn is _resolve):
                    if match:
                        return fn(self, match.groupdict(), query, body, method)
            raise HubError(404, f"no route for {method} {path}")
        except HubError as e:
            headers = {"X-Error-Message": e.message}
            if e.code:
                headers["X-Error-Code"] = e.code
            self._send(e.status, {"error": e.message}, headers, head=method == "HEAD")
        except (KeyError, ValueError, TypeError) as e:
            self._send(400, {"error": f"bad request: {e}"}, {"X-Error-Message": f"bad request: {e}"})

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    @property
    def state(self) -> HubState:
        return self.server.hub.state

    @property
    def base(self) -> str:
        return self.server.hub.url

    def who(self):
        return self.state.user(self.headers.get("Authorization"))


_ROUTES: list[tuple[str, str, Callable]] = []  # (method, path regex, handler); paths match whole, so order is free


def _route(method: str, pattern: str) -> Callable[[Callable], Callable]:
    """Register the decorated handler for `method` on paths that fully match `pattern`."""
    def register(fn: Callable) -> Callable:
        _ROUTES.append((method, pattern, fn))
        return fn
    return register


def _check_rev(rev: str, meta: Optional[dict] = None) -> None:
    """Only 'main' and (for reads) the id of its head commit exist here."""
    if unquote(rev) != "main" and not (meta and unquote(rev) == meta["sha"]):
        raise HubError(404, f"Revision {rev!r} not found: this test hub keeps only 'main' and its head commit",
                       "RevisionNotFound")


@_route("GET", r"/api/whoami-v2")
def _whoami(h: _Handler, g, q, body, method):
    user = h.who()
    if user is None:
        raise HubError(401, BAD_TOKEN)
    h._send(200, {"type": "user", "id": user[0], "name": user[0], "fullname": user[0], "orgs": [],
                  "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": user[1]}}})


@_route("POST", r"/api/repos/create")
def _create(h: _Handler, g, q, body, method):
    status, payload = h.state.create_repo(h.who(), json.loads(body or b"{}"), PUBLIC_URL)
    h._send(status, payload)


@_route("PUT", rf"/api/models/{REPO}/settings")
def _settings(h: _Handler, g, q, body, method):
    repo_id, user = g["repo"], h.who()
    h.state.need_read(user, repo_id)
    h.state.need_write(user, repo_id)
    changes = json.loads(body or b"{}")
    with h.state.lock:
        meta = h.state.meta(repo_id)
        if "private" in changes:
            meta["private"] = bool(changes["private"])
        h.state.save_meta(repo_id, meta)
    h._send(200, {"private": meta["private"]})


@_route("POST", r"/api/validate-yaml")
def _validate_yaml(h: _Handler, g, q, body, method):
    errors = validate_card_metadata(json.loads(body).get("content", ""))
    if errors:
        h._send(400, {"errors": [{"message": e} for e in errors]}, {"X-Error-Message": "; ".join(errors)})
    else:
        h._send(200, {"warnings": []})


@_route("GET", rf"/api/models/{REPO}/revision/{REV}")
@_route("GET", rf"/api/models/{REPO}")
def _info(h: _Handler, g, q, body, method):
    meta = h.state.need_read(h.who(), g["repo"])
    h._send(200, h.state.info(g["repo"], meta, g.get("rev") or "main"))


@_route("GET", rf"/api/datasets/{REPO}/revision/{REV}")
@_route("GET", rf"/api/datasets/{REPO}")
def _dataset_info(h: _Handler, g, q, body, method):
    key = DATASETS + g["repo"]
    meta = h.state.need_read(h.who(), key)
    h._send(200, h.state.info(key, meta, g.get("rev") or "main"))


@_route("GET", rf"/api/models/{REPO}/commits/{REV}")
def _commits(h: _Handler, g, q, body, method):
    """The commit list, newest first, as the Hub pages it (one page here)."""
    meta = h.state.need_read(h.who(), g["repo"])
    _check_rev(g["rev"], meta)
    h._send(200, [{"id": c["oid"], "title": c["summary"], "message": c.get("description", ""),
                   "authors": [{"user": g["repo"].split("/")[0]}], "date": c["date"]}
                  for c in reversed(meta["commits"])])


@_route("GET", rf"/api/models/{REPO}/tree/{REV}(?:/(?P<path>.+))?")
def _tree(h: _Handler, g, q, body, method):
    meta = h.state.need_read(h.who(), g["repo"])
    _check_rev(g["rev"], meta)
    recursive = (q.get("recursive") or ["False"])[0].lower() == "true"
    h._send(200, h.state.tree(meta, g.get("path") or "", recursive))


@_route("POST", rf"/api/models/{REPO}/preupload/{REV}")
def _preupload(h: _Handler, g, q, body, method):
    _check_rev(g["rev"])
    repo_id, user = g["repo"], h.who()
    meta = h.state.need_read(user, repo_id)
    h.state.need_write(user, repo_id)
    files = []
    for f in json.loads(body)["files"]:
        lfs = h.state.is_lfs(repo_id, f["path"], int(f["size"]))
        known = meta["files"].get(f["path"])
        oid = (known["lfs"] if lfs else (None if known and known["lfs"] else known["blob"])) if known else None
        files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid})
    h._send(200, {"files": files, "commitOid": meta["sha"]})


@_route("POST", rf"/{REPO}\.git/info/lfs/objects/batch")
def _lfs_batch(h: _Handler, g, q, body, method):
    repo_id, user = g["repo"], h.who()
    h.state.need_read(user, repo_id)
    h.state.need_write(user, repo_id)
    req = json.loads(body)
    if req.get("operation") != "upload" or "basic" not in req.get("transfers", ["basic"]):
        raise HubError(400, "this test hub supports LFS upload with the basic transfer only")
    objects = []
    for o in req["objects"]:
        oid, size = o["oid"], int(o["size"])
        stored = h.state.lfs_path(oid)
        item = {"oid": oid, "size": size, "authenticated": True}
        if not (stored.is_file() and stored.stat().st_size == size):
            ticket = secrets.token_urlsafe(16)
            with h.state.lock:
                h.state.upload_tickets[ticket] = (oid, size)
            item["actions"] = {"upload": {"href": f"{h.base}/lfs-upload/{ticket}", "header": {}},
                               "verify": {"href": f"{h.base}/{repo_id}.git/info/lfs/objects/verify", "header": {}}}
        objects.append(item)
    h._send(200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"})


@_route("PUT", r"/lfs-upload/(?P<ticket>[\w-]+)")
def _lfs_put(h: _Handler, g, q, body, method):
    with h.state.lock:
        ticket = h.state.upload_tickets.pop(g["ticket"], None)
    if ticket is None:
        raise HubError(403, "upload URL unknown or already used")
    oid, size = ticket
    if len(body) != size or hashlib.sha256(body).hexdigest() != oid:
        raise HubError(400, f"uploaded content does not match oid {oid} / size {size}")
    target = h.state.lfs_path(oid)
    tmp = target.with_suffix(f".{g['ticket']}.part")
    tmp.write_bytes(body)
    tmp.replace(target)
    h._send(200, raw=b"", headers={"ETag": f'"{hashlib.md5(body).hexdigest()}"'})


@_route("POST", rf"/{REPO}\.git/info/lfs/objects/verify")
def _lfs_verify(h: _Handler, g, q, body, method):
    repo_id, user = g["repo"], h.who()
    h.state.need_write(user, repo_id)
    o = json.loads(body)
    stored = h.state.lfs_path(o["oid"])
    if not (stored.is_file() and stored.stat().st_size == int(o["size"])):
        raise HubError(404, f"LFS object {o['oid']} not found")
    h._send(200, {"message": "Object verified"})


@_route("POST", rf"/api/models/{REPO}/commit/{REV}")
def _commit(h: _Handler, g, q, body, method):
    _check_rev(g["rev"])
    repo_id, user = g["repo"], h.who()
    h.state.need_read(user, repo_id)
    h.state.need_write(user, repo_id)
    items = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
    oid = h.state.commit(repo_id, items)
    h._send(200, {"success": True, "commitOid": oid, "commitUrl": f"{PUBLIC_URL}/{repo_id}/commit/{oid}",
                  "pullRequestUrl": None})


@_route("GET", rf"/{REPO}/resolve/{REV}/(?P<path>.+)")
def _resolve(h: _Handler, g, q, body, method):
    repo_id = g["repo"]
    meta = h.state.need_read(h.who(), repo_id)
    _check_rev(g["rev"], meta)
    f = meta["files"].get(g["path"])
    if f is None:
        raise HubError(404, f"Entry not found: {g['path']}", "EntryNotFound")
    headers = {"X-Repo-Commit": meta["sha"], "ETag": f'"{f["blob"]}"', "Content-Length": str(f["size"]),
               "Content-Type": "application/octet-stream"}
    if f["lfs"]:
        headers.update({"X-Linked-Etag": f'"{f["lfs"]}"', "X-Linked-Size": str(f["size"])})
    data = b"" if method == "HEAD" else h.state.file_path(repo_id, g["path"]).read_bytes()
    h._send(200, headers=headers, raw=data, head=method == "HEAD")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    hub: "HubServer"


class HubServer:
    """The test hub on 127.0.0.1 (a free port). `tokens`: token -> (user name, "write" | "read")."""

    def __init__(self, root: Path, tokens: dict[str, tuple[str, str]]):
        self.state = HubState(root, tokens)
        self.requests: list[tuple[str, str]] = []
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.hub = self
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread: Optional[threading.Thread] = None

    def start(self) -> "HubServer":
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="hub-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread:
            self._thread.join(timeout=5)

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def repo_files(self, repo_id: str) -> dict[str, dict]:
        """What the hub holds for a repo: path -> {"size", "blob", "lfs" (sha256 or None)}."""
        meta = self.state.meta(repo_id)
        return dict(meta["files"]) if meta else {}

    def file_bytes(self, repo_id: str, path: str) -> bytes:
        return self.state.file_path(repo_id, path).read_bytes()

    def commits(self, repo_id: str) -> list[dict]:
        """The repo's commits, oldest first: {"oid", "summary", "date", "files"}."""
        meta = self.state.meta(repo_id)
        return list(meta["commits"]) if meta else []

    def publish(self, repo_id: str, files: dict[str, bytes], *, repo_type: str = "model",
                summary: str = "new revision") -> str:
        """Commit `files` into a public model or dataset repo (created when missing): its new commit id."""
        key = DATASETS + repo_id if repo_type == "dataset" else repo_id
        with self.state.lock:
            if self.state.meta(key) is None:
                self.state.repo_dir(key).mkdir(parents=True)
                self.state.save_meta(key, {"id": repo_id, "private": False, "createdAt": _now(), "sha": None,
                                           "commits": [], "files": {}})
            return self.state.commit(key, [{"key": "header", "value": {"summary": summary}}] + [
                {"key": "file", "value": {"path": p, "encoding": "base64", "content": base64.b64encode(b).decode()}}
                for p, b in files.items()])

    def tag(self, repo_id: str, name: str, oid: str, *, repo_type: str = "model") -> None:
        """A tag `name` on commit `oid` (a revision info answers for)."""
        key = DATASETS + repo_id if repo_type == "dataset" else repo_id
        with self.state.lock:
            meta = self.state.meta(key)
            meta.setdefault("tags", {})[name] = oid
            self.state.save_meta(key, meta)


if __name__ == "__main__":  # a hub to point HF_ENDPOINT at by hand: python tests/hub_server.py DIR TOKEN USER
    import sys

    root, token, user = sys.argv[1:4]
    with HubServer(Path(root), {token: (user, "write")}) as hub:
        print(f"HF_ENDPOINT={hub.url}", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


def hub_fixture(tokens: dict[str, tuple[str, str]], *, scope: str = "function", env_token: Optional[str] = None):
    """A fixture `hub`: the test Hub with these tokens ({token: (user, "read" | "write")}), under the
    test's tmp_path/hub (scope "function") or a folder of its own (scope "module"). With env_token
    (function scope only), HF_ENDPOINT points at it and HF_TOKEN is that token, through the test's
    own monkeypatch. `hub = hub_fixture({WRITE: ("alice", "write")})` in the test module, or in a
    helper module it imports `hub` from."""
    import pytest

    @pytest.fixture(scope=scope, name="hub")
    def hub(request, tmp_path_factory):
        root = request.getfixturevalue("tmp_path") / "hub" if scope == "function" else tmp_path_factory.mktemp("hub")
        monkeypatch = request.getfixturevalue("monkeypatch") if env_token is not None else None
        with HubServer(root, tokens) as h:
            if monkeypatch is not None:
                monkeypatch.setenv("HF_ENDPOINT", h.url)
                monkeypatch.setenv("HF_TOKEN", env_token)
            yield h

    return hub
