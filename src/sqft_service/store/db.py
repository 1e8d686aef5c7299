"""SQLite connection and numbered migrations.

WAL mode lets the API process read while job processes append events; ``busy_timeout`` makes
concurrent writers wait instead of failing. Every row is plain SQL: the schema is small and a
query builder would only hide it.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

MIGRATIONS: list[str] = [
    # 1: the initial schema
    """
    CREATE TABLE files (
        id TEXT PRIMARY KEY,
        filename TEXT NOT NULL,
        bytes INTEGER NOT NULL,
        sha256 TEXT NOT NULL,
        purpose TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        status TEXT NOT NULL DEFAULT 'processed',
        status_details TEXT,
        path TEXT NOT NULL,
        meta TEXT
    );
    CREATE INDEX files_filename ON files(filename);
    CREATE TABLE jobs (
        id TEXT PRIMARY KEY,
        seq INTEGER NOT NULL,
        model TEXT NOT NULL,
        training_file TEXT NOT NULL,
        validation_file TEXT,
        status TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        started_at INTEGER,
        finished_at INTEGER,
        error TEXT,
        fine_tuned_model TEXT,
        trained_tokens INTEGER,
        estimated_finish INTEGER,
        seed INTEGER NOT NULL,
        suffix TEXT,
        metadata TEXT,
        hyperparameters TEXT NOT NULL,
        config TEXT NOT NULL,
        result_files TEXT NOT NULL DEFAULT '[]',
        output_dir TEXT NOT NULL,
        pid INTEGER,
        cancel_requested INTEGER NOT NULL DEFAULT 0
    );
    CREATE UNIQUE INDEX jobs_seq ON jobs(seq);
    CREATE TABLE events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        job_id TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        level TEXT NOT NULL,
        message TEXT NOT NULL,
        type TEXT NOT NULL,
        data TEXT
    );
    CREATE INDEX events_job ON events(job_id, seq);
    CREATE TABLE checkpoints (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        job_id TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        step INTEGER NOT NULL,
        path TEXT NOT NULL,
        metrics TEXT NOT NULL
    );
    CREATE INDEX checkpoints_job ON checkpoints(job_id, seq);
    """,
    # 2: one table for every job kind (fine_tune, extract, merge, sparsify). Fine-tune fields become
    # optional, each job records its kind, the job it works on (parent_job_id), its result and its
    # workspace; the never-read `hyperparameters` column is gone (the API derives it from `config`).
    """
    CREATE TABLE jobs_v2 (
        id TEXT PRIMARY KEY,
        seq INTEGER NOT NULL,
        kind TEXT NOT NULL,
        status TEXT NOT NULL,
        model TEXT,
        training_file TEXT,
        validation_file TEXT,
        parent_job_id TEXT,
        created_at INTEGER NOT NULL,
        started_at INTEGER,
        finished_at INTEGER,
        error TEXT,
        result TEXT,
        fine_tuned_model TEXT,
        trained_tokens INTEGER,
        estimated_finish INTEGER,
        seed INTEGER,
        suffix TEXT,
        metadata TEXT,
        config TEXT NOT NULL,
        result_files TEXT NOT NULL DEFAULT '[]',
        workspace TEXT NOT NULL,
        pid INTEGER,
        cancel_requested INTEGER NOT NULL DEFAULT 0
    );
    INSERT INTO jobs_v2 (id, seq, kind, status, model, training_file, validation_file, created_at, started_at,
        finished_at, error, fine_tuned_model, trained_tokens, estimated_finish, seed, suffix, metadata, config,
        result_files, workspace, pid, cancel_requested)
    SELECT id, seq, 'fine_tune', status, model, training_file, validation_file, created_at, started_at,
        finished_at, error, fine_tuned_model, trained_tokens, estimated_finish, seed, suffix, metadata, config,
        result_files, rtrim(substr(output_dir, 1, length(output_dir) - length('output')), '/'), pid,
        cancel_requested
    FROM jobs;
    DROP TABLE jobs;
    ALTER TABLE jobs_v2 RENAME TO jobs;
    CREATE UNIQUE INDEX jobs_seq ON jobs(seq);
    CREATE INDEX jobs_kind_status ON jobs(kind, status);
    """,
    # 3: how many times a job's process has been launched (a job interrupted by a crash is resumed a
    # bounded number of times), and `cancel_requested` also carries a pause request (2).
    """
    ALTER TABLE jobs ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0;
    """,
    # 4: the project (API key) that created each file and job (api/auth.py). NULL: created without
    # authentication; such rows are visible only while no keys are configured (api/owner.py).
    """
    ALTER TABLE files ADD COLUMN owner TEXT;
    ALTER TABLE jobs ADD COLUMN owner TEXT;
    CREATE INDEX files_owner_filename ON files(owner, filename);
    CREATE INDEX jobs_owner_kind ON jobs(owner, kind, seq);
    """,
    # 5: queries that read every row once thousands of jobs and files are stored (bench/load): the
    # manager's jobs by status and the per-project quota count (status, owner); the job list without API
    # keys, newest first (kind, seq); a project's files newest first, all or of one purpose.
    """
    CREATE INDEX jobs_status_owner ON jobs(status, owner);
    CREATE INDEX jobs_kind_seq ON jobs(kind, seq);
    CREATE INDEX files_owner ON files(owner);
    CREATE INDEX files_owner_purpose ON files(owner, purpose);
    """,
    # 6: uploads in parts (OpenAI's Uploads API, api/uploads): an upload and the parts received so far,
    # whose bytes wait under <data_dir>/uploads/<upload id>/ until it is completed into a file.
    """
    CREATE TABLE uploads (
        id TEXT PRIMARY KEY,
        filename TEXT NOT NULL,
        purpose TEXT NOT NULL,
        bytes INTEGER NOT NULL,
        mime_type TEXT NOT NULL,
        status TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        expires_at INTEGER NOT NULL,
        file_id TEXT,
        owner TEXT
    );
    CREATE INDEX uploads_status_owner ON uploads(status, owner);
    CREATE TABLE upload_parts (
        id TEXT PRIMARY KEY,
        upload_id TEXT NOT NULL REFERENCES uploads(id) ON DELETE CASCADE,
        bytes INTEGER NOT NULL,
        created_at INTEGER NOT NULL
    );
    CREATE INDEX upload_parts_upload ON upload_parts(upload_id, created_at);
    """,
    # 7: files that expire (OpenAI's `expires_after`): removed by the job manager once past `expires_at`
    # and read by no job. An upload in parts keeps the policy for the file it will make.
    """
    ALTER TABLE files ADD COLUMN expires_at INTEGER;
    CREATE INDEX files_expires_at ON files(expires_at);
    ALTER TABLE uploads ADD COLUMN file_expires_after INTEGER;
    """,
    # 8: stored responses (OpenAI's Responses API with `store`): the response object, its own input items
    # (for `input_items`), and the turns it answered with its answer, which `previous_response_id` continues.
    """
    CREATE TABLE responses (
        id TEXT PRIMARY KEY,
        owner TEXT,
        created_at INTEGER NOT NULL,
        body TEXT NOT NULL,
        input_items TEXT NOT NULL,
        conversation TEXT NOT NULL
    );
    CREATE INDEX responses_owner ON responses(owner, created_at);
    """,
    # 9: fine-tuned models shared with other projects (OpenAI's checkpoint permissions): the model's id,
    # the job that made it, and the project that may now use it.
    """
    CREATE TABLE model_permissions (
        id TEXT PRIMARY KEY,
        model TEXT NOT NULL,
        job_id TEXT NOT NULL,
        project_id TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        UNIQUE (model, project_id)
    );
    CREATE INDEX model_permissions_project ON model_permissions(project_id);
    """,
    # 10: evals (OpenAI's Evals API): the rows' schema and the graders; their runs are jobs of kind
    # `eval_run` (config.eval_id). `updated_seq` orders evals by their last change without ties.
    """
    CREATE TABLE evals (
        id TEXT PRIMARY KEY,
        seq INTEGER NOT NULL,
        updated_seq INTEGER NOT NULL,
        owner TEXT,
        name TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        data_source_config TEXT NOT NULL,
        testing_criteria TEXT NOT NULL,
        metadata TEXT
    );
    CREATE INDEX evals_owner ON evals(owner, seq);
    """,
    # 11: stored chat completions (OpenAI's `store: true`): the request as sent (messages, tools...), the
    # completion answered, the metadata to find it by; an eval run can read them as its rows.
    """
    CREATE TABLE chat_completions (
        id TEXT PRIMARY KEY,
        seq INTEGER NOT NULL,
        owner TEXT,
        created_at INTEGER NOT NULL,
        model TEXT NOT NULL,
        metadata TEXT,
        request TEXT NOT NULL,
        response TEXT NOT NULL
    );
    CREATE INDEX chat_completions_owner ON chat_completions(owner, seq);
    """,
    # 12: a stored response's status in a column (the background responses a stop left unfinished are
    # found by index, not by parsing every body), and a background response's stream events, kept when it
    # ends so a reader can replay them (`GET /v1/responses/{id}?stream=true&starting_after=`).
    """
    ALTER TABLE responses ADD COLUMN status TEXT;
    ALTER TABLE responses ADD COLUMN events TEXT;
    UPDATE responses SET status = json_extract(body, '$.status');
    CREATE INDEX responses_status ON responses(status);
    """,
    # 13: conversations (OpenAI's Conversations API): the conversation, and its items in the order they
    # were added (`seq`), each as listed (a message, a call, a call's output); a response made in a
    # conversation reads them as its history and adds its input and output when it ends.
    """
    CREATE TABLE conversations (
        id TEXT PRIMARY KEY,
        owner TEXT,
        created_at INTEGER NOT NULL,
        metadata TEXT
    );
    CREATE TABLE conversation_items (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        conversation_id TEXT NOT NULL,
        id TEXT NOT NULL,
        item TEXT NOT NULL,
        UNIQUE (conversation_id, id)
    );
    """,
]


class Database:
    """One connection guarded by a lock; safe to share between the API's worker threads."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=30)
        self._conn.row_factory = sqlite3.Row
        self._lock = threading.RLock()
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute("PRAGMA busy_timeout=30000")
        self._conn.execute("PRAGMA foreign_keys=ON")
        self._migrate()

    def _migrate(self) -> None:
        with self.transaction() as cur:
            version = cur.execute("PRAGMA user_version").fetchone()[0]
            for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
                for statement in script.split(";"):
                    if statement.strip():
                        cur.execute(statement)
                cur.execute(f"PRAGMA user_version={number}")

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Cursor]:
        """BEGIN IMMEDIATE ... COMMIT: writers take the lock up front so they never deadlock."""
        with self._lock:
            cur = self._conn.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                yield cur
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            cur.execute("COMMIT")

    def check_writable(self, timeout_s: float) -> None:
        """Take the write lock and roll back (GET /ready), waiting at most ``timeout_s`` for another writer
        rather than the usual 30 s: a probe that hangs tells its caller less than an error.

        Raises:
            sqlite3.Error: the database is closed, read-only, or locked for longer than ``timeout_s``.
        """
        with self._lock:
            self._conn.execute(f"PRAGMA busy_timeout={int(timeout_s * 1000)}")
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                self._conn.execute("ROLLBACK")
            finally:
                self._conn.execute("PRAGMA busy_timeout=30000")

    def query(self, sql: str, params: tuple[Any, ...] | list[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    def query_one(self, sql: str, params: tuple[Any, ...] | list[Any] = ()) -> sqlite3.Row | None:
        rows = self.query(sql, params)
        return rows[0] if rows else None

    def page(
        self,
        table: str,
        *,
        order_col: str,
        limit: int,
        after: str | None = None,
        where: tuple[str, ...] = (),
        params: tuple[Any, ...] = (),
        descending: bool = True,
    ) -> tuple[list[sqlite3.Row], bool]:
        """One page of ``table`` in ``order_col`` order, starting after the row whose ``id`` is ``after``.

        Returns the rows and whether more follow (OpenAI's ``has_more``). An unknown ``after`` id is
        ignored, as OpenAI does.
        """
        clauses, args = list(where), list(params)
        if after:
            anchor = self.query_one(f"SELECT {order_col} AS k FROM {table} WHERE id = ?", (after,))
            if anchor is not None:
                clauses.append(f"{order_col} {'<' if descending else '>'} ?")
                args.append(anchor["k"])
        where_sql = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        direction = "DESC" if descending else "ASC"
        rows = self.query(
            f"SELECT * FROM {table} {where_sql} ORDER BY {order_col} {direction} LIMIT ?", (*args, limit + 1)
        )
        return rows[:limit], len(rows) > limit

    def execute(self, sql: str, params: tuple[Any, ...] | list[Any] = ()) -> int:
        with self.transaction() as cur:
            cur.execute(sql, params)
            return cur.rowcount

    def close(self) -> None:
        with self._lock:
            self._conn.close()
