"""Where the fine-tuning API keeps its files, jobs, events and checkpoints: one SQLite database
(stdlib sqlite3, write-ahead log) beside the store.

This is the only module that speaks SQL. Everything else reads and writes plain dicts through
`JobStore`'s methods, so another database can take its place by offering the same methods.
Rows are never trusted blindly: a value read back is the value this module wrote, and the
database lives in a folder the server created.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY, tenant TEXT NOT NULL, filename TEXT NOT NULL, bytes INTEGER NOT NULL,
    created_at INTEGER NOT NULL, purpose TEXT NOT NULL, kind TEXT NOT NULL, rows INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, tenant TEXT NOT NULL, created_at INTEGER NOT NULL, finished_at INTEGER,
    model TEXT NOT NULL, training_file TEXT NOT NULL, validation_file TEXT, suffix TEXT, seed INTEGER NOT NULL,
    hyperparameters TEXT NOT NULL, adapter TEXT NOT NULL, status TEXT NOT NULL, fine_tuned_model TEXT,
    store_name TEXT, error TEXT, trained_tokens INTEGER);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL, created_at INTEGER NOT NULL,
    level TEXT NOT NULL, type TEXT NOT NULL, message TEXT NOT NULL, data TEXT);
CREATE TABLE IF NOT EXISTS checkpoints (
    id TEXT PRIMARY KEY, job_id TEXT NOT NULL, created_at INTEGER NOT NULL, step INTEGER NOT NULL,
    metrics TEXT NOT NULL, model_name TEXT NOT NULL, store_name TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS events_by_job ON events (job_id, seq);
CREATE INDEX IF NOT EXISTS jobs_by_tenant ON jobs (tenant, created_at);
"""

JSON_FIELDS = {"hyperparameters", "adapter", "error", "data", "metrics"}
ACTIVE = ("validating_files", "queued", "running")  # statuses of a job not yet ended


def _row(cursor, values) -> dict:
    row = {column[0]: value for column, value in zip(cursor.description, values)}
    return {k: (json.loads(v) if k in JSON_FIELDS and v is not None else v) for k, v in row.items()}


