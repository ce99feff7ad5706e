"""Submit a pretraining run to SLURM through submitit, or run it here, with requeue on time limit and
preemption.

    python -m pretrain.launch --nodes 2 --gpus-per-node 8 --partition gpu --account vision --time 48:00:00 \\
        --config pretrain/configs/v3.yaml data.manifest=runs/lvd/manifests/curated output_dir=runs/pretrain/v3
    python -m pretrain.launch --cluster local --gpus-per-node 2 --config ... KEY=VALUE ...  # processes here
    python -m pretrain.launch --cluster debug --config ... KEY=VALUE ...  # in this process (pdb works)

One task per GPU (one task per node when --gpus-per-node is 0), each running ``pretrain.train``'s
``main`` with the config file and overrides; the tasks find each other through SLURM's variables
(pretrain/distributed.py). Before anything is queued the config, the data sources, the checkpoints
the run starts from or continues, the partition's GPUs and the owner of ``output_dir`` are checked
(pretrain/preflight.py); a problem ends the launcher with ``error: ...`` and exit code 2.

Each job writes its submitit files (``<id>_0_log.out`` ... one log per task, the pickled job) to its own
folder ``OUTPUT_DIR/jobs/<job id>/``. Shortly before the time limit (``--signal-delay-s``) or on
a preemption signal, SLURM signals the tasks (submitit's signal, SIGUSR2). The trainer catches it,
finishes its step, checkpoints that iteration with every rank and stops; the signal then goes on to
submitit's handler, ``TrainingJob.checkpoint()`` asks for a requeue, and the restarted job (same id)
resumes from that checkpoint in ``OUTPUT_DIR/checkpoints``: no step is done twice.
``--max-requeues`` bounds the requeues the job asks for.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import submitit

from pretrain.checkpoint import Checkpointer
from pretrain.config import CheckpointConfig, PretrainConfig
from pretrain.config_io import load_config
from pretrain.ownership import Owner, check_free, claim
from pretrain.preflight import check_run
from pretrain.warm_start import CHECKPOINTS_FOLDER

__all__ = ["JOBS_FOLDER", "TrainingJob", "add_cluster_arguments", "main", "make_executor", "submit"]

logger = logging.getLogger(__name__)

JOBS_FOLDER = "jobs"  # OUTPUT_DIR/jobs/<job id>/: submitit's logs and pickles of one job
CLUSTERS = ("slurm", "local", "debug")
# How long a task other than rank 0 waits, after a stop on submitit's signal, for rank 0's requeue to
# end it (seconds; SLURM ends every task of a requeued job within KillWait).
REQUEUE_WAIT_S = 300


class LaunchError(ValueError):
    """A launch that cannot work (resources, cluster); the message says what to change."""


class RunFailed(RuntimeError):
    """pretrain.train ended with a non-zero exit code; its error is in the task's log."""


