"""A throwaway PostgreSQL server for tests: initdb into a temp directory, start on a free loopback port, stop by pid.

Usage from a test module::

    from tests.pg_server import start_postgres

    server = start_postgres()
    try:
        ...  # server.url is "postgresql://hypergrad:<password>@127.0.0.1:<port>/hypergrad_test"
    finally:
        server.stop()

or import the ``postgres_url`` fixture (``from tests.pg_server import postgres_url``) and take it as an argument.

A missing PostgreSQL installation raises ``RuntimeError`` naming what is missing, so the test fails instead of
passing silently (``.ci/run`` installs Debian's ``postgresql`` package).
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

__all__ = ["PostgresServer", "find_postgres_bin", "postgres_url", "start_postgres"]

_USER = "hypergrad"
_DATABASE = "hypergrad_test"


def find_postgres_bin() -> Path:
    """The directory holding ``initdb``, ``pg_ctl`` and ``postgres``: Debian's versioned dir, else ``PATH``."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name), reverse=True)
    for directory in candidates:
        if all(os.access(Path(directory, tool), os.X_OK) for tool in ("initdb", "pg_ctl", "postgres")):
            return Path(directory)
    initdb = shutil.which("initdb")
    if initdb and shutil.which("pg_ctl"):
        return Path(initdb).parent
    raise RuntimeError(
        "PostgreSQL server binaries (initdb, pg_ctl, postgres) were not found under /usr/lib/postgresql/*/bin "
        "or on PATH; install Debian's postgresql package (.ci/run does)"
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class PostgresServer:
    """A running server; ``stop()`` shuts it down by pid and deletes its files (idempotent)."""

    url: str
    port: int
    root: Path
    log_file: Path
    _stopped: bool = field(default=False, repr=False)

    @property
    def sqlalchemy_url(self) -> str:
        """The URL for SQLAlchemy (and Optuna's RDBStorage), naming the installed psycopg2 driver."""
        return self.url.replace("postgresql://", "postgresql+psycopg2://", 1)

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    def __iter__(self) -> Iterator[Any]:
        """Unpack as ``url, stop = start_postgres()``."""
        return iter((self.url, self.stop))

    def pid(self) -> int | None:
        pid_file = self.data_dir / "postmaster.pid"
        try:
            return int(pid_file.read_text().splitlines()[0])
        except (FileNotFoundError, IndexError, ValueError):
            return None

    def stop(self, timeout_s: float = 30.0) -> None:
        if self._stopped:
            return
        self._stopped = True
        pid = self.pid()
        if pid is not None:
            # SIGINT is PostgreSQL's "fast" shutdown: ends sessions and exits; it removes postmaster.pid when done.
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGINT)
            deadline = time.monotonic() + timeout_s
            while _alive(pid) and (self.data_dir / "postmaster.pid").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.root, ignore_errors=True)


def _alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie (the postmaster is not our child, so we cannot reap it) counts as gone."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state not in ("Z", "X")


def _traversable_by_others(path: Path) -> bool:
    return all(p.stat().st_mode & 0o001 for p in [path.resolve(), *path.resolve().parents])


def _as_server_user(argv: list[str]) -> list[str]:
    # initdb and postgres refuse to run as root; the Debian package creates the `postgres` system user.
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *argv]
    return argv


def start_postgres(base_dir: str | Path | None = None, timeout_s: float = 60.0) -> PostgresServer:
    """Initialise a cluster, start it on a free 127.0.0.1 port and create an empty database; return the server.

    The data lives in a fresh directory under ``base_dir`` (default: the system temp dir). When running as root the
    server runs as the ``postgres`` user, which must be able to reach that directory; pytest's ``tmp_path`` is not
    reachable (``/tmp/pytest-of-root`` is mode 0700), so a ``base_dir`` that other users cannot traverse is replaced
    by the system temp dir. ``url, stop = start_postgres()`` also works.
    """
    import psycopg2  # imported here so a module that only imports this file does not need the driver

    bin_dir = find_postgres_bin()
    if base_dir is not None and os.geteuid() == 0 and not _traversable_by_others(Path(base_dir)):
        base_dir = None
    root = Path(tempfile.mkdtemp(prefix="hypergrad-pg-", dir=base_dir))
    password = secrets.token_hex(12)
    pw_file = root / "pwfile"
    pw_file.write_text(password + "\n")
    if os.geteuid() == 0:
        for path in (root, pw_file):
            shutil.chown(path, "postgres", "postgres")
    port = _free_port()
    server = PostgresServer(
        url=f"postgresql://{_USER}:{password}@127.0.0.1:{port}/{_DATABASE}",
        port=port,
        root=root,
        log_file=root / "postgres.log",
    )
    atexit.register(server.stop)  # a crashed test session must not leave a server running on the shared machine
    try:
        _run(
            _as_server_user(
                [
                    str(bin_dir / "initdb"),
                    "-D",
                    str(server.data_dir),
                    "-U",
                    _USER,
                    f"--pwfile={pw_file}",
                    "--auth=scram-sha-256",
                    "--encoding=UTF8",
                    "--no-sync",  # a throwaway cluster: skipping fsync saves seconds
                ]
            )
        )
        pw_file.unlink()
        with open(server.data_dir / "postgresql.conf", "a") as conf:
            conf.write(
                "\n# hypergrad tests: loopback only, a private socket dir, no durability needed\n"
                f"listen_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{root}'\n"
                "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\nmax_connections = 50\n"
            )
        _run(
            _as_server_user(
                [
                    str(bin_dir / "pg_ctl"),
                    "start",
                    "-w",
                    f"--timeout={int(timeout_s)}",
                    "-D",
                    str(server.data_dir),
                    "-l",
                    str(server.log_file),
                ]
            )
        )
        conn = psycopg2.connect(host="127.0.0.1", port=port, user=_USER, password=password, dbname="postgres")
        try:
            conn.autocommit = True  # CREATE DATABASE cannot run inside a transaction
            with conn.cursor() as cur:
                cur.execute(f"CREATE DATABASE {_DATABASE}")
        finally:
            conn.close()
    except BaseException as exc:
        log = server.log_file.read_text()[-2000:] if server.log_file.exists() else ""
        server.stop()
        if isinstance(exc, subprocess.CalledProcessError | psycopg2.Error):
            detail = getattr(exc, "stderr", None) or ""
            raise RuntimeError(f"could not start a test PostgreSQL server: {exc}\n{detail}{log}") from exc
        raise
    return server


def _run(argv: list[str]) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise subprocess.CalledProcessError(result.returncode, argv, result.stdout, result.stderr)


@contextlib.contextmanager
def running_postgres(base_dir: str | Path | None = None) -> Iterator[str]:
    """Context manager form: yields the URL, stops the server on exit."""
    server = start_postgres(base_dir)
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database URL (with password) on loopback; the server is stopped by pid afterwards."""
    with running_postgres() as url:
        yield url
