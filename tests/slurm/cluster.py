"""A one-node SLURM cluster in a temporary folder, for ``make test-slurm``.

Debian's ``slurm-wlm`` with ``munge`` for authentication, and ``slurmdbd`` on ``mariadb-server`` for the
accounting that submitit polls (``sacct``). Every daemon runs in the foreground as a child of this
process, its configuration, state, socket and log in the folder; :meth:`Cluster.stop` cancels the
cluster's jobs, then ends exactly the processes :meth:`Cluster.start` started, by PID, and nothing else on
the machine. Needs root (the daemons and ``apt-get``), and no systemd.

The configuration is made for short tests: a requeued job may start again 10 s after its requeue
(``cred_expire``); partition ``main`` is pre-empted by partition ``high`` (higher ``PriorityTier``,
``PreemptMode=REQUEUE``): the pre-empted job gets SIGTERM, 20 s of grace, then is requeued;
``KillOnBadExit=1`` ends a job step as soon as one task exits non-zero, which is what a rank that leaves
before rank 0 has requeued the job meets. The node declares 4 CPUs whatever the machine has, so that a
2-task job leaves room beside it, and a 4-CPU job in ``high`` must pre-empt it.

    python tests/slurm/cluster.py start /tmp/slurm    # prints the SLURM_CONF to export
    python tests/slurm/cluster.py stop /tmp/slurm
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

PACKAGES = ["slurm-wlm", "munge", "slurmdbd", "mariadb-server"]
PROGRAMS = ["munged", "mungekey", "mariadbd", "mariadb-install-db", "slurmdbd", "slurmctld", "slurmd", "sbatch"]
SBIN = ["/usr/sbin", "/usr/bin"]  # where Debian puts the daemons (root's PATH has them; others' may not)
CPUS = 4
GRACE_S = 20  # pre-emption grace: the pre-empted job's SIGTERM comes this long before it is killed


class ClusterError(RuntimeError):
    """The cluster could not be installed or started; the message names the log to read."""


def _which(program: str) -> str | None:
    return shutil.which(program) or shutil.which(program, path=os.pathsep.join(SBIN))


def install() -> None:
    """Install Debian's SLURM, munge and MariaDB packages if a program of theirs is missing (root, apt)."""
    missing = [p for p in PROGRAMS if _which(p) is None]
    if not missing:
        return
    if os.geteuid() != 0:
        raise ClusterError(
            f"{', '.join(missing)} not installed and not root: run as root, or `apt-get install {' '.join(PACKAGES)}`"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    print(f"[slurm] installing {' '.join(PACKAGES)} (missing: {', '.join(missing)})", flush=True)
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stdout + proc.stderr)[-3000:]
            raise ClusterError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{tail}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _lines(**values: object) -> str:
    return "".join(f"{key}={value}\n" for key, value in values.items())


