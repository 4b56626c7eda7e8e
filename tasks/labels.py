"""The label of a rented machine: `qat-<installation id>-<flow run id>`, built here and nowhere else.

The installation id is 8 hex digits, created once per Prefect server (workspace) and kept there as the
Prefect Variable `qat-installation-id`. It proves that a label was made by the flows of *this*
server: the reaper (tasks/reaping.py) only ever asks this server about labels that carry it; the
machines of another Prefect server sharing the Vast.ai account are foreign: never destroyed here,
not even by age (past it, the reaper logs an error). Deleting or changing the Variable makes every
earlier label foreign: those machines are kept; destroy them by hand (`python -m infra.reaper`).

Length: 4 + 8 + 1 + 36 = 49 characters (Vast.ai accepts labels of up to 60)."""
from __future__ import annotations

import re
import secrets
import time
from typing import NamedTuple, Optional
from uuid import UUID

PREFIX = "qat-"
INSTALLATION_VARIABLE = "qat-installation-id"
_INSTALL = re.compile(r"[0-9a-f]{8}")
_LABEL = re.compile(r"qat-([0-9a-f]{8})-([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})")
_cache: dict[str, str] = {}  # api url -> installation id (it never changes for a server)


class Parsed(NamedTuple):
    installation: str
    run_id: UUID


def make_label(installation: str, run_id) -> str:
    if not _INSTALL.fullmatch(installation or ""):
        raise ValueError(f"installation id {installation!r} is not 8 hex digits")
    return f"{PREFIX}{installation}-{UUID(str(run_id))}"


def parse_label(label: str) -> Optional[Parsed]:
    """(installation id, flow run id) of a label this code makes; None for any other label."""
    m = _LABEL.fullmatch(label or "")
    return Parsed(m.group(1), UUID(m.group(2))) if m else None


def is_label_of_run(label: str, run_id) -> bool:
    p = parse_label(label)
    return p is not None and str(p.run_id) == str(run_id)


def installation_id(create: bool = True, client=None) -> Optional[str]:
    """This server's installation id, from the Prefect Variable (created on first use when `create`).

    None when it does not exist and `create` is False. Raises when the server cannot be read or the
    Variable holds something else than 8 hex digits (a label is never built from a guess)."""
    from prefect import get_client
    from prefect.client.schemas.actions import VariableCreate
    from prefect.exceptions import ObjectAlreadyExists

    if client is None:
        with get_client(sync_client=True) as c:
            return installation_id(create, c)
    url = str(client.api_url)
    if url in _cache:
        return _cache[url]
    var = client.read_variable_by_name(INSTALLATION_VARIABLE)
    if var is None:
        if not create:
            return None
        try:
            var = client.create_variable(VariableCreate(name=INSTALLATION_VARIABLE, value=secrets.token_hex(4)))
        except ObjectAlreadyExists:  # another process created it first: theirs wins
            var = client.read_variable_by_name(INSTALLATION_VARIABLE)
    value = var.value if var is not None else None
    if not isinstance(value, str) or not _INSTALL.fullmatch(value):
        raise ValueError(f"Prefect Variable {INSTALLATION_VARIABLE} holds {value!r}, not 8 hex digits")
    _cache[url] = value
    return value


def run_label(run_id=None) -> str:
    """The label of the machines of this flow run; outside a flow run, `qat-local-<time>` (never
    provably ours: the reaper judges it by age alone)."""
    if not run_id:
        return f"{PREFIX}local-{int(time.time())}"
    return make_label(installation_id(create=True), run_id)
