"""JSON from a machine (result.json, PROGRESS / STEP_ERROR lines), parsed with bounded work.

A rented machine is a stranger's computer: its JSON may be huge or nested thousands of levels deep
(the parser, and anything that walks the result later, recurse per level until RecursionError). The
nesting is measured first, in one linear pass that never recurses; too large, too deep or broken
JSON raises `UnsafeJSON` (a ValueError) saying which and by how much.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

MAX_DEPTH = 32  # our own files nest 5 levels at most (result.json: metrics -> gate -> reasons)
MAX_FILE_BYTES = 4 * 1024 * 1024  # a result.json is a few KiB
# a JSON string (skipped whole: brackets inside it do not nest; an unterminated one runs to the end,
# so a failed match never backtracks over the rest), or one bracket
_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*(?:"|\\?\Z)|[\[\]{}]', re.S)


class UnsafeJSON(ValueError):
    """JSON from a machine that is too large, too deeply nested or not valid."""


def nesting_depth(text: str, limit: int = MAX_DEPTH) -> int:
    """The deepest bracket nesting in text, counted without recursion; UnsafeJSON once over limit."""
    depth = deepest = 0
    for m in _TOKEN.finditer(text):
        c = m.group()
        if c in "[{":
            depth += 1
            if depth > limit:
                raise UnsafeJSON(f"nested more than {limit} levels deep")
            deepest = max(deepest, depth)
        elif c in "]}":
            depth -= 1
    return deepest


def loads(text: str, max_depth: int = MAX_DEPTH) -> Any:
    """json.loads, after the nesting check."""
    nesting_depth(text, max_depth)
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:
        raise UnsafeJSON(f"not valid JSON: {e}") from None


def load_file(path: Path, max_bytes: int = MAX_FILE_BYTES, max_depth: int = MAX_DEPTH) -> Any:
    """A JSON file of at most max_bytes (only that much is read), after the nesting check.
    OSError when it cannot be read; UnsafeJSON when too large, too deep or broken."""
    with open(path, "rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise UnsafeJSON(f"larger than {max_bytes} bytes")
    return loads(data.decode("utf-8", errors="replace"), max_depth)