@dataclasses.dataclass(frozen=True)
class TrainingJob:
    """What each task of a job runs: ``pretrain.train.main(--config CONFIG OVERRIDES)``.

    submitit pickles it at submission and again at each requeue (``checkpoint``), which counts the
    requeues in ``requeues``. The run state itself lives in ``output_dir``: a restarted task resumes
    from the newest complete checkpoint there, as rerunning ``python -m pretrain.train`` would.
    """

    config: Path | None
    overrides: tuple[str, ...]
    output_dir: Path
    max_requeues: int = 3
    requeues: int = 0

    def __call__(self) -> None:
        from pretrain import train  # imported in the task: torch starts there, not in the launcher

        env = submitit.JobEnvironment()
        if env.cluster == "local" and env.num_tasks > 1:
            # Local tasks have no SLURM variables: hand them torchrun's (pretrain/distributed.py).
            os.environ.update(
                RANK=str(env.global_rank),
                WORLD_SIZE=str(env.num_tasks),
                LOCAL_RANK=str(env.local_rank),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(20000 + int(env.job_id) % 20000),
            )
        owner = job_owner(env)
        # Every task checks, so that all stop at once; rank 0 records the claim.
        check_free(self.output_dir, owner)
        if env.global_rank == 0:
            claim(self.output_dir, owner)
            print(
                f"job {env.job_id} (requeue {self.requeues}) owns {self.output_dir}",
                file=sys.stderr,
                flush=True,
            )
        argv = [*(["--config", str(self.config)] if self.config is not None else []), *self.overrides]
        preemption = submitit.JobEnvironment._usr_sig()  # what submitit's own handler listens to
        code = train.main(argv, stop_signals=(train.STOP_SIGNAL, preemption))
        if code == train.EXIT_STOPPED:
            self._hand_stop_to_submitit(env, preemption)
        if code != 0:
            raise RunFailed(
                f"pretrain.train exited with code {code} (2: bad input, nothing trained; 1: the run "
                "stopped on an error; 3: it stopped on a signal after a checkpoint and was not requeued: "
                "rerun the launcher to continue); its message is in this task's log"
            )

    @staticmethod
    def _hand_stop_to_submitit(env: submitit.JobEnvironment, preemption: signal.Signals) -> None:
        """After the trainer stopped on a signal with its checkpoint written: raise submitit's signal
        again for submitit's handler (restored by now). On rank 0 it calls ``checkpoint()``, requeues
        the job and exits; the other ranks wait for the requeue to end them, as they would have
        without the trainer's stop."""
        if not callable(signal.getsignal(preemption)):
            return  # no submitit handler (debug): the run has stopped, RunFailed says so
        signal.raise_signal(preemption)
        if env.global_rank != 0:
            time.sleep(REQUEUE_WAIT_S)

    def checkpoint(self) -> submitit.helpers.DelayedSubmission | None:
        """Called by submitit on the time-limit or preemption signal: requeue the same job (it resumes
        from the newest checkpoint on disk), unless ``max_requeues`` requeues are done."""
        complete = Checkpointer(Path(self.output_dir) / CHECKPOINTS_FOLDER, CheckpointConfig()).complete()
        resume = complete[-1].name if complete else "iteration 0 (no checkpoint yet)"
        if self.requeues >= self.max_requeues:
            logger.warning(
                "not requeued: %d requeues done, the maximum (--max-requeues); rerun the launcher to "
                "continue from %s",
                self.requeues,
                resume,
            )
            return None
        logger.warning(
            "requeued (%d of %d): the job resumes from %s", self.requeues + 1, self.max_requeues, resume
        )
        return submitit.helpers.DelayedSubmission(dataclasses.replace(self, requeues=self.requeues + 1))


def job_owner(env: submitit.JobEnvironment) -> Owner:
    """The owner record of this job, the same in all its tasks: its SLURM job id, the local
    controller process, or this process (debug)."""
    if env.cluster == "slurm":
        return Owner(env.job_id, socket.gethostname(), os.getpid())
    if env.cluster == "local":
        return Owner(None, socket.gethostname(), int(env.job_id))
    return Owner.current()


# ---------------------------------------------------------------------------------------------------
# Resources