class JobStore:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = _row
        self._lock = threading.Lock()  # one connection, used from request threads and the worker
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _run(self, sql: str, values=()) -> list[dict]:
        with self._lock:
            return self._db.execute(sql, values).fetchall()

    def _insert(self, table: str, row: dict) -> None:
        row = {k: (json.dumps(v) if k in JSON_FIELDS and v is not None else v) for k, v in row.items()}
        columns = ", ".join(row)
        self._run(f"INSERT INTO {table} ({columns}) VALUES ({', '.join('?' * len(row))})", tuple(row.values()))

    # --- files ---------------------------------------------------------------------------------
    def add_file(self, row: dict) -> None:
        self._insert("files", row)

    def file(self, file_id: str, tenant: str) -> dict | None:
        rows = self._run("SELECT * FROM files WHERE id = ? AND tenant = ?", (file_id, tenant))
        return rows[0] if rows else None

    def files(self, tenant: str) -> list[dict]:
        return self._run("SELECT * FROM files WHERE tenant = ? ORDER BY created_at DESC, rowid DESC", (tenant,))

    def file_bytes(self, tenant: str) -> int:
        return self._run("SELECT COALESCE(SUM(bytes), 0) AS total FROM files WHERE tenant = ?", (tenant,))[0]["total"]

    def delete_file(self, file_id: str) -> None:
        self._run("DELETE FROM files WHERE id = ?", (file_id,))

    # --- jobs ----------------------------------------------------------------------------------
    def add_job(self, row: dict) -> None:
        self._insert("jobs", row)

    def job(self, job_id: str, tenant: str | None = None) -> dict | None:
        if tenant is None:
            rows = self._run("SELECT * FROM jobs WHERE id = ?", (job_id,))
        else:
            rows = self._run("SELECT * FROM jobs WHERE id = ? AND tenant = ?", (job_id, tenant))
        return rows[0] if rows else None

    def jobs(self, tenant: str, after: str | None, limit: int) -> list[dict]:
        """A tenant's jobs, newest first, those after job `after` in that order."""
        rows = self._run("SELECT * FROM jobs WHERE tenant = ? ORDER BY created_at DESC, rowid DESC", (tenant,))
        if after is not None:
            ids = [r["id"] for r in rows]
            rows = rows[ids.index(after) + 1:] if after in ids else []
        return rows[:limit]

    def jobs_with_status(self, *statuses: str) -> list[dict]:
        marks = ", ".join("?" * len(statuses))
        return self._run(f"SELECT * FROM jobs WHERE status IN ({marks}) ORDER BY created_at, rowid", statuses)

    def running_jobs(self, tenant: str) -> int:
        marks = ", ".join("?" * len(ACTIVE))
        return self._run(f"SELECT COUNT(*) AS n FROM jobs WHERE tenant = ? AND status IN ({marks})",
                         (tenant, *ACTIVE))[0]["n"]

    def jobs_using_file(self, file_id: str) -> int:
        marks = ", ".join("?" * len(ACTIVE))
        return self._run(f"SELECT COUNT(*) AS n FROM jobs WHERE (training_file = ? OR validation_file = ?) "
                         f"AND status IN ({marks})", (file_id, file_id, *ACTIVE))[0]["n"]

    def update_job(self, job_id: str, **fields) -> None:
        fields = {k: (json.dumps(v) if k in JSON_FIELDS and v is not None else v) for k, v in fields.items()}
        assignments = ", ".join(f"{k} = ?" for k in fields)
        self._run(f"UPDATE jobs SET {assignments} WHERE id = ?", (*fields.values(), job_id))

    def set_status_unless_ended(self, job_id: str, status: str, **fields) -> bool:
        """Move an active job to `status` (one statement: a cancel and the worker never both win)."""
        fields = {"status": status, **{k: (json.dumps(v) if k in JSON_FIELDS and v is not None else v)
                                       for k, v in fields.items()}}
        assignments = ", ".join(f"{k} = ?" for k in fields)
        marks = ", ".join("?" * len(ACTIVE))
        with self._lock:
            cursor = self._db.execute(f"UPDATE jobs SET {assignments} WHERE id = ? AND status IN ({marks})",
                                      (*fields.values(), job_id, *ACTIVE))
            return cursor.rowcount == 1

    # --- events and checkpoints ------------------------------------------------------------------
    def add_event(self, job_id: str, message: str, level: str = "info", data: dict | None = None) -> None:
        self._insert("events", {"job_id": job_id, "created_at": int(time.time()), "level": level,
                                "type": "metrics" if data else "message", "message": message, "data": data})

    def events(self, job_id: str, after: int | None, limit: int) -> list[dict]:
        """Events of a job, newest first; `after`: only those older than event number `after`."""
        if after is None:
            return self._run("SELECT * FROM events WHERE job_id = ? ORDER BY seq DESC LIMIT ?", (job_id, limit))
        return self._run("SELECT * FROM events WHERE job_id = ? AND seq < ? ORDER BY seq DESC LIMIT ?",
                         (job_id, after, limit))

    def add_checkpoint(self, row: dict) -> None:
        self._insert("checkpoints", row)

    def checkpoints(self, job_id: str) -> list[dict]:
        return self._run("SELECT * FROM checkpoints WHERE job_id = ? ORDER BY step DESC", (job_id,))

    def delete_checkpoints(self, job_id: str) -> None:
        self._run("DELETE FROM checkpoints WHERE job_id = ?", (job_id,))

    def store_names(self) -> dict[str, tuple[str, str]]:
        """Every store folder a job wrote: folder name -> (model name, tenant)."""
        names = {}
        for row in self._run("SELECT j.store_name, j.fine_tuned_model, j.tenant FROM jobs j "
                             "WHERE j.store_name IS NOT NULL AND j.status = 'succeeded'"):
            names[row["store_name"]] = (row["fine_tuned_model"], row["tenant"])
        for row in self._run("SELECT c.store_name, c.model_name, j.tenant FROM checkpoints c "
                             "JOIN jobs j ON j.id = c.job_id"):
            names[row["store_name"]] = (row["model_name"], row["tenant"])
        return names
