"""A real one-node SLURM cluster on this machine (munged, slurmctld, slurmd from Debian's packages), for tests.

Everything lives in one folder: the munge key and socket, ``slurm.conf`` (localhost, the usable CPUs, no GPU,
free ports), state, spool, daemon logs and the job completion log that ``sacct -c`` reads (there is no
accounting database). Clients find the cluster through ``SLURM_CONF``. Needs root (the daemons run as root) and
the binaries on PATH; :func:`unavailable` says why not where they cannot start.

    python tests/slurm_local.py start DIR     # prints the SLURM_CONF line to export
    python tests/slurm_local.py stop DIR
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
NODE = "nsnnode"


def unavailable() -> str | None:
    """Why a local cluster cannot start here, or None."""
    missing = [name for name in (*DAEMONS, "sbatch", "squeue", "sacct", "scancel") if shutil.which(name) is None]
    if missing:
        return f"SLURM is not installed (missing {', '.join(missing)}; apt-get install slurm-wlm munge)"
    if os.geteuid() != 0:
        return "the local SLURM daemons need root"
    return None


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@dataclass(frozen=True)
class LocalCluster:
    folder: Path

    @property
    def conf(self) -> Path:
        return self.folder / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        """What a client process needs on top of its environment."""
        return {"SLURM_CONF": str(self.conf)}

    def command(self, *args: str) -> str:
        """A client command's output (squeue, sacct, scontrol ...) against this cluster."""
        done = subprocess.run(list(args), env={**os.environ, **self.env}, capture_output=True, text=True, timeout=60)
        return done.stdout + done.stderr

    def stop(self) -> None:
        """Stop the daemons (slurmd and slurmctld first, munged last); what a job left running goes with slurmd."""
        for daemon in ("slurmd", "slurmctld", "munged"):
            pid_file = self.folder / f"{daemon}.pid"
            try:
                pid = int(pid_file.read_text().strip())
            except (OSError, ValueError):
                continue
            try:
                os.kill(pid, signal.SIGTERM)
                for _ in range(50):
                    os.kill(pid, 0)
                    time.sleep(0.1)
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _config(folder: Path, cpus: int, memory_mb: int) -> str:
    controller_port, node_port = _free_ports(2)
    return "\n".join([
        "ClusterName=nsntest", "SlurmctldHost=localhost(127.0.0.1)", f"SlurmctldPort={controller_port}",
        f"SlurmdPort={node_port}", "AuthType=auth/munge", f"AuthInfo=socket={folder / 'munge.sock'}",
        "CredType=cred/munge", "SlurmUser=root", "SlurmdUser=root", f"StateSaveLocation={folder / 'state'}",
        f"SlurmdSpoolDir={folder / 'spool'}", f"SlurmctldPidFile={folder / 'slurmctld.pid'}",
        f"SlurmdPidFile={folder / 'slurmd.pid'}", f"SlurmctldLogFile={folder / 'slurmctld.log'}",
        f"SlurmdLogFile={folder / 'slurmd.log'}", "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
        "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU", "ReturnToService=2", "MpiDefault=none",
        "SchedulerParameters=sched_interval=2", "JobCompType=jobcomp/filetxt",
        f"JobCompLoc={folder / 'jobcomp.txt'}", "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none", "MinJobAge=3600", "KillWait=5",
        f"NodeName={NODE} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN",
        f"PartitionName=debug Nodes={NODE} Default=YES MaxTime=INFINITE State=UP", ""])


def start(folder: str | os.PathLike, cpus: int | None = None, timeout: float = 60) -> LocalCluster:
    """Start the three daemons with a config in ``folder`` and wait until the node is idle; RuntimeError naming
    the daemon's log where one fails."""
    folder = Path(folder).resolve()
    for sub in ("state", "spool"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    key = folder / "munge.key"
    if not key.is_file():
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
    cpus = cpus or len(os.sched_getaffinity(0))
    memory_mb = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20 * 0.8)
    (folder / "slurm.conf").write_text(_config(folder, cpus, memory_mb))
    cluster = LocalCluster(folder)
    env = {**os.environ, **cluster.env}
    commands = {"munged": ["munged", "-f", f"--key-file={key}", f"--socket={folder / 'munge.sock'}",
                           f"--pid-file={folder / 'munged.pid'}", f"--log-file={folder / 'munged.log'}",
                           f"--seed-file={folder / 'munge.seed'}"],
                "slurmctld": ["slurmctld", "-c"], "slurmd": ["slurmd", "-N", NODE]}
    for daemon, command in commands.items():
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=30)
        if done.returncode != 0:
            cluster.stop()
            raise RuntimeError(f"{daemon} did not start ({done.stderr.strip()[-300:]}); see {folder}/{daemon}.log")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = cluster.command("sinfo", "-h", "-o", "%T").strip()
        if state == "idle":
            return cluster
        time.sleep(0.5)
    cluster.stop()
    raise RuntimeError(f"the node did not come up within {timeout:.0f} s (sinfo: {state!r}); see {folder}/slurmd.log")


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("start", "stop"):
        sys.exit(__doc__)
    if sys.argv[1] == "start":
        print(f"export SLURM_CONF={start(sys.argv[2]).conf}")
    else:
        LocalCluster(Path(sys.argv[2]).resolve()).stop()