def parse_time(text: str) -> int:
    """SLURM's time formats to whole minutes: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS."""
    days, _, clock = text.strip().rpartition("-")
    try:
        parts = [int(part) for part in clock.split(":")]
        if len(parts) > 3:
            raise ValueError
        if days:  # D-HH[:MM[:SS]]
            hours, minutes, seconds = (parts + [0, 0])[:3]
        elif len(parts) == 3:  # HH:MM:SS
            hours, minutes, seconds = parts
        else:  # MM[:SS]
            hours, (minutes, seconds) = 0, (parts + [0])[:2]
        total = int(days or 0) * 1440 + hours * 60 + minutes + -(-seconds // 60)
    except ValueError:
        raise LaunchError(
            f"--time {text!r} is not a SLURM time: use MINUTES, HH:MM:SS or D-HH:MM:SS"
        ) from None
    if total <= 0:
        raise LaunchError(f"--time {text!r} is not a positive duration")
    return total


def gpus_of(gres: str) -> int:
    """GPUs of a node from sinfo's %G: 'gpu:8', 'gpu:a100:4(S:0-1),gpu:v100:2' -> 6, '(null)' -> 0."""
    return sum(int(count) for count in re.findall(r"gpu(?::[^:,(]+)?:(\d+)", gres))


def partition_resources(partition: str | None) -> tuple[str, int, int]:
    """(partition, its nodes, the most GPUs one of them has), from sinfo; None: the default partition."""
    result = subprocess.run(
        ["sinfo", "--noheader", "--format", "%P|%D|%G"], capture_output=True, text=True, timeout=60
    )
    if result.returncode != 0:
        raise LaunchError(f"sinfo failed: {result.stderr.strip() or result.stdout.strip()}")
    rows = [line.split("|") for line in result.stdout.splitlines() if line.count("|") == 2]
    names = sorted({name.rstrip("*") for name, _, _ in rows})
    if partition is None:
        defaults = [name for name, _, _ in rows if name.endswith("*")]
        if not defaults:
            raise LaunchError(
                f"the cluster has no default partition: choose one with --partition ({', '.join(names)})"
            )
        partition = defaults[0].rstrip("*")
    mine = [(int(nodes), gres) for name, nodes, gres in rows if name.rstrip("*") == partition]
    if not mine:
        raise LaunchError(f"partition {partition!r} does not exist; sinfo lists: {', '.join(names)}")
    return partition, sum(nodes for nodes, _ in mine), max(gpus_of(gres) for _, gres in mine)


def check_resources(args: argparse.Namespace) -> None:
    """The request fits the cluster: nodes and GPUs per node (SLURM), one node (local)."""
    if args.nodes < 1 or args.gpus_per_node < 0 or args.cpus_per_task < 1:
        raise LaunchError("need --nodes >= 1, --gpus-per-node >= 0 and --cpus-per-task >= 1")
    if args.cluster != "slurm":
        if args.nodes > 1:
            raise LaunchError(f"--cluster {args.cluster} runs on this machine only: use --nodes 1")
        if args.cluster == "debug" and args.gpus_per_node > 1:
            raise LaunchError("--cluster debug runs one task in this process: use --gpus-per-node 0 or 1")
        return
    if shutil.which("sbatch") is None:
        raise LaunchError(
            "sbatch not found: run on a SLURM login node, or use --cluster local (processes on this machine)"
        )
    partition, nodes, gpus = partition_resources(args.partition)
    if args.gpus_per_node > gpus:
        raise LaunchError(
            f"--gpus-per-node {args.gpus_per_node} but the nodes of partition {partition!r} have at most "
            f"{gpus} GPUs (sinfo): use --gpus-per-node {gpus} or less, or another --partition"
        )
    if args.nodes > nodes:
        raise LaunchError(
            f"--nodes {args.nodes} but partition {partition!r} has {nodes} nodes (sinfo): use --nodes {nodes} "
            "or less, or another --partition"
        )


# ---------------------------------------------------------------------------------------------------
# Submission


def add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    cluster = parser.add_argument_group("cluster")
    cluster.add_argument(
        "--cluster",
        choices=CLUSTERS,
        default="slurm",
        help="slurm: sbatch; local: processes on this machine; debug: in this process",
    )
    cluster.add_argument("--nodes", type=int, default=1)
    cluster.add_argument(
        "--gpus-per-node", type=int, default=8, help="one task per GPU (0: one CPU task per node)"
    )
    cluster.add_argument(
        "--cpus-per-task", type=int, default=10, help="CPUs of each task (its data-loader workers)"
    )
    cluster.add_argument("--partition", help="SLURM partition (default: the cluster's default partition)")
    cluster.add_argument("--account", help="SLURM account to charge")
    cluster.add_argument("--qos", help="SLURM quality of service")
    cluster.add_argument("--constraint", help="SLURM node features, e.g. h100")
    cluster.add_argument("--mem-gb", type=int, help="memory per node (default: the partition's default)")
    cluster.add_argument("--time", default="48:00:00", help="time limit: MINUTES, HH:MM:SS or D-HH:MM:SS")
    cluster.add_argument(
        "--signal-delay-s",
        type=int,
        default=120,
        help="seconds before the time limit at which the job is signalled to requeue itself",
    )
    cluster.add_argument("--max-requeues", type=int, default=3, help="requeues on time limit or preemption")
    cluster.add_argument("--job-name", default="pretrain")  # fmt: skip


def make_executor(
    args: argparse.Namespace, output_dir: Path, dependency: str | None = None
) -> submitit.AutoExecutor:
    """An executor writing each job's files to OUTPUT_DIR/jobs/<job id>/; ``dependency`` is SLURM's
    (``afterok:ID``: start once job ID has succeeded, cancelled if it fails)."""
    executor = submitit.AutoExecutor(
        folder=Path(output_dir) / JOBS_FOLDER / "%j",
        cluster=args.cluster,
        slurm_max_num_timeout=args.max_requeues,
    )
    # Eligible for requeue by the scheduler as well (PreemptMode=REQUEUE, node failure).
    sbatch_flags: dict[str, str | bool] = {"requeue": True}
    if dependency is not None:
        sbatch_flags.update(dependency=dependency, kill_on_invalid_dep="yes")
    parameters = {
        "name": args.job_name,
        "nodes": args.nodes,
        "tasks_per_node": max(args.gpus_per_node, 1),
        "gpus_per_node": args.gpus_per_node,
        "cpus_per_task": args.cpus_per_task,
        "timeout_min": parse_time(args.time),
        "slurm_signal_delay_s": args.signal_delay_s,
        # One failed task ends the others instead of leaving them in a rendezvous.
        "slurm_srun_args": ["--kill-on-bad-exit=1"],
        "slurm_additional_parameters": sbatch_flags,
    }
    optional = {
        "slurm_partition": args.partition,
        "slurm_account": args.account,
        "slurm_qos": args.qos,
        "slurm_constraint": args.constraint,
        "mem_gb": args.mem_gb,
    }
    parameters.update({name: value for name, value in optional.items() if value is not None})
    executor.update_parameters(**parameters)
    return executor


def submit(executor: submitit.AutoExecutor, job: TrainingJob, cluster: str) -> submitit.Job:
    """Queue ``job``; a SLURM job owns its output folder from now on, pending or running."""
    submitted = executor.submit(job)
    # submitit creates the folder pattern itself before it knows the id; only the job's own is of use.
    with contextlib.suppress(OSError):
        (Path(job.output_dir) / JOBS_FOLDER / "%j").rmdir()
    if cluster == "slurm":
        claim(job.output_dir, Owner.submitted(submitted.job_id))
    return submitted


def watch_hint(job: submitit.Job, output_dir: Path, cluster: str) -> str:
    folder = Path(output_dir) / JOBS_FOLDER / str(job.job_id)
    log = folder / f"{job.job_id}_0_log.out"
    hint = f"job {job.job_id}: task logs in {folder}/, metrics in {output_dir}/metrics.jsonl"
    if cluster == "slurm":
        hint += f"; watch it with: squeue -j {job.job_id}; tail -f {log} {log.with_suffix('.err')}"
    return hint


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pretrain.launch", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    add_cluster_arguments(parser)
    parser.add_argument("--config", type=Path, help="YAML config file (pretrain/configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(PretrainConfig, args.config, args.overrides)
        check_resources(args)
        check_run(config, Owner.current())
        job = TrainingJob(args.config, tuple(args.overrides), Path(config.output_dir), args.max_requeues)
        submitted = submit(make_executor(args, config.output_dir), job, args.cluster)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(watch_hint(submitted, config.output_dir, args.cluster), flush=True)
    if args.cluster == "slurm":
        return 0
    try:
        submitted.results()  # local and debug jobs run now; wait for every task
    except Exception as error:  # submitit re-raises the task's failure, with its log's tail
        print(f"error: the run failed: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    # Run from the module, not __main__, so that the pickled TrainingJob names pretrain.launch.
    from pretrain.launch import main as launch_main

    sys.exit(launch_main())
