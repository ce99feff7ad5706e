"""One job at a time writes into a run folder: ``OUTPUT_DIR/OWNER.json`` names the job that owns it.

    {"job_id": "4242", "host": "gpu017", "pid": 81234, "since": "2025-01-31T12:00:00+00:00"}

The launchers claim the folder: ``python -m pretrain.launch`` when it queues a SLURM job (a pending
job owns its folder too), the job itself when it starts (``pretrain.launch``'s job, or
``python -m pretrain.preflight`` in the sbatch scripts). A claim is refused while the recorded owner
is another job that is still alive:

- a SLURM job (``job_id`` set): alive while ``squeue`` lists it in a state that is not final
  (pending, running, requeued, suspended, completing ...). The same job id is the same job, restarted
  after a requeue, and takes its folder back.
- a process without SLURM (``job_id`` null): alive while its pid runs, checked on its own host.

What cannot be checked (no ``squeue`` here, another host's pid) counts as alive, and the message names
the file to delete once that owner is known to be gone.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

__all__ = ["OWNER_FILE", "Owner", "OwnershipError", "check_free", "claim", "read_owner"]

OWNER_FILE = "OWNER.json"
# squeue states after which a job never runs again (squeue shows them for MinJobAge seconds).
FINAL_STATES = frozenset(
    {
        "BOOT_FAIL",
        "CANCELLED",
        "COMPLETED",
        "DEADLINE",
        "FAILED",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "REVOKED",
        "TIMEOUT",
    }
)


class OwnershipError(ValueError):
    """The run folder belongs to another live job; the message says which and what to do."""


@dataclass(frozen=True)
class Owner:
    job_id: str | None  # the SLURM job id; None for a process started without SLURM
    host: str
    pid: int | None  # None for a job claimed at submission (it has no process yet)
    since: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    @classmethod
    def current(cls) -> Owner:
        """This process: its SLURM job (SLURM_JOB_ID) when there is one."""
        return cls(os.environ.get("SLURM_JOB_ID"), socket.gethostname(), os.getpid())

    @classmethod
    def submitted(cls, job_id: str) -> Owner:
        """A SLURM job just queued from this host."""
        return cls(job_id, socket.gethostname(), None)

    def describe(self) -> str:
        who = f"SLURM job {self.job_id}" if self.job_id else f"process {self.pid}"
        return f"{who} on {self.host} (since {self.since})"


def read_owner(output_dir: Path) -> Owner | None:
    path = Path(output_dir) / OWNER_FILE
    if not path.is_file():
        return None
    try:
        return Owner(**json.loads(path.read_text()))
    except (ValueError, TypeError) as error:
        raise OwnershipError(f"{path} is not an owner record ({error}); delete it") from error


def slurm_job_state(job_id: str) -> str | None:
    """The job's state as squeue reports it; None once squeue no longer knows the job."""
    result = subprocess.run(
        ["squeue", "--noheader", "--states=all", "--jobs", job_id, "--format", "%T"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    states = result.stdout.split()
    if states:
        return states[0]
    # squeue fails on an id it no longer knows ("Invalid job id specified").
    if result.returncode == 0 or "Invalid job id" in result.stderr:
        return None
    raise OwnershipError(f"squeue cannot tell whether job {job_id} runs: {result.stderr.strip()}")


def _alive(owner: Owner) -> tuple[bool, str]:
    """Whether ``owner`` may still write into the folder, and how that was found out."""
    if owner.job_id:
        if shutil.which("squeue") is None:
            return True, "squeue is not available here to check it"
        state = slurm_job_state(owner.job_id)
        if state is None or state in FINAL_STATES:
            return False, f"squeue: {state or 'gone'}"
        return True, f"squeue: {state}"
    if owner.host != socket.gethostname():
        return True, f"its pid cannot be checked from {socket.gethostname()}"
    if owner.pid is None:
        return False, "no process"
    try:
        os.kill(owner.pid, 0)
    except ProcessLookupError:
        return False, "its process has ended"
    except PermissionError:
        pass  # exists, owned by another user
    return True, "its process runs"


def check_free(output_dir: Path, me: Owner) -> None:
    """Raise OwnershipError when another live job owns ``output_dir``."""
    owner = read_owner(output_dir)
    if owner is None or _same_job(owner, me):
        return
    alive, how = _alive(owner)
    if alive:
        action = (
            f"wait for it or cancel it (scancel {owner.job_id})" if owner.job_id else "wait for it or stop it"
        )
        raise OwnershipError(
            f"output_dir {output_dir} belongs to {owner.describe()}, which is still alive ({how}): {action}, "
            f"or choose another output_dir; if that job is gone, delete {Path(output_dir) / OWNER_FILE}"
        )


def _same_job(owner: Owner, me: Owner) -> bool:
    if owner.job_id or me.job_id:
        return owner.job_id == me.job_id
    return owner.host == me.host and owner.pid == me.pid


def claim(output_dir: Path, me: Owner) -> None:
    """Record ``me`` as the owner of ``output_dir`` (created if needed), unless another live job owns it."""
    check_free(output_dir, me)
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    temporary = folder / f".{OWNER_FILE}.{os.getpid()}.tmp"
    temporary.write_text(json.dumps(asdict(me), indent=2) + "\n")
    os.replace(temporary, folder / OWNER_FILE)
