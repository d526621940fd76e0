"""Where an Optuna study lives (`tune.storage`), and the lock that keeps its trial count exact across workers.

`tune.storage` is one of
- `None`: an SQLite file `study.db` in the run directory (embedded, nothing to start);
- an RDB URL, `sqlite:///PATH` or `postgresql://USER:PASSWORD@HOST:PORT/DB` (Optuna's `RDBStorage`, with
  heartbeats so that a killed worker's trial is marked FAIL instead of staying RUNNING forever);
- `journal:PATH`: Optuna's journal file storage (several processes on one machine or on NFS).

The URL is parsed and checked before anything is opened, so a bad value leaves every storage untouched.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import optuna
import sqlalchemy
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from bench.errors import ConfigError

__all__ = ["RDB_BACKENDS", "StorageSpec", "StorageUnavailableError", "parse_storage"]

# The RDB backends the project tests against (SQLite embedded, PostgreSQL for clusters).
RDB_BACKENDS = ("sqlite", "postgresql")
_JOURNAL_PREFIX = "journal:"


class StorageUnavailableError(ConfigError):  # the CLIs print its one line and exit 2
    """`tune.storage` is well formed but cannot be opened (server down, path not writable)."""


@dataclass(frozen=True)
class StorageSpec:
    """A parsed `tune.storage`: `kind` is "rdb" or "journal", `target` the URL or the journal file path."""

    kind: str
    target: str

    @property
    def backend(self) -> str:
        return "journal" if self.kind == "journal" else make_url(self.target).get_backend_name()

    def display(self) -> str:
        """The storage as it may be written into results and logs: an RDB URL's password is masked."""
        if self.kind == "journal":
            return _JOURNAL_PREFIX + self.target
        return make_url(self.target).render_as_string(hide_password=True)

    def open(self, heartbeat_interval_s: int, grace_period_s: int | None) -> optuna.storages.BaseStorage:
        """Open (creating if needed) the storage."""
        # Workers of a job array start together; Optuna's table creation is not safe against that
        # (PostgreSQL: "duplicate key ... pg_type_typname_nsp_index" on CREATE TYPE), so one at a time.
        try:
            with self.lock("open"):
                return self._open(heartbeat_interval_s, grace_period_s)
        except (sqlalchemy.exc.SQLAlchemyError, OSError) as e:
            raise StorageUnavailableError(self.unavailable(e)) from None

    def unavailable(self, error: BaseException) -> str:
        """One line saying that this storage cannot be opened, why, and what to check (no password in it)."""
        from bench.io import mask_secrets

        lines = [line.strip() for line in str(getattr(error, "orig", None) or error).splitlines() if line.strip()]
        reason = mask_secrets(lines[0] if lines else type(error).__name__)[:240]
        what = "a reachable server" if self.backend == "postgresql" else "a path this user can write"
        return f"`tune.storage` must be {what}, but {self.display()} could not be opened: {reason}"

    def _open(self, heartbeat_interval_s: int, grace_period_s: int | None) -> optuna.storages.BaseStorage:
        if self.kind == "journal":
            Path(self.target).parent.mkdir(parents=True, exist_ok=True)
            return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(self.target))
        if self.backend == "sqlite":
            Path(make_url(self.target).database).parent.mkdir(parents=True, exist_ok=True)
        # No failed_trial_callback (RetryFailedTrialCallback): a trial lost with its worker is recorded as
        # FAIL and counts toward `tune.n_trials`; retrying it would count that budget twice.
        with warnings.catch_warnings():
            # Heartbeats are marked experimental, but they are the documented way to fail a killed worker's trial.
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                self.target,
                heartbeat_interval=heartbeat_interval_s,
                grace_period=grace_period_s,
                engine_kwargs=_engine_kwargs(self.backend),
            )

    @contextlib.contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """A lock named `name`, shared by every process using this storage.

        PostgreSQL: a session advisory lock (the server releases it if its holder dies). Files (SQLite,
        journal): Optuna's NFS-safe lock file next to the storage, forcibly released after a grace period
        if its holder died.
        """
        if self.backend == "postgresql":
            digest = hashlib.sha256(f"hypergrad.tune:{name}".encode()).digest()
            key = int.from_bytes(digest[:8], "big", signed=True)
            engine = sqlalchemy.create_engine(
                self.target, poolclass=sqlalchemy.pool.NullPool, **_engine_kwargs(self.backend)
            )
            try:
                with engine.connect() as conn:
                    conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": key})
                    try:
                        yield
                    finally:
                        conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": key})
            finally:
                engine.dispose()
            return
        path = self.target if self.kind == "journal" else make_url(self.target).database
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        lock = optuna.storages.journal.JournalFileOpenLock(f"{path}.{_safe(name)}")
        lock.acquire()
        try:
            yield
        finally:
            lock.release()

    def trial_lock(self, study_name: str) -> contextlib.AbstractContextManager[None]:
        """Serialize "count the study's trials, then create one" across every worker of `study_name`.

        Optuna's `MaxTrialsCallback` checks the count only after a trial ends, so workers finishing together
        each start one more trial and the study overshoots `n_trials`; creating trials under this lock keeps
        the total exact.
        """
        return self.lock(f"trials:{study_name}")


# An unreachable server fails within this many seconds instead of waiting for the OS's TCP timeout (minutes).
CONNECT_TIMEOUT_S = 10


def _engine_kwargs(backend: str) -> dict:
    return {"connect_args": {"connect_timeout": CONNECT_TIMEOUT_S}} if backend == "postgresql" else {}


def _safe(name: str) -> str:
    """A file-name-safe, collision-free stand-in for a study name."""
    return hashlib.sha256(name.encode()).hexdigest()[:16]


def parse_storage(value: str | None, default_sqlite: str | Path) -> StorageSpec:
    """Parse `tune.storage`; raise `ValueError` with one line naming the key and the value when it is not usable."""
    if value is None or value == "":
        return StorageSpec("rdb", f"sqlite:///{Path(default_sqlite).absolute()}")
    if not isinstance(value, str):
        raise ValueError(f"`tune.storage` must be an RDB URL or journal:PATH, but got {value!r}")
    if value.startswith(_JOURNAL_PREFIX):
        path = value[len(_JOURNAL_PREFIX) :]
        if not path:
            raise ValueError("`tune.storage` must name a file after journal:, but got 'journal:'")
        return StorageSpec("journal", str(Path(path).absolute()))
    allowed = f"one of {', '.join(f'{b}://...' for b in RDB_BACKENDS)} or journal:PATH"
    try:
        url = make_url(value)
    except ArgumentError:
        from bench.io import mask_secrets

        raise ValueError(f"`tune.storage` must be {allowed}, but got {mask_secrets(value)!r}") from None
    backend = url.get_backend_name()
    if backend not in RDB_BACKENDS:
        shown = url.render_as_string(hide_password=True)
        raise ValueError(f"`tune.storage` must be {allowed}, but got {shown!r} (backend {backend!r})")
    if backend == "sqlite" and not url.database:
        # sqlite:// alone is an in-memory database: every worker would get its own, and the study would vanish.
        raise ValueError(f"`tune.storage` must name a file for SQLite (sqlite:///PATH), but got {value!r}")
    if url.drivername == "postgresql" and importlib.util.find_spec("psycopg") is None:
        # SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3; the project installs psycopg2.
        url = url.set(drivername="postgresql+psycopg2")
    return StorageSpec("rdb", url.render_as_string(hide_password=False))
