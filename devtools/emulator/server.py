"""HTTP front of the emulator: Vast's API paths (as vastai 1.9.1 calls them) plus /_emulator/ admin.

Auth: `Authorization: Bearer KEY` or `?api_key=KEY` on every Vast path; wrong/missing -> 401.
Admin paths (/_emulator/...) and log result URLs need no key (loopback only).
"""
from __future__ import annotations

import base64
import json
import re
import secrets
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Optional
from urllib.parse import parse_qs, urlsplit

from devtools.emulator.cloud import ApiError, Cloud

RATE_LIMIT_TEXT = "API requests too frequent"
HTML_ERROR = ("<!DOCTYPE html><html><head><title>502 Bad Gateway</title></head><body><center><h1>502 Bad "
              "Gateway</h1></center><hr><center>cloudflare</center></body></html>")
HTML_GATEWAY_TIMEOUT = ("<!DOCTYPE html><html><head><title>504 Gateway Time-out</title></head><body><center><h1>504 "
                        "Gateway Time-out</h1></center><hr><center>cloudflare</center></body></html>")
DEFAULT_MISSING = ("ssh_host", "ssh_port", "public_ipaddr", "ports", "actual_status", "dph_total", "gpu_name",
                   "new_contract", "offers_count")
WRONG_TYPES = {"ssh_port": "twenty-two", "actual_status": 7, "dph_total": "cheap", "ports": "22/tcp",
               "num_gpus": "one", "gpu_ram": None, "new_contract": "pending", "success": "maybe",
               "label": ["not", "a", "string"], "reliability": "high", "balance": "lots", "extra_env": "none",
               "start_date": "yesterday"}
# start_date/extra_env break the SDK itself (it parses them): only when named in malformed_fields.
DEFAULT_WRONG = tuple(k for k in WRONG_TYPES if k not in ("extra_env", "start_date"))


def _page_token(offset: int) -> str:
    return base64.urlsafe_b64encode(json.dumps({"offset": offset}).encode()).decode()


def _page_offset(token: Optional[str]) -> int:
    if not token:
        return 0
    try:
        return int(json.loads(base64.urlsafe_b64decode(token.encode()))["offset"])
    except (ValueError, KeyError, TypeError):
        raise ApiError(400, "invalid_args", f"after_token {token!r} is not a token this server issued") from None


def _json_param(params: dict, name: str, default: Any) -> Any:
    raw = params.get(name)
    if raw is None:
        return default
    try:
        return json.loads(raw)
    except ValueError:
        return raw  # plain string values (owner=me) are sent unencoded


class EmulatorServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, addr, cloud: Cloud, api_key: str):
        super().__init__(addr, Handler)
        self.cloud, self.api_key = cloud, api_key
        self.log_results: dict[str, str] = {}
        self.on_shutdown: Optional[Callable[[bool], None]] = None


