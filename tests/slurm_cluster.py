"""A real one-node SLURM cluster for the tests, with all of its state in one folder.

Debian's ``slurm-wlm`` and ``munge`` (``.ci/run`` installs them): ``munged`` with a fresh key, then
``slurmctld`` and ``slurmd`` as root with a short ``slurm.conf`` (one node, one partition,
``proctrack/linuxproc``, ``task/none``), every daemon bound to 127.0.0.1. Clients find the cluster
through ``SLURM_CONF`` (see :meth:`SlurmCluster.env`).

By hand (as root)::

    python tests/slurm_cluster.py /tmp/slurm   # starts it, prints the SLURM_CONF to export, Ctrl-C stops it
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "scancel", "squeue", "sinfo", "srun")


def missing() -> str | None:
    """Why a cluster cannot be started here (None: it can)."""
    absent = [n for n in CLIENTS if shutil.which(n) is None] + [
        n for n in DAEMONS if shutil.which(n) is None and not Path("/usr/sbin", n).exists()
    ]
    if absent:
        return f"no SLURM installed ({', '.join(absent)} missing; Debian/Ubuntu: apt-get install slurm-wlm munge)"
    if os.geteuid() != 0:
        return "starting slurmd needs root"
    return None


def _daemon(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlurmCluster:
    """munged + slurmctld + slurmd with state, logs and sockets under ``root``."""

    def __init__(self, root: Path, cpus: int = 4, memory_mb: int = 8000) -> None:
        self.root = Path(root)
        self.cpus, self.memory_mb = cpus, memory_mb
        self.node = socket.gethostname().split(".")[0]
        self.conf = self.root / "slurm.conf"

    def env(self) -> dict[str, str]:
        """Environment variables that point SLURM's clients at this cluster."""
        return {"SLURM_CONF": str(self.conf)}

    def _write_conf(self) -> None:
        r = self.root
        lines = {
            "ClusterName": "crabnettest",
            "SlurmctldHost": f"{self.node}(127.0.0.1)",
            "SlurmctldPort": _free_port(),
            "SlurmdPort": _free_port(),
            "SlurmUser": "root",
            "SlurmdUser": "root",
            "AuthType": "auth/munge",
            "CredType": "cred/munge",
            "AuthInfo": f"socket={r / 'munge' / 'munge.socket'}",
            "CommunicationParameters": "NoInAddrAny,NoCtldInAddrAny",  # bind 127.0.0.1, not every address
            "SlurmdParameters": "config_overrides",  # more CPUs than the machine: the tests share cores
            "StateSaveLocation": r / "state",
            "SlurmdSpoolDir": r / "spool",
            "SlurmctldPidFile": r / "slurmctld.pid",
            "SlurmdPidFile": r / "slurmd.pid",
            "SlurmctldLogFile": r / "slurmctld.log",
            "SlurmdLogFile": r / "slurmd.log",
            "ProctrackType": "proctrack/linuxproc",
            "TaskPlugin": "task/none",
            "SelectType": "select/cons_tres",
            "SelectTypeParameters": "CR_Core",
            "JobAcctGatherType": "jobacct_gather/none",
            "AccountingStorageType": "accounting_storage/none",
            "JobCompType": "jobcomp/none",
            "MpiDefault": "none",
            "ReturnToService": 2,
            "KillWait": 5,
        }
        text = "".join(f"{k}={v}\n" for k, v in lines.items())
        text += f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={self.memory_mb} State=UNKNOWN\n"
        text += "PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP\n"
        self.conf.write_text(text)

    def start(self, timeout: float = 60) -> SlurmCluster:
        """Start the three daemons and wait until the node takes jobs.

        Raises:
            RuntimeError: with the daemons' logs when the node is not up within ``timeout`` s.
        """
        munge = self.root / "munge"
        for d in (munge, self.root / "state", self.root / "spool"):
            d.mkdir(parents=True, exist_ok=True)
        munge.chmod(0o711)  # munged wants its socket folder reachable by every user
        key = munge / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        key.chmod(0o600)
        self._write_conf()
        subprocess.run(
            [_daemon("munged"), "--force", f"--key-file={key}", f"--socket={munge / 'munge.socket'}",
             f"--pid-file={munge / 'munged.pid'}", f"--log-file={munge / 'munged.log'}",
             f"--seed-file={munge / 'munged.seed'}"],
            check=True,
        )  # fmt: skip
        env = {**os.environ, **self.env()}
        subprocess.run([_daemon("slurmctld"), "-f", str(self.conf)], check=True, env=env)
        subprocess.run([_daemon("slurmd"), "-f", str(self.conf)], check=True, env=env)
        end = time.time() + timeout
        while time.time() < end:
            out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, env=env)
            if out.returncode == 0 and out.stdout.strip() in ("idle", "mix", "alloc"):
                return self
            time.sleep(0.5)
        raise RuntimeError(f"SLURM did not come up within {timeout} s:\n{self.logs()}")

    def logs(self) -> str:
        """The tail of each daemon's log."""
        files = (self.root / "slurmctld.log", self.root / "slurmd.log", self.root / "munge" / "munged.log")
        return "\n".join(f"== {p}\n" + "\n".join(p.read_text().splitlines()[-20:]) for p in files if p.exists())

    def stop(self) -> None:
        """Cancel every job, then stop slurmd, slurmctld and munged."""
        env = {**os.environ, **self.env()}
        subprocess.run(["scancel", "--full", "--user", "root"], capture_output=True, env=env, timeout=30)
        for pid_file in (self.root / "slurmd.pid", self.root / "slurmctld.pid", self.root / "munge" / "munged.pid"):
            try:
                pid = int(pid_file.read_text().split()[0])
                os.kill(pid, 15)
            except (OSError, ValueError, IndexError):
                continue
            for _ in range(100):
                try:
                    os.kill(pid, 0)
                except OSError:
                    break
                time.sleep(0.1)

    def listening(self) -> list[str]:
        """Local addresses the daemons listen on (``ss -ltnp``), e.g. ``['127.0.0.1:40123', ...]``."""
        out = subprocess.run(["ss", "-ltnp"], capture_output=True, text=True).stdout
        return [ln.split()[3] for ln in out.splitlines() if any(f'"{d}"' in ln for d in DAEMONS)]


if __name__ == "__main__":
    import sys

    cluster = SlurmCluster(Path(sys.argv[1] if len(sys.argv) > 1 else "slurm-test")).start()
    print(f"export SLURM_CONF={cluster.conf}")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        cluster.stop()
