"""Where human judgements live: a SQLite file (`--db runs/votes.db`) of the answers the server produced, the arena's
battles and votes, and ratings.

    meta      schema_version, the secret that signs battle ids
    answers   id, created, session, model, prompt, system, answer, settings (JSON), kind ("chat" | "battle"); a chat
              answer is stored only once it is rated
    battles   id, created, session, prompt, system, settings, model_a, model_b, answer_a, answer_b, answer_a_id,
              answer_b_id, winner ("a" | "b" | "tie" | "both_bad", NULL until voted), voted
    ratings   id, answer_id, created, session, score (1-5), correctness, fluency, comment, client (one per answer and
              session, and one per answer and client address)

WAL mode and synchronous=FULL: each vote is one transaction, on disk when the server answers (a `kill -9` right after
loses nothing), and several processes may share the file (SQLite's locks; a busy one waits up to 10 s). Battle ids
are signed (HMAC-SHA256 with the file's secret), so a vote can only name a battle this database issued. SQL only with
parameters.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import sqlite3
import threading
import time
from pathlib import Path

from llmkit.errors import LlmkitError

SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS answers (
    id TEXT PRIMARY KEY, created REAL NOT NULL, session TEXT, model TEXT NOT NULL, prompt TEXT NOT NULL, system TEXT,
    answer TEXT NOT NULL, settings TEXT NOT NULL, kind TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS battles (
    id TEXT PRIMARY KEY, created REAL NOT NULL, session TEXT, prompt TEXT NOT NULL, system TEXT, settings TEXT NOT NULL,
    model_a TEXT NOT NULL, model_b TEXT NOT NULL, answer_a TEXT NOT NULL, answer_b TEXT NOT NULL,
    answer_a_id TEXT NOT NULL, answer_b_id TEXT NOT NULL, winner TEXT, voted REAL);
CREATE TABLE IF NOT EXISTS ratings (
    id INTEGER PRIMARY KEY AUTOINCREMENT, answer_id TEXT NOT NULL REFERENCES answers(id), created REAL NOT NULL,
    session TEXT, score INTEGER NOT NULL, correctness INTEGER, fluency INTEGER, comment TEXT, UNIQUE (answer_id, session));
"""


class VoteError(LlmkitError):
    """A vote or rating the store refuses; `status` is the HTTP status the server answers."""

    def __init__(self, status: int, message: str, fix: str = ""):
        super().__init__(message, fix)
        self.status = status


