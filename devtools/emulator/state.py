"""SQLite persistence for the emulator: instances (live and destroyed, for the ledger),
fault rules and global counters. One file, `<state-dir>/emulator.sqlite3`; every instance
is one JSON document so the schema stays trivial.
"""
from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path
from typing import Any, Optional

FIRST_INSTANCE_ID = 21_000_001


class Store:
    """Thread-safe (one lock) key/value-ish store over sqlite3."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self.lock = threading.RLock()
        with self.lock:
            self._db.executescript("""
                CREATE TABLE IF NOT EXISTS instances (id INTEGER PRIMARY KEY, data TEXT NOT NULL);
                CREATE TABLE IF NOT EXISTS fault_rules (selector TEXT PRIMARY KEY, faults TEXT NOT NULL);
                CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
            """)

    # instances -------------------------------------------------------------------------------
    def next_instance_id(self) -> int:
        with self.lock:
            row = self._db.execute("SELECT MAX(id) FROM instances").fetchone()
            return max(FIRST_INSTANCE_ID, (row[0] or 0) + 1)

    def put_instance(self, inst: dict) -> None:
        with self.lock:
            self._db.execute("INSERT OR REPLACE INTO instances (id, data) VALUES (?, ?)",
                             (int(inst["id"]), json.dumps(inst)))

    def get_instance(self, instance_id: int) -> Optional[dict]:
        with self.lock:
            row = self._db.execute("SELECT data FROM instances WHERE id = ?", (int(instance_id),)).fetchone()
        return json.loads(row[0]) if row else None

    def instances(self, include_ended: bool = False) -> list[dict]:
        with self.lock:
            rows = [json.loads(r[0]) for r in self._db.execute("SELECT data FROM instances ORDER BY id")]
        return rows if include_ended else [r for r in rows if r.get("ended_at") is None]

    # fault rules: selector "*", "id:<n>" or "label:<prefix>" -> dict of knobs --------------------
    def set_rule(self, selector: str, faults: dict) -> dict:
        with self.lock:
            merged = {**self.rules().get(selector, {}), **faults}
            merged = {k: v for k, v in merged.items() if v is not None}
            self._db.execute("INSERT OR REPLACE INTO fault_rules VALUES (?, ?)", (selector, json.dumps(merged)))
            return merged

    def rules(self) -> dict[str, dict]:
        with self.lock:
            return {s: json.loads(f) for s, f in self._db.execute("SELECT selector, faults FROM fault_rules")}

    def clear_rules(self) -> None:
        with self.lock:
            self._db.execute("DELETE FROM fault_rules")

    # counters and settings -------------------------------------------------------------------
    def get_meta(self, key: str, default: Any = None) -> Any:
        with self.lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    def set_meta(self, key: str, value: Any) -> None:
        with self.lock:
            self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value)))

    def take(self, key: str) -> bool:
        """Decrement counter `key` if positive; True if one was taken."""
        with self.lock:
            n = int(self.get_meta(key, 0) or 0)
            if n <= 0:
                return False
            self.set_meta(key, n - 1)
            return True

    def close(self) -> None:
        with self.lock:
            self._db.close()
