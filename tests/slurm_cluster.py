"""A real one-node SLURM cluster (munged + slurmctld + slurmd) started by the tests on this machine.

Everything lives in one temporary directory: the munge key and socket, ``slurm.conf``, the state and spool
directories and the logs. The daemons run in the foreground as children of the test process (no systemd) and
are stopped by process id. Settings are the ones that work in a container without cgroups: process tracking by
``/proc`` (``proctrack/linuxproc``), no task plugin, root as the SLURM user, no accounting database.

Usage::

    with SlurmCluster.start(tmp_dir) as cluster:
        subprocess.run(["sbatch", "--wrap", "true"], env=cluster.env, check=True)
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "scontrol", "scancel")
PARTITION = "debug"


class SlurmUnavailableError(RuntimeError):
    """The SLURM or munge daemons are missing or did not come up; the message says which and why."""


def _sbin(name: str) -> str | None:
    # Debian installs the daemons in /usr/sbin, which a non-login PATH may lack.
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")


def _free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _node_hardware(slurmd: str) -> tuple[int, int]:
    """CPUs and memory (MB) of this machine as slurmd itself sees them (``slurmd -C``)."""
    out = subprocess.run([slurmd, "-C"], capture_output=True, text=True, check=True, timeout=30).stdout
    fields = dict(item.split("=", 1) for item in out.split() if "=" in item)
    return int(fields["CPUs"]), int(fields["RealMemory"])


def _tail(path: Path, lines: int = 15) -> str:
    if not path.exists():
        return f"({path.name} missing)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class SlurmCluster:
    """Handle on a running test cluster: its directory, environment and daemon processes."""

    root: Path
    env: dict[str, str]
    node: str
    cpus: int
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    @classmethod
    @contextmanager
    def start(cls, root: Path, timeout_s: float = 60.0) -> Iterator[SlurmCluster]:
        """Start munged, slurmctld and slurmd under ``root``; stop them (by pid) when the block ends."""
        missing = [name for name in DAEMONS if _sbin(name) is None]
        if missing:
            raise SlurmUnavailableError(
                f"SLURM test cluster needs {', '.join(missing)} on PATH; install Debian's slurm-wlm and munge "
                "(.ci/run does this)"
            )
        root = Path(root)
        root.chmod(0o700)  # munged refuses a key or socket in a directory others can write to
        cluster = cls._configure(root)
        try:
            cluster._start_daemons(timeout_s)
            yield cluster
        finally:
            cluster.stop()

    @classmethod
    def _configure(cls, root: Path) -> SlurmCluster:
        for sub in ("munge", "state", "spool", "log"):
            (root / sub).mkdir(mode=0o700, exist_ok=True)
        key = root / "munge" / "munge.key"
        subprocess.run([_sbin("mungekey"), "--create", f"--keyfile={key}"], check=True, timeout=30)
        key.chmod(0o600)
        node = socket.gethostname().split(".")[0]
        cpus, memory_mb = _node_hardware(_sbin("slurmd"))
        conf = root / "slurm.conf"
        conf.write_text(
            "\n".join(
                [
                    "ClusterName=hypergrad-test",
                    f"SlurmctldHost={node}(127.0.0.1)",
                    "SlurmUser=root",
                    "SlurmdUser=root",
                    "AuthType=auth/munge",
                    "CredType=cred/munge",
                    # cred_expire also sets how long a requeued job waits before it may start again (default 120 s).
                    f"AuthInfo=socket={root / 'munge' / 'munge.socket'},cred_expire=5",
                    f"SlurmctldPort={_free_port()}",
                    f"SlurmdPort={_free_port()}",
                    f"StateSaveLocation={root / 'state'}",
                    f"SlurmdSpoolDir={root / 'spool'}",
                    f"SlurmctldPidFile={root / 'slurmctld.pid'}",
                    f"SlurmdPidFile={root / 'slurmd.pid'}",
                    f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}",
                    f"SlurmdLogFile={root / 'log' / 'slurmd.log'}",
                    "SlurmctldDebug=info",
                    "SlurmdDebug=info",
                    # No cgroups in a container: track job processes through /proc, bind no tasks.
                    "ProctrackType=proctrack/linuxproc",
                    "TaskPlugin=task/none",
                    "JobAcctGatherType=jobacct_gather/none",
                    "AccountingStorageType=accounting_storage/none",
                    "JobCompType=jobcomp/none",
                    "SelectType=select/cons_tres",
                    "SelectTypeParameters=CR_Core",
                    "MpiDefault=none",
                    # Schedule every second so that a requeued job starts again quickly.
                    "SchedulerParameters=sched_interval=1,bf_interval=1",
                    "MailProg=/bin/true",
                    "ReturnToService=2",
                    # Keep finished jobs visible to `scontrol show job` long enough for tests to inspect them.
                    "MinJobAge=600",
                    f"NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN",
                    f"PartitionName={PARTITION} Nodes={node} Default=YES MaxTime=INFINITE State=UP",
                    "",
                ]
            )
        )
        env = dict(os.environ)
        env["SLURM_CONF"] = str(conf)
        # A test running inside a SLURM job must not leak that job's identity into the jobs it submits.
        for name in [n for n in env if n.startswith(("SLURM_", "SBATCH_", "SRUN_")) and n != "SLURM_CONF"]:
            del env[name]
        return cls(root=root, env=env, node=node, cpus=cpus)

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = (self.root / "log" / f"{name}.out").open("ab")
        # A new session keeps a Ctrl-C in the terminal from reaching the daemons before teardown does.
        self.processes[name] = subprocess.Popen(
            argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()

    def _start_daemons(self, timeout_s: float) -> None:
        munge = self.root / "munge"
        self._spawn(
            "munged",
            [
                _sbin("munged"),
                "--foreground",
                "--force",  # allow running as root with the key in a temp directory
                f"--socket={munge / 'munge.socket'}",
                f"--key-file={munge / 'munge.key'}",
                f"--pid-file={munge / 'munged.pid'}",
                f"--log-file={munge / 'munged.log'}",
                f"--seed-file={munge / 'munged.seed'}",
            ],
        )
        self._wait(lambda: (munge / "munge.socket").exists(), timeout_s, "munged did not create its socket")
        conf = self.env["SLURM_CONF"]
        self._spawn("slurmctld", [_sbin("slurmctld"), "-D", "-f", conf])
        self._spawn("slurmd", [_sbin("slurmd"), "-D", "-f", conf, "-N", self.node])
        self._wait(lambda: self.node_state() == "idle", timeout_s, "the node did not become idle")

    def _wait(self, ready, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            dead = [name for name, proc in self.processes.items() if proc.poll() is not None]
            if dead:
                raise SlurmUnavailableError(f"{', '.join(dead)} exited during start-up\n{self.logs()}")
            if ready():
                return
            time.sleep(0.3)
        raise SlurmUnavailableError(f"{what} within {timeout_s:.0f} s\n{self.logs()}")

    def logs(self) -> str:
        """The last lines of every daemon log, for failure messages."""
        paths = [self.root / "munge" / "munged.log", *sorted((self.root / "log").glob("*"))]
        return "\n".join(f"--- {path.name}\n{_tail(path)}" for path in paths)

    def run(self, *argv: str, check: bool = True, timeout_s: float = 30.0) -> str:
        """Run a SLURM client command (sbatch, squeue, scontrol...) against this cluster; return its stdout."""
        proc = subprocess.run(list(argv), env=self.env, capture_output=True, text=True, timeout=timeout_s)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc.stdout

    def node_state(self) -> str:
        proc = subprocess.run(
            ["sinfo", "--noheader", "--format=%T", f"--nodes={self.node}"],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return proc.stdout.strip() if proc.returncode == 0 else ""

    def jobs(self) -> list[dict[str, str]]:
        """Jobs the controller still knows (running, pending and recently finished), one dict per job."""
        out = self.run("scontrol", "--oneliner", "show", "job", check=False)
        jobs = []
        for line in out.splitlines():
            if line.startswith("JobId="):
                jobs.append(dict(item.split("=", 1) for item in line.split() if "=" in item))
        return jobs

    def wait_idle(self, timeout_s: float = 120.0) -> None:
        """Wait until no job is pending or running."""
        self._wait(
            lambda: not self.run("squeue", "--noheader", "--format=%i", check=False).strip(),
            timeout_s,
            "jobs still queued or running",
        )

    def stop(self) -> None:
        """Cancel remaining jobs, then stop the daemons by process id (slurmd first, munged last)."""
        if self.processes.get("slurmctld") and self.processes["slurmctld"].poll() is None:
            subprocess.run(["scancel", "--full", f"--partition={PARTITION}"], env=self.env, timeout=30, check=False)
            # If jobs linger, stopping slurmd below still ends the job steps it started.
            with suppress(SlurmUnavailableError):
                self.wait_idle(timeout_s=20)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.processes.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
