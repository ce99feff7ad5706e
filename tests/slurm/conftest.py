"""A one-node SLURM cluster for the tests marked ``slurm``: slurm/local_cluster.sh starts munge,
slurmctld and slurmd once per session, with their state in a temporary folder, and stops them at the
end. Without SLURM's Debian packages (make system-deps installs them) these tests skip, saying so;
with CI=true they fail instead, since CI must run them."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "slurm" / "local_cluster.sh"
PROGRAMS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "sinfo")


def unavailable() -> str | None:
    missing = [program for program in PROGRAMS if shutil.which(program) is None]
    if missing:
        return (
            f"SLURM is not installed here ({', '.join(missing)} not found): `make system-deps` installs the "
            "Debian packages slurm-wlm and munge"
        )
    if os.geteuid() != 0:
        return "slurm/local_cluster.sh runs munged, slurmctld and slurmd as root: run these tests as root"
    return None


def free_port_pair() -> int:
    """A port P with P and P + 1 free (slurmctld, slurmd), below Ray's worker range and our own."""
    for port in range(7100, 9990, 7):
        try:
            with socket.socket() as first, socket.socket() as second:
                first.bind(("", port))
                second.bind(("", port + 1))
                return port
        except OSError:
            continue
    raise RuntimeError("no two consecutive free ports between 7100 and 9990")


@dataclass(frozen=True)
class LocalCluster:
    folder: Path
    partition: str = "debug"

    def run(self, *command: str, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(command, capture_output=True, text=True, timeout=60, **kwargs)

    def state(self, job_id: str) -> str:
        return self.run(
            "squeue", "--noheader", "--states=all", "--jobs", job_id, "--format", "%T"
        ).stdout.strip()

    def wait_for(self, job_id: str, states: set[str], timeout_s: float, release: bool = False) -> str:
        """Poll until the job is in one of ``states``. ``release``: start a requeued job in 2 seconds
        rather than the two minutes SLURM holds it back; not in the second of its requeue, whose
        revoked credential slurmd would still refuse ("Job credential revoked")."""
        deadline = time.monotonic() + timeout_s
        state = ""
        while time.monotonic() < deadline:
            state = self.state(job_id)
            if state in states:
                return state
            if release and state == "PENDING":
                self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now+2")
                release = False
            time.sleep(0.2)
        details = self.run("scontrol", "show", "job", job_id).stdout
        raise AssertionError(
            f"job {job_id} is {state or 'unknown'} after {timeout_s} s, not {sorted(states)}\n{details}\n{self.logs()}"
        )

    def jobs(self) -> list[str]:
        return self.run("squeue", "--noheader", "--states=all", "--format", "%i").stdout.split()

    def logs(self) -> str:
        return "\n".join(
            f"--- {path.name}\n{path.read_text()[-2000:]}"
            for path in sorted((self.folder / "log").glob("*.log"))
        )


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory):
    reason = unavailable()
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason} (CI=true: the SLURM tests must run, not skip)")
        pytest.skip(reason)
    folder = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "LVD_SLURM_DIR": str(folder), "LVD_SLURM_PORT": str(free_port_pair())}
    started = subprocess.run([str(SCRIPT), "start"], env=env, capture_output=True, text=True, timeout=180)
    cluster = LocalCluster(folder)
    if started.returncode != 0:
        subprocess.run([str(SCRIPT), "stop"], env=env, capture_output=True, timeout=120)
        pytest.fail(f"slurm/local_cluster.sh start failed: {started.stderr}\n{cluster.logs()}")
    patch = pytest.MonkeyPatch()
    patch.setenv("SLURM_CONF", str(folder / "slurm.conf"))
    try:
        yield cluster
    finally:
        patch.undo()
        subprocess.run([str(SCRIPT), "stop"], env=env, capture_output=True, timeout=120)