class Handler(BaseHTTPRequestHandler):
    server: EmulatorServer
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # one short line per request, never the query (it may hold the key)
        print(f"{self.command} {urlsplit(self.path).path} -> {args[1] if len(args) > 1 else ''}", flush=True)

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_DELETE(self):
        self._dispatch("DELETE")

    # --------------------------------------------------------------------------- plumbing --
    @staticmethod
    def _is_search(method: str, path: str) -> bool:
        p = path.rstrip("/")
        return (method == "POST" and p.endswith("/bundles")) or (method == "PUT" and p.endswith("/search/asks"))

    @staticmethod
    def _is_create(method: str, path: str) -> bool:
        return method == "PUT" and re.fullmatch(r"/api/v0/asks/\d+/?", path) is not None

    def _lose_answer(self) -> None:
        """`lost_create`: the instance was created, but its answer never reaches the client: a gateway
        504/500 page, or the connection closed without a reply (`lost_create_mode`)."""
        mode = str(self.server.cloud.setting("lost_create_mode"))
        if mode == "drop":
            self.close_connection = True
            return
        if mode == "500":
            return self._json(500, {"success": False, "error": "server_error", "msg": "Internal server error"})
        return self._send(504, HTML_GATEWAY_TIMEOUT.encode(), "text/html; charset=utf-8")

    def _send(self, status: int, body: bytes, ctype: str, headers: Optional[dict] = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj: Any) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json")

    def _body(self) -> Any:
        n = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(n) if n else b""
        if not raw.strip():
            return {}
        try:
            return json.loads(raw)
        except ValueError:
            raise ApiError(400, "invalid_args", "request body is not valid JSON") from None

    def _authorized(self, params: dict) -> bool:
        auth = self.headers.get("Authorization", "")
        key = auth[len("Bearer "):].strip() if auth.startswith("Bearer ") else params.get("api_key")
        return bool(key) and secrets.compare_digest(key, self.server.api_key)

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        params = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        path = url.path
        try:
            body = self._body() if method in ("POST", "PUT", "DELETE") else {}
            if path.startswith("/_emulator/"):
                return self._admin(method, path, body)
            if not re.match(r"^/api/v\d+/", path):
                raise ApiError(404, "not_found", f"no such path {path}; Vast paths start with /api/v0/")
            if not self._authorized(params):
                return self._json(401, {"success": False, "error": "auth_error", "msg": "Invalid user key"})
            cloud = self.server.cloud
            if cloud.store.take("http_429"):
                retry_after = cloud.setting("http_429_retry_after")
                headers = {} if retry_after is None or retry_after < 0 else {"Retry-After": f"{retry_after:g}"}
                return self._send(429, RATE_LIMIT_TEXT.encode(), "text/plain", headers)
            if self._is_search(method, path) and cloud.store.take("quota_429"):
                return self._json(429, {"success": False, "error": "search_quota_exceeded",
                                        "msg": "Daily search quota exceeded. The quota resets at 00:00 UTC."})
            status, result = self._api(method, path, params, body)
            if self._is_create(method, path) and cloud.store.take("lost_create"):
                return self._lose_answer()
            self._reply(status, result)
        except ApiError as e:
            self._json(e.status, {"success": False, "error": e.error, "msg": e.msg})
        except Exception as e:  # noqa: BLE001 - answer like a server, log the bug
            print(f"internal error on {method} {path}: {e!r}", flush=True)
            self._json(500, {"success": False, "error": "server_error", "msg": f"emulator bug: {e!r}"})

    def _reply(self, status: int, result: Any) -> None:
        """Send an API result, mangled when a `malformed` fault is armed."""
        store = self.server.cloud.store
        mode = store.get_meta("malformed")
        if not mode or not store.take("malformed_count"):
            return self._json(status, result)
        code = int(store.get_meta("malformed_status", 200) or 200)
        if mode == "html":
            return self._send(code, HTML_ERROR.encode(), "text/html; charset=utf-8")
        if mode == "empty":
            return self._send(code, b"", "application/json")
        if mode == "truncated":
            text = json.dumps(result).encode()
            return self._send(code, text[: max(1, len(text) // 2)], "application/json")
        fields = store.get_meta("malformed_fields") or list(DEFAULT_MISSING if mode == "missing_fields"
                                                            else DEFAULT_WRONG)
        self._json(code, _mangle(result, mode, set(fields)))

    # -------------------------------------------------------------------------- Vast API --
    def _api(self, method: str, path: str, params: dict, body: Any) -> tuple[int, Any]:
        cloud = self.server.cloud
        p = re.sub(r"^/api/v0", "", path).rstrip("/") + "/"
        if method == "POST" and p == "/bundles/":
            return 200, {"offers": cloud.search(body)}
        if method == "PUT" and p == "/search/asks/":
            return 200, {"offers": cloud.search(body.get("q", {}) if isinstance(body, dict) else body)}
        if m := re.fullmatch(r"/asks/(\d+)/", p):
            if method == "PUT":
                return 200, cloud.create(int(m[1]), body)
        if method == "GET" and path.rstrip("/") == "/api/v1/instances":
            return 200, self._list_v1(params)
        if method == "GET" and p == "/instances/":
            return 200, {"instances": cloud.list_rows()}
        if method == "GET" and p == "/instances/filters/":
            return 200, {"filters": []}
        if m := re.fullmatch(r"/instances/request_logs/(\d+)/", p):
            if method == "PUT":
                text = cloud.logs(int(m[1]), body.get("tail") if isinstance(body, dict) else None)
                token = secrets.token_urlsafe(12)
                self.server.log_results[token] = text
                host = self.headers.get("Host") or f"127.0.0.1:{self.server.server_address[1]}"
                return 200, {"success": True, "result_url": f"http://{host}/_emulator/logs/{token}",
                             "msg": "Logs will be available at result_url"}
        if m := re.fullmatch(r"/instances/(\d+)/ssh/", p):
            if method == "POST":
                return 200, cloud.attach_ssh(int(m[1]), body)
        if m := re.fullmatch(r"/instances/(\d+)/", p):
            iid = int(m[1])
            if method == "GET":
                return 200, {"instances": cloud.show(iid)}
            if method == "DELETE":
                return 200, cloud.destroy(iid)
            if method == "PUT":
                return 200, cloud.update(iid, body)
        if method == "GET" and p == "/users/current/":
            return 200, self._user()
        if method == "GET" and p == "/users/me/invoices/":
            return 200, self._invoices(params)
        raise ApiError(404, "not_found", f"{method} {path} is not emulated")

    def _list_v1(self, params: dict) -> dict:
        from devtools.emulator.offers import QueryError, matches

        cloud = self.server.cloud
        filters = _json_param(params, "select_filters", {}) or {}
        order = _json_param(params, "order_by", [{"col": "id", "dir": "asc"}]) or []
        try:
            limit = max(1, min(int(params.get("limit") or 25), 25))
        except ValueError:
            raise ApiError(400, "invalid_args", "limit must be an integer") from None
        if not isinstance(filters, dict) or not isinstance(order, list):
            raise ApiError(400, "invalid_args", "select_filters must be an object, order_by a list")
        rows = cloud.list_rows()
        try:
            rows = [r for r in rows if all(matches(r, f, c) for f, c in filters.items())]
        except QueryError as e:
            raise ApiError(400, "invalid_args", str(e)) from None
        for o in reversed(order):
            col = o.get("col", "id") if isinstance(o, dict) else "id"
            rows.sort(key=lambda r: (r.get(col) is None, str(r.get(col)) if isinstance(r.get(col), str)
                                     else (r.get(col) or 0)), reverse=isinstance(o, dict) and o.get("dir") == "desc")
        start = _page_offset(params.get("after_token"))
        page = rows[start:start + limit]
        more = start + limit < len(rows)
        labels: dict[str, int] = {}
        for r in rows:
            labels[r.get("label") or ""] = labels.get(r.get("label") or "", 0) + 1
        return {"instances": page, "next_token": _page_token(start + limit) if more else None,
                "total_instances": len(rows), "label_counts": labels}

    def _user(self) -> dict:
        led = self.server.cloud.ledger()
        return {"id": 424242, "username": "emulated-user", "email": "qat@example.invalid", "fullname": "QAT Emulator",
                "balance": led["balance"], "credit": led["balance"], "total_spend": led["total_cost"],
                "can_pay": True, "has_billing": True, "billed_verification": True, "sshkey": None,
                "api_key": "(hidden)", "emulated": True}

    def _invoices(self, params: dict) -> dict:
        cloud = self.server.cloud
        led = cloud.ledger()
        rows = [{"type": "payment", "id": 1, "amount": led["credit"], "description": "Initial credit (emulated)",
                 "timestamp": cloud.store.get_meta("credit_at"), "is_credit": True}]
        for r in led["instances"]:
            rows.append({"type": "charge", "id": r["id"], "instance_id": r["id"], "label": r["label"],
                         "description": f"Instance {r['id']} ({r['gpu_name']}): {r['seconds']:.0f} s "
                                        f"at ${r['dph_total']}/h", "amount": r["cost"], "quantity": r["seconds"] / 3600,
                         "rate": r["dph_total"], "start": r["created_at"], "end": r["ended_at"] or led["now"],
                         "timestamp": r["ended_at"] or led["now"], "is_credit": False})
        if params.get("inc_charges") == "false":
            rows = [r for r in rows if r["type"] != "charge"]
        live = sum(r["cost"] for r in led["instances"] if r["ended_at"] is None)
        return {"invoices": rows, "current": {"charges": round(live, 8), "service_fee": 0.0,
                                              "total": round(live, 8), "credit": led["balance"]}}

    # ---------------------------------------------------------------------------- admin --
    def _admin(self, method: str, path: str, body: Any) -> None:
        cloud = self.server.cloud
        if m := re.fullmatch(r"/_emulator/logs/([\w-]+)", path):
            text = self.server.log_results.get(m[1])
            if text is None:
                return self._send(404, b"no such log result", "text/plain")
            return self._send(200, text.encode(), "text/plain; charset=utf-8")
        if method == "GET" and path == "/_emulator/health":
            return self._json(200, {"ok": True})
        if method == "GET" and path == "/_emulator/ledger":
            return self._json(200, cloud.ledger())
        if path == "/_emulator/faults":
            return self._json(200, cloud.set_faults(body) if method == "POST" else cloud.faults_view())
        if method == "GET" and (m := re.fullmatch(r"/_emulator/instances/(\d+)", path)):
            return self._json(200, cloud.admin_info(int(m[1])))
        if method == "POST" and path == "/_emulator/shutdown":
            kill = bool(body.get("kill_instances", True)) if isinstance(body, dict) else True
            self._json(200, {"success": True, "kill_instances": kill})
            if self.server.on_shutdown:
                threading.Thread(target=self.server.on_shutdown, args=(kill,), daemon=True).start()
            return
        raise ApiError(404, "not_found", f"no admin endpoint {method} {path}")


def _mangle(obj: Any, mode: str, fields: set[str]) -> Any:
    """missing_fields: drop `fields` everywhere; wrong_types: give them values of the wrong type."""
    if isinstance(obj, list):
        return [_mangle(x, mode, fields) for x in obj]
    if not isinstance(obj, dict):
        return obj
    out = {}
    for k, v in obj.items():
        if k in fields:
            if mode == "missing_fields":
                continue
            out[k] = WRONG_TYPES.get(k, "garbage")
        else:
            out[k] = _mangle(v, mode, fields)
    return out
