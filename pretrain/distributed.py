"""Where this process sits in a multi-process run, and how the networks are shared between processes.

Environment detection, in this order (the first that applies wins):

1. torchrun: any of RANK, WORLD_SIZE, LOCAL_RANK is set; then all of RANK, WORLD_SIZE, LOCAL_RANK,
   MASTER_ADDR and MASTER_PORT must be.
2. SLURM (``srun``, one task per GPU): SLURM_PROCID is set; then SLURM_NTASKS and SLURM_LOCALID must
   be. The master is MASTER_ADDR if set, else the first host of SLURM_NODELIST; the port is MASTER_PORT
   if set, else 20000 + SLURM_JOB_ID mod 20000 (two jobs sharing a node do not collide).
3. A single process.

torchrun comes first because a torchrun inside a SLURM allocation also sees SLURM variables that
describe the allocation, not its workers (the public DINOv2 code checks SLURM first and breaks there).
A partial environment is an error that names the missing variables, never a silent single-process run.

``parallelize`` wraps the meta-architecture for DDP (gradients all-reduced during the backward; the
teacher EMA then stays identical on every rank) or shards it with FSDP2 ``fully_shard``, per block
then per network then the root.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import threading
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
from torch.nn.parallel import DistributedDataParallel

from pretrain.losses._dist import all_reduce_max

if TYPE_CHECKING:
    from pretrain.meta_arch import SSLMetaArch

__all__ = [
    "STOP_SIGNAL",
    "DistEnv",
    "RankDivergenceError",
    "StopSignal",
    "all_gather_objects",
    "broadcast_object",
    "detect_environment",
    "first_slurm_host",
    "ignore_stop_signals",
    "init_process_group",
    "parallelize",
    "process_seed",
    "state_checksum",
]

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
SLURM_VARIABLES = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")
DEFAULT_PORT = 29500
# Long enough for rank 0 to write a large checkpoint while the others wait in the next collective.
PROCESS_GROUP_TIMEOUT = timedelta(minutes=30)


class RankDivergenceError(RuntimeError):
    """Replicated state (the DDP teacher) differs between ranks: gradients were not reduced identically."""


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the run; ``launcher`` says which environment it was read from."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = DEFAULT_PORT
    launcher: Literal["torchrun", "slurm", "single"] = "single"

    @property
    def is_writer(self) -> bool:
        """Only rank 0 writes metrics, configs, checkpoints and exports."""
        return self.rank == 0


def _integers(environ: Mapping[str, str], names: tuple[str, ...]) -> dict[str, int]:
    values: dict[str, int] = {}
    for name in names:
        try:
            values[name] = int(environ[name])
        except ValueError:
            raise ValueError(f"environment variable {name}={environ[name]!r} is not an integer") from None
    return values


def _missing(environ: Mapping[str, str], names: tuple[str, ...], launcher: str, hint: str) -> None:
    missing = [name for name in names if name not in environ]
    if missing:
        present = [name for name in names if name in environ]
        raise ValueError(
            f"incomplete {launcher} environment: {', '.join(present)} set but {', '.join(missing)} missing; "
            f"{hint}"
        )


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list: 'gpu[03-05,9],cpu1' -> 'gpu03', 'a1,a2' -> 'a1'."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if match is None:
        raise ValueError(f"cannot read a host name from SLURM_NODELIST={nodelist!r}; set MASTER_ADDR")
    prefix, ranges = match.groups()
    if ranges is None:
        return prefix
    return prefix + re.split(r"[-,]", ranges, maxsplit=1)[0]


def detect_environment(environ: Mapping[str, str] | None = None) -> DistEnv:
    """torchrun variables, then SLURM's, then a single process (see the module docstring)."""
    environ = os.environ if environ is None else environ
    if any(name in environ for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
        _missing(
            environ, TORCHRUN_VARIABLES, "torchrun", "launch with torchrun, or unset them for one process"
        )
        values = _integers(environ, ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"))
        env = DistEnv(
            values["RANK"],
            values["WORLD_SIZE"],
            values["LOCAL_RANK"],
            environ["MASTER_ADDR"],
            values["MASTER_PORT"],
            "torchrun",
        )
    elif "SLURM_PROCID" in environ:
        _missing(environ, SLURM_VARIABLES, "SLURM", "launch one task per process with srun")
        if "MASTER_ADDR" not in environ and "SLURM_NODELIST" not in environ:
            raise ValueError("SLURM environment without SLURM_NODELIST or MASTER_ADDR: set MASTER_ADDR")
        values = _integers(environ, SLURM_VARIABLES)
        if "MASTER_PORT" in environ:
            port = _integers(environ, ("MASTER_PORT",))["MASTER_PORT"]
        elif "SLURM_JOB_ID" in environ:
            port = 20000 + _integers(environ, ("SLURM_JOB_ID",))["SLURM_JOB_ID"] % 20000
        else:
            port = DEFAULT_PORT
        env = DistEnv(
            values["SLURM_PROCID"],
            values["SLURM_NTASKS"],
            values["SLURM_LOCALID"],
            environ.get("MASTER_ADDR") or first_slurm_host(environ["SLURM_NODELIST"]),
            port,
            "slurm",
        )
    else:
        return DistEnv()
    if not 0 <= env.rank < env.world_size or env.local_rank < 0:
        raise ValueError(
            f"{env.launcher} environment has rank {env.rank}, world size {env.world_size} and local rank "
            f"{env.local_rank}: need 0 <= rank < world size and local rank >= 0"
        )
    return env


def init_process_group(env: DistEnv, device: torch.device, parallelism: str) -> bool:
    """Join the process group when there is more than one process, or for FSDP (which needs a device
    mesh even alone); gloo on CPU, NCCL on CUDA. Returns whether a group was initialised."""
    if env.world_size == 1 and parallelism != "fsdp":
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL collectives of Python objects use the current device
    if env.world_size == 1:
        # One process needs no rendezvous: an in-memory store instead of a port that may be taken.
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        return True
    host = f"[{env.master_addr}]" if ":" in env.master_addr else env.master_addr
    dist.init_process_group(
        backend,
        init_method=f"tcp://{host}:{env.master_port}",
        rank=env.rank,
        world_size=env.world_size,
        timeout=PROCESS_GROUP_TIMEOUT,
        device_id=device if device.type == "cuda" else None,
    )
    return True


def _is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_gather_objects(value: Any) -> list[Any]:
    """``value`` of every rank, in rank order ([value] in a single process)."""
    if not _is_distributed():
        return [value]
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def broadcast_object(value: Any) -> Any:
    """Rank 0's ``value`` on every rank, so that all ranks act on one decision."""
    if not _is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def process_seed(seed: int, rank: int, iteration: int) -> int:
    """Seed of a rank's own randomness (stochastic depth, RoPE jitter) from an iteration on: ranks draw
    different noise, and the stream is reproducible from (seed, rank, iteration) alone."""
    return int(np.random.SeedSequence([seed, rank, iteration]).generate_state(1, np.uint64)[0] % 2**63)


def state_checksum(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict (names and exact bytes): equal checksums = identical weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _shard_networks(networks: nn.ModuleDict | nn.Module, mesh: Any) -> None:
    """fully_shard each transformer block, then each network; ``forward_features`` (what the
    meta-architecture calls instead of ``forward``) and ``get_last_self_attention`` (the attention
    pictures of pretrain/eval) get FSDP's unshard/reshard hooks too."""
    modules = networks.values() if isinstance(networks, nn.ModuleDict) else [networks]
    for module in modules:
        for block in getattr(module, "blocks", []):
            fully_shard(block, mesh=mesh)
        fully_shard(module, mesh=mesh)
        for method in ("forward_features", "get_last_self_attention"):
            if hasattr(module, method):
                register_fsdp_forward_method(module, method)


def parallelize(model: SSLMetaArch, parallelism: str, device: torch.device) -> nn.Module:
    """The module to call for a training forward: ``model`` itself in one process, a DDP wrapper, or
    ``model`` sharded in place by FSDP2. Call before building the optimizer (FSDP2 replaces parameters).

    DDP wraps the whole meta-architecture: its only trainable parameters are the student's, so DDP
    all-reduces exactly the student's gradients, in one forward per step (a head used for both DINO
    and iBOT contributes one reduced gradient). Buffers (the loss centers) are not broadcast before
    each forward: the losses already all-reduce them, and every rank updates them identically.

    FSDP2 warns that a wrapped backbone returns views (the CLS and patch slices of ``Features``);
    nothing modifies them in place, which is the case it warns about, so that warning is silenced.
    """
    if not _is_distributed():
        return model
    if parallelism == "ddp":
        device_ids = [device] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids, forward_sync_buffers=False)
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    _shard_networks(model.student, mesh)
    _shard_networks(model.teacher, mesh)
    if model.gram_teacher is not None:
        _shard_networks(model.gram_teacher, mesh)
    if model.distill_teacher is not None:
        _shard_networks(model.distill_teacher, mesh)
    fully_shard(model, mesh=mesh)
    return model


# SLURM's --signal (slurm/pretrain_job.sh forwards it to every task) asks a run to stop before its time
# limit; the trainer checkpoints the current iteration and exits (pretrain.train.EXIT_STOPPED).
STOP_SIGNAL = signal.SIGUSR1


def ignore_stop_signals(worker_id: int = 0) -> None:
    """In data-loader workers: a stop signal sent to the whole process group must neither kill them nor
    reach a handler they inherited (submitit's would requeue the job from a worker). STOP_SIGNAL and
    SIGUSR2, submitit's default signal; the training process alone acts on them."""
    for signum in (STOP_SIGNAL, signal.SIGUSR2):
        signal.signal(signum, signal.SIG_IGN)


class StopSignal:
    """Records a stop signal while training, to stop at the next step boundary rather than mid-step.

    Ranks receive the signal at different moments (or one rank only), so after each step they agree by
    an all-reduce of the flag: all stop after the same iteration and take part in the same checkpoint.
    The handlers are installed only in the main thread (Python's rule) and the previous ones restored.
    ``signals``: STOP_SIGNAL, and for a submitit job also submitit's own time-limit and preemption
    signal (pretrain/launch.py hands it back to submitit once the checkpoint is written)."""

    def __init__(self, signals: Sequence[signal.Signals] = (STOP_SIGNAL,)) -> None:
        self.signals = tuple(dict.fromkeys(signals))
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, Any] = {}

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            self._previous = {signum: signal.signal(signum, self._record) for signum in self.signals}
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, previous in self._previous.items():
            if previous is not None:
                signal.signal(signum, previous)

    def _record(self, signum: int, frame: object) -> None:
        self.received = signal.Signals(signum)

    def agreed(self, device: torch.device) -> bool:
        """Whether any rank has received a stop signal (a collective: every rank must call it)."""
        if not _is_distributed():  # no tensor, so no device sync in the step loop of a single process
            return self.received is not None
        return bool(all_reduce_max(torch.tensor([float(self.received is not None)], device=device)).item())
