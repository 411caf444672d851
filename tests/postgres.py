"""A real PostgreSQL server for the tests, started from Debian's ``postgresql`` package on 127.0.0.1.

``make test`` installs the package (``system-deps``). The server refuses to run as root, so as
root it runs as the ``postgres`` user the package creates (``runuser``); its data folder is a
fresh temporary folder, trust authentication on the loopback only, stopped at the end.

Example::

    with postgres_server() as url:      # postgresql://postgres@127.0.0.1:PORT/postgres
        history.record_run(url, results)
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path


def binaries() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(found[-1]).parent if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_server_user(args: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else args


def create_database(url_base: str, name: str) -> str:
    """A new empty database on the server; returns its URL."""
    import sqlalchemy as sa

    engine = sa.create_engine(url_base.replace("postgresql://", "postgresql+psycopg://"), isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return url_base.rsplit("/", 1)[0] + f"/{name}"


@contextlib.contextmanager
def postgres_server():
    bin_dir = binaries()
    if bin_dir is None:
        raise RuntimeError("PostgreSQL is not installed (make system-deps installs Debian's postgresql)")
    folder = Path(tempfile.mkdtemp(prefix="qa-pg-"))
    data = folder / "data"
    port = _free_port()
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
    try:
        subprocess.run(_as_server_user([str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                                        "--no-sync", "-E", "UTF8"]), check=True, capture_output=True, cwd=folder)
        subprocess.run(_as_server_user([str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(folder / "log"), "-w", "-t", "60",
                                        "-o", f"-h 127.0.0.1 -p {port} -k {folder} -c fsync=off", "start"]),
                       check=True, capture_output=True, cwd=folder)
        url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        deadline = time.monotonic() + 30
        while subprocess.run([str(bin_dir / "pg_isready"), "-h", "127.0.0.1", "-p", str(port)],
                             capture_output=True).returncode != 0:
            if time.monotonic() > deadline:
                raise RuntimeError(f"PostgreSQL did not start: {(folder / 'log').read_text()[-2000:]}")
            time.sleep(0.2)
        yield url
    finally:
        subprocess.run(_as_server_user([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"]),
                       capture_output=True, cwd=folder)
        shutil.rmtree(folder, ignore_errors=True)