class Cluster:
    """The daemons of a one-node cluster whose files live in ``root``."""

    NAMES = ("munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd")

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.conf = self.root / "etc" / "slurm.conf"
        self.log = self.root / "log"
        self.pids: dict[str, int] = {}
        self.children: dict[str, subprocess.Popen] = {}
        self.host = socket.gethostname().split(".")[0]

    @property
    def env(self) -> dict[str, str]:
        """What a client (``sbatch``, ``sacct``, a job's ``scontrol requeue``) needs to find this cluster."""
        path = os.pathsep.join([os.environ.get("PATH", ""), *SBIN])
        return {"SLURM_CONF": str(self.conf), "PATH": path}

    def _write_configs(self) -> None:
        for sub in ("etc", "log", "munge", "db", "ctld", "spool"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.ports = {k: _free_port() for k in ("mysql", "dbd", "ctld", "d")}
        self.munge_socket = self.root / "munge" / "munge.socket"
        auth = f"socket={self.munge_socket}"
        self.conf.write_text(
            _lines(
                ClusterName="alrtest",
                SlurmctldHost=self.host,
                SlurmUser="root",
                SlurmdUser="root",
                AuthType="auth/munge",
                AuthInfo=f"{auth},cred_expire=10",  # also how long a requeued job waits to start again
                CredType="cred/munge",
                SlurmctldPort=self.ports["ctld"],
                SlurmdPort=self.ports["d"],
                StateSaveLocation=self.root / "ctld",
                SlurmdSpoolDir=self.root / "spool",
                SlurmctldPidFile=self.root / "slurmctld.pid",
                SlurmdPidFile=self.root / "slurmd.pid",
                SlurmctldLogFile=self.log / "slurmctld.log",
                SlurmdLogFile=self.log / "slurmd.log",
                ProctrackType="proctrack/linuxproc",
                TaskPlugin="task/none",
                SelectType="select/cons_tres",
                SelectTypeParameters="CR_CPU",
                SlurmdParameters="config_overrides",  # the declared CPUs, whatever the machine has
                SchedulerType="sched/builtin",
                SchedulerParameters="sched_interval=2",
                MpiDefault="none",
                JobRequeue=1,
                KillOnBadExit=1,
                KillWait=10,
                MinJobAge=30,
                ReturnToService=2,
                InactiveLimit=0,
                JobAcctGatherType="jobacct_gather/none",
                JobCompType="jobcomp/none",
                AccountingStorageType="accounting_storage/slurmdbd",
                AccountingStorageHost=self.host,
                AccountingStoragePort=self.ports["dbd"],
                AccountingStoragePass=self.munge_socket,  # with slurmdbd: the munge socket to sign with
                PreemptType="preempt/partition_prio",
                PreemptMode="REQUEUE",
            )
            + f"NodeName={self.host} CPUs={CPUS} RealMemory=8000 State=UNKNOWN\n"
            + f"PartitionName=main Nodes={self.host} Default=YES MaxTime=INFINITE State=UP PriorityTier=1 "
            + f"PreemptMode=REQUEUE GraceTime={GRACE_S}\n"
            + f"PartitionName=high Nodes={self.host} MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF\n"
        )
        dbd = self.root / "etc" / "slurmdbd.conf"  # beside slurm.conf: slurmdbd looks for it there
        dbd.write_text(
            _lines(
                AuthType="auth/munge",
                AuthInfo=auth,
                DbdHost=self.host,
                DbdPort=self.ports["dbd"],
                SlurmUser="root",
                StorageType="accounting_storage/mysql",
                StorageHost="127.0.0.1",
                StoragePort=self.ports["mysql"],
                StorageUser="root",
                StorageLoc="slurm_acct_db",
                PidFile=self.root / "slurmdbd.pid",
                LogFile=self.log / "slurmdbd.log",
            )
        )
        dbd.chmod(0o600)  # slurmdbd refuses a config others can read (it may hold a password)

    def _spawn(self, name: str, cmd: list[str]) -> None:
        """Start ``cmd`` in the foreground, in a session of its own (a Ctrl-C of the tests does not reach it)."""
        env = {**os.environ, **self.env}
        with (self.log / f"{name}.out").open("ab") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.children[name] = proc
        self.pids[name] = proc.pid
        (self.root / "daemons.json").write_text(json.dumps(self.pids))

    def _wait(self, name: str, ready: Callable[[], bool], timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready():
            child = self.children[name]
            if child.poll() is not None:
                raise ClusterError(f"{name} exited ({child.returncode}) on start: see {self.log}/{name}*")
            if time.monotonic() > deadline:
                raise ClusterError(f"{name} not ready after {timeout_s:.0f} s: see {self.log}/{name}*")
            time.sleep(0.2)

    def _listening(self, port: int) -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    def _client(self, *cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), env={**os.environ, **self.env}, capture_output=True, text=True, timeout=30)

    def start(self) -> None:
        """Install what is missing, write the configs, start the five daemons and wait for an idle node.

        On failure the daemons already started are stopped before the error is raised."""
        if os.geteuid() != 0:
            raise ClusterError("the SLURM test cluster runs its daemons as root: run make test-slurm as root")
        install()
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        self._write_configs()
        key = self.root / "munge" / "munge.key"
        subprocess.run([_which("mungekey"), "--create", f"--keyfile={key}"], check=True, capture_output=True)
        self._spawn(
            "munged",
            [_which("munged"), "--foreground", "--force", f"--socket={self.munge_socket}", f"--key-file={key}",
             f"--pid-file={self.root / 'munge' / 'munged.pid'}", f"--log-file={self.log / 'munged.log'}",
             f"--seed-file={self.root / 'munge' / 'munged.seed'}"],
        )  # fmt: skip
        self._wait("munged", self.munge_socket.exists)

        datadir = self.root / "db"
        subprocess.run(
            [_which("mariadb-install-db"), "--no-defaults", f"--datadir={datadir}", "--user=root",
             "--auth-root-authentication-method=normal", "--skip-test-db"],
            check=True, capture_output=True,
        )  # fmt: skip
        self._spawn(
            "mariadbd",
            [_which("mariadbd"), "--no-defaults", f"--datadir={datadir}", "--user=root",
             f"--socket={self.root / 'mysql.sock'}", f"--port={self.ports['mysql']}", "--bind-address=127.0.0.1",
             "--skip-grant-tables",  # a throwaway database on the loopback only: no accounts to set up
             "--innodb-use-native-aio=0", "--innodb-buffer-pool-size=64M", f"--pid-file={self.root / 'mysql.pid'}"],
        )  # fmt: skip
        self._wait("mariadbd", lambda: self._listening(self.ports["mysql"]))
        self._spawn("slurmdbd", [_which("slurmdbd"), "-D"])
        self._wait("slurmdbd", lambda: self._listening(self.ports["dbd"]))
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i"])
        self._wait("slurmctld", lambda: self._client("scontrol", "ping").stdout.count("UP") > 0)
        self._spawn("slurmd", [_which("slurmd"), "-D"])
        self._wait("slurmd", lambda: self._client("sinfo", "-h", "-o", "%t").stdout.split()[:1] == ["idle"])

    def cancel_jobs(self, timeout_s: float = 60) -> None:
        """Cancel every job of this cluster and wait for their processes to end."""
        jobs = self._client("squeue", "--noheader", "--format=%A").stdout.split()
        if jobs:
            self._client("scancel", *jobs)
        deadline = time.monotonic() + timeout_s
        while (self._client("squeue", "--noheader").stdout.strip() or self._steps()) and time.monotonic() < deadline:
            time.sleep(0.5)

    def _steps(self) -> list[int]:
        """The job-step daemons (``slurmstepd``) of this cluster's slurmd: those whose SLURM_CONF is ours."""
        mine = f"SLURM_CONF={self.conf}".encode()
        steps = []
        for proc in Path("/proc").iterdir():
            with contextlib.suppress(OSError):
                if (proc / "cmdline").read_bytes().startswith(b"slurmstepd") and mine in (
                    proc / "environ"
                ).read_bytes().split(b"\0"):
                    steps.append(int(proc.name))
        return steps

    def stop(self, timeout_s: float = 30) -> None:
        """End the daemons :meth:`start` started (SIGTERM, then SIGKILL after ``timeout_s``), newest first.

        The jobs still running are cancelled first, while slurmctld and slurmd are up to end them; a job-step
        daemon of this cluster's slurmd still there after that is killed, so nothing is left running."""
        pids = self.pids or json.loads((self.root / "daemons.json").read_text())
        if _is(pids.get("slurmctld", 0), "slurmctld") and _is(pids.get("slurmd", 0), "slurmd"):
            self.cancel_jobs()
        for name in reversed(self.NAMES):
            pid = pids.get(name)
            if pid is None or not _is(pid, name):
                continue
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout_s
            while _is(pid, name) and time.monotonic() < deadline:
                time.sleep(0.2)
            if _is(pid, name):
                os.kill(pid, signal.SIGKILL)
            if name in self.children:
                self.children[name].wait(timeout=10)  # reap our child
            if name == "slurmd":
                for step in self._steps():
                    os.kill(step, signal.SIGKILL)
        self.pids = {}


def _is(pid: int, name: str) -> bool:
    """Whether ``pid`` is still the daemon ``name`` (and not a process that got its number since)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return os.path.basename(cmdline.decode()) == name and state != "Z"


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("start", "stop"):
        print(__doc__.rsplit("\n\n", 1)[1], file=sys.stderr)
        return 2
    cluster = Cluster(Path(argv[1]))
    if argv[0] == "start":
        cluster.start()
        print(f"export SLURM_CONF={cluster.conf}")
    else:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
