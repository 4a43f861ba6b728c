"""A PostgreSQL server of a test's (or a bench script's) own, which it may stop and start.

The shared server on 5432 serves every engineer's and CI's runs at once, so an outage must be
staged on a private one: `initdb` into a temporary directory, a free TCP port, the unix socket
in that directory (not /var/run/postgresql, where it would clash with the system cluster).
PostgreSQL refuses to run as root, so when we are root the directory is given to the
`postgres` OS user and the server runs as that user.

Used by tests/e2e/test_postgres_outage.py and bench/chaos.
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

# Durability is not what these servers are for; fsync would only slow the runs down.
FAST_SETTINGS = ("fsync=off", "synchronous_commit=off", "full_page_writes=off", "max_connections=200")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def bin_dir() -> Path:
    """The newest installed server's bin directory (Debian keeps initdb off the PATH)."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                        key=lambda p: int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0)
    if candidates:
        return Path(candidates[-1]).parent
    initdb = shutil.which("initdb")
    if initdb is None:
        raise RuntimeError("no PostgreSQL server installed (initdb not found); run scripts/bootstrap.sh")
    return Path(initdb).parent


class PgServer:
    """``start()``, ``stop()`` and ``start()`` again on the same port and data directory; ``close()``
    stops it and removes the directory. Use as a context manager so that nothing outlives the run."""

    def __init__(self, database: str = "ffworker") -> None:
        self.database = database
        self.port = free_port()
        self.bin = bin_dir()
        self.dir = Path(tempfile.mkdtemp(prefix="ffworker-pg-"))
        self.data = self.dir / "data"
        self.log_path = self.dir / "server.log"
        self.proc: subprocess.Popen | None = None
        self._user = pwd.getpwnam("postgres") if os.geteuid() == 0 else None
        if self._user is not None:
            os.chown(self.dir, self._user.pw_uid, self._user.pw_gid)
        self._run([str(self.bin / "initdb"), "-D", str(self.data), "--auth=trust", "--username=postgres",
                   "--encoding=UTF8", "--locale=C", "--no-sync"])

    @property
    def url(self) -> str:
        """The SQLAlchemy URL of the test database, over TCP (a stopped server refuses at once)."""
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{self.database}"

    def _as_user(self) -> dict:
        if self._user is None:
            return {}
        return {"user": self._user.pw_uid, "group": self._user.pw_gid, "extra_groups": []}

    def _run(self, argv: list[str]) -> None:
        done = subprocess.run(argv, cwd=self.dir, capture_output=True, text=True, **self._as_user())
        if done.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed: {done.stderr[-2000:]}")

    def start(self, timeout_s: float = 30.0) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        argv = [str(self.bin / "postgres"), "-D", str(self.data), "-p", str(self.port),
                "-h", "127.0.0.1", "-k", str(self.dir)]
        for setting in FAST_SETTINGS:
            argv += ["-c", setting]
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(argv, cwd=self.dir, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True, **self._as_user())
        finally:
            log.close()
        self.wait_ready(timeout_s)

    def wait_ready(self, timeout_s: float) -> None:
        import psycopg

        deadline = time.monotonic() + timeout_s
        while True:
            try:
                psycopg.connect(host="127.0.0.1", port=self.port, user="postgres", dbname="postgres",
                                connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"PostgreSQL did not start: {self.log_path.read_text()[-2000:]}")
                time.sleep(0.05)

    def stop(self, timeout_s: float = 30.0) -> None:
        """Fast shutdown (SIGINT): every session is ended at once, as when a database host goes away."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGINT)
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def create_database(self) -> str:
        """Create the database and migrate it to head; returns its URL."""
        import psycopg
        from alembic import command

        from ffworker.cli import alembic_config

        with psycopg.connect(host="127.0.0.1", port=self.port, user="postgres", dbname="postgres",
                             autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.database}"')
        command.upgrade(alembic_config(self.url), "head")
        return self.url

    def close(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "PgServer":
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()