class VoteStore:
    def __init__(self, path: str | Path, *, create: bool = True):
        self.path = Path(path)
        if not create and not self.path.exists():
            raise LlmkitError(f"no votes database at {self.path}", "give the --db file `llmkit serve --db` wrote")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(self.path, timeout=10, check_same_thread=False, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.execute("PRAGMA foreign_keys=ON")
            with self._tx():
                for statement in SCHEMA.split(";"):
                    if statement.strip():
                        self.db.execute(statement)
                columns = {r[1] for r in self.db.execute("PRAGMA table_info(ratings)")}
                if "client" not in columns:  # a database from before ratings were one per client address too
                    self.db.execute("ALTER TABLE ratings ADD COLUMN client TEXT")
                self.db.execute("CREATE UNIQUE INDEX IF NOT EXISTS ratings_client ON ratings (answer_id, client)")
                version = self._meta("schema_version")
                if version is None:
                    self.db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
                    self.db.execute("INSERT INTO meta VALUES ('secret', ?)", (secrets.token_hex(32),))
                elif int(version) > SCHEMA_VERSION:
                    raise LlmkitError(
                        f"{self.path} has schema version {version}, newer than this llmkit's {SCHEMA_VERSION}",
                        "upgrade llmkit, or use another --db file",
                    )
        except sqlite3.DatabaseError as e:
            raise LlmkitError(f"{self.path} is not a votes database ({e})", "give another --db file, or move this one away") from None
        self.secret = bytes.fromhex(self._meta("secret") or "")
        self.lock = threading.Lock()

    def _tx(self):
        db = self.db

        class Tx:
            def __enter__(self):
                db.execute("BEGIN IMMEDIATE")

            def __exit__(self, kind, *_):
                if kind is None:
                    try:
                        db.execute("COMMIT")
                        return
                    except sqlite3.Error:
                        db.execute("ROLLBACK")  # never leave the connection inside a failed transaction
                        raise
                db.execute("ROLLBACK")

        return Tx()

    def _meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    # --- ids ---------------------------------------------------------------------------------------------------------

    def sign(self, token: str) -> str:
        return f"{token}.{hmac.new(self.secret, token.encode(), hashlib.sha256).hexdigest()[:24]}"

    def verify(self, signed: str) -> bool:
        token, _, tag = signed.rpartition(".")
        return bool(token) and hmac.compare_digest(self.sign(token), signed)

    # --- writes ------------------------------------------------------------------------------------------------------

    def _insert_answer(self, answer_id: str, when: float, session, model: str, prompt: str, system, answer: str, settings, kind: str):
        """One row of `answers` (inside the caller's transaction)."""
        self.db.execute(
            "INSERT INTO answers VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (answer_id, when, session, model, prompt, system, answer, json.dumps(settings), kind),
        )

    def add_battle(
        self,
        *,
        prompt: str,
        system: str | None,
        settings: dict,
        model_a: str,
        model_b: str,
        answer_a: str,
        answer_b: str,
        session: str | None = None,
    ) -> tuple[str, str, str]:
        """(battle id, answer id of a, of b): both answers and the battle in one transaction."""
        battle_id = self.sign(f"bat-{secrets.token_urlsafe(12)}")
        ids = [self.sign(f"ans-{secrets.token_urlsafe(12)}") for _ in range(2)]
        now = time.time()
        with self.lock, self._tx():
            for answer_id, model, answer in zip(ids, (model_a, model_b), (answer_a, answer_b)):
                self._insert_answer(answer_id, now, session, model, prompt, system, answer, settings, "battle")
            self.db.execute(
                "INSERT INTO battles VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, NULL)",
                (battle_id, now, session, prompt, system, json.dumps(settings), model_a, model_b, answer_a, answer_b, *ids),
            )
        return battle_id, ids[0], ids[1]

    def vote(self, battle_id: str, winner: str) -> tuple[str, str]:
        """Record the vote (once per battle); returns (model_a, model_b)."""
        if winner not in ("a", "b", "tie", "both_bad"):
            raise VoteError(400, f"winner {winner!r} is not one of a, b, tie, both_bad")
        if not self.verify(battle_id):
            raise VoteError(404, "this battle id was not issued by this server", "vote on a battle from POST /arena/battles")
        with self.lock, self._tx():
            row = self.db.execute("SELECT model_a, model_b, winner FROM battles WHERE id = ?", (battle_id,)).fetchone()
            if row is None:
                raise VoteError(404, "no such battle", "vote on a battle from POST /arena/battles")
            if row[2] is not None:
                raise VoteError(409, "this battle already has a vote", "start a new battle")
            self.db.execute("UPDATE battles SET winner = ?, voted = ? WHERE id = ?", (winner, time.time(), battle_id))
        return row[0], row[1]

    def rate(
        self,
        answer_id: str,
        score: int,
        *,
        correctness: int | None = None,
        fluency: int | None = None,
        comment: str | None = None,
        session: str | None = None,
        answer: dict | None = None,
        client: str | None = None,
    ) -> str:
        """Record a rating of an answer this server produced (once per session, and once per client address: a client
        that invents session ids still rates an answer once); returns the answer's model. `answer`: the answer's
        record when the server kept it in memory only (a chat answer), stored with its first rating."""
        for name, value in (("score", score), ("correctness", correctness), ("fluency", fluency)):
            if value is not None and not (isinstance(value, int) and 1 <= value <= 5):
                raise VoteError(400, f"{name} {value!r} is not a whole number from 1 to 5")
        if not self.verify(answer_id):
            raise VoteError(404, "this answer id was not issued by this server", "rate an answer the server gave (its answer_id)")
        with self.lock, self._tx():
            row = self.db.execute("SELECT model FROM answers WHERE id = ?", (answer_id,)).fetchone()
            if row is None and answer is not None:
                a = answer
                self._insert_answer(
                    answer_id, time.time(), session, a["model"], a["prompt"], a.get("system"), a["answer"], a.get("settings", {}), "chat"
                )
                row = (answer["model"],)
            if row is None:
                raise VoteError(
                    404,
                    "no such answer (the server forgets unrated chat answers when it restarts)",
                    "rate an answer the server gave (its answer_id)",
                )
            try:
                self.db.execute(
                    "INSERT INTO ratings (answer_id, created, session, score, correctness, fluency, comment, client) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (answer_id, time.time(), session, score, correctness, fluency, comment, client),
                )
            except sqlite3.IntegrityError:
                raise VoteError(409, "this answer already has your rating", "rate another answer") from None
        return row[0]

    # --- reads -------------------------------------------------------------------------------------------------------

    def battles(self) -> list[tuple[str, str, str]]:
        """(model_a, model_b, winner) of every voted battle, in the order of the votes."""
        with self.lock:
            rows = self.db.execute("SELECT model_a, model_b, winner FROM battles WHERE winner IS NOT NULL ORDER BY voted, id").fetchall()
        return [tuple(r) for r in rows]

    def ratings(self) -> dict[str, list[float]]:
        """model -> its answers' helpfulness scores."""
        with self.lock:
            rows = self.db.execute("SELECT a.model, r.score FROM ratings r JOIN answers a ON a.id = r.answer_id ORDER BY r.id").fetchall()
        out: dict[str, list[float]] = {}
        for model, score in rows:
            out.setdefault(model, []).append(float(score))
        return out

    def export(self) -> list[dict]:
        """Every voted battle and every rating, as JSON-ready rows."""
        with self.lock:
            cur = self.db.execute("SELECT * FROM battles WHERE winner IS NOT NULL ORDER BY voted, id")
            cols = [c[0] for c in cur.description]
            battles = [{"type": "vote", **dict(zip(cols, r))} for r in cur.fetchall()]
            cur = self.db.execute(
                "SELECT r.*, a.model, a.prompt, a.system, a.answer FROM ratings r JOIN answers a ON a.id = r.answer_id ORDER BY r.id"
            )
            cols = [c[0] for c in cur.description]
            # the client address only enforces one rating per client: it stays out of exports
            ratings = [{"type": "rating", **{k: v for k, v in zip(cols, r) if k != "client"}} for r in cur.fetchall()]
        for row in battles:
            row["settings"] = json.loads(row["settings"])
        return battles + ratings

    def close(self) -> None:
        self.db.close()
