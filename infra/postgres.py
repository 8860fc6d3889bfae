"""A throwaway PostgreSQL cluster on a loopback port, for tests and local trials.

Uses Debian's server binaries (``apt-get install postgresql``). PostgreSQL refuses
to run as root, so as root the cluster runs as the ``postgres`` system user.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path


def server_bin_dir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


@dataclass
class PostgresCluster:
    port: int
    datadir: Path
    bindir: Path
    user: str | None

    @property
    def url(self) -> str:
        return f"postgresql+asyncpg://fabloop@127.0.0.1:{self.port}/fabloop"

    def _run(self, args: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = ["runuser", "-u", self.user, "--", *args] if self.user else args
        return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=120)

    @classmethod
    def start(cls, port: int, base: Path | None = None) -> PostgresCluster:
        bindir = server_bin_dir()
        if bindir is None:
            raise RuntimeError("PostgreSQL server binaries not found (apt-get install postgresql)")
        user = "postgres" if os.geteuid() == 0 else None
        root = Path(tempfile.mkdtemp(prefix="fabloop-pg-", dir=base))
        datadir = root / "data"
        if user:
            pw = pwd.getpwnam(user)
            os.chown(root, pw.pw_uid, pw.pw_gid)
        cluster = cls(port=port, datadir=datadir, bindir=bindir, user=user)
        cluster._run([str(bindir / "initdb"), "-D", str(datadir), "-U", "postgres", "--auth=trust", "-E", "UTF8"])
        cluster.start_server()
        psql = [str(bindir / "psql"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-v", "ON_ERROR_STOP=1"]
        cluster._run([*psql, "-c", "CREATE ROLE fabloop LOGIN CREATEDB"])
        cluster._run([*psql, "-c", "CREATE DATABASE fabloop OWNER fabloop"])
        return cluster

    def start_server(self) -> None:
        """Start the server on the cluster's data (again, after ``stop_server``)."""
        root = self.datadir.parent
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {root} -c fsync=off -c max_connections=100"
        self._run([
            str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-l", str(root / "server.log"), "-w", "-t", "60",
            "start", "-o", options,
        ])

    def stop_server(self, mode: str = "fast") -> None:
        """Stop the server and keep its data: ``fast`` ends every session, ``immediate`` is a crash."""
        self._run([str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-m", mode, "-w", "stop"])

    def stop(self) -> None:
        self._run([str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-m", "fast", "-w", "stop"], check=False)
        shutil.rmtree(self.datadir.parent, ignore_errors=True)
