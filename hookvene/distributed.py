"""Running past one process with `torch.distributed`: who am I, which share of the work is mine, and gathering.

hookvene schedules nothing itself. A program started by `torchrun --nproc_per_node N ...` (one process per rank)
initialises the process group (`init_from_env()`, or the user's own `torch.distributed.init_process_group`); from
then on the sweeps (`hookvene.experiments`) and `collect_activations` notice it and each rank takes a share:

- sweeps: the engine (`experiments/sweep.py`) plans its forward passes as on one process, deals the passes out
  to the ranks (`assign`, balanced by their cost) and gathers the values with one collective (`sum_disjoint`),
  so every rank returns the full result, computed by the very same batched passes as on one process;
- activation collection: batch b of the prompts goes to rank b % world (`hookvene.collect`).

Every rank must call the same function with the same arguments (as with any collective). Inside `local()` the
process group is ignored: each rank then computes everything itself (for code that splits its own data).

gloo runs on CPU tensors, nccl on CUDA tensors: collectives here move their small tensors to the backend's device
and back.
"""

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.distributed as dist
from torch import Tensor

_LOCAL: ContextVar[bool] = ContextVar("hookvene_distributed_local", default=False)


def is_distributed() -> bool:
    """True when a process group of more than one rank is initialised (and we are not inside `local()`)."""
    return (not _LOCAL.get() and dist.is_available() and dist.is_initialized()
            and dist.get_world_size() > 1)


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Rank 0, or the only process: the one that prints and writes shared files."""
    return rank() == 0


@contextmanager
def local() -> Iterator[None]:
    """Ignore the process group inside the block: every rank runs the whole computation on its own inputs."""
    token = _LOCAL.set(True)
    try:
        yield
    finally:
        _LOCAL.reset(token)


def init_from_env() -> bool:
    """Initialise the default process group when started by `torchrun` (WORLD_SIZE > 1 in the environment) and
    none exists yet: nccl when CUDA is available (each rank on GPU LOCAL_RANK), else gloo. Returns whether a
    process group of several ranks is now running."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return False
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("nccl")
        else:
            dist.init_process_group("gloo")
    return is_distributed()


def comm_device() -> torch.device:
    """Where collective tensors must live: the current GPU for nccl, the CPU for gloo (and others)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def assign(costs: Sequence[int | float], world: int | None = None) -> list[int]:
    """The rank of each work item: longest first, each to the least loaded rank so far (ties: the lowest rank).

    Deterministic, so every rank computes the same assignment without talking to the others. Items keep their
    own batches, so a distributed run does exactly the arithmetic of the single-process run, only split."""
    world = world_size() if world is None else world
    load = [0.0] * world
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += costs[i]
    return owner


def check_same(what: str, **values: int) -> None:
    """Fail with a clear message (instead of hanging or mixing results) when the ranks were not given the same
    work: every rank must call the sweep with the same arguments."""
    mine = torch.tensor(list(values.values()), dtype=torch.long, device=comm_device())
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    if any(not torch.equal(t, mine) for t in every):
        seen = {r: dict(zip(values, t.tolist())) for r, t in enumerate(every)}
        raise ValueError(f"{what} under torch.distributed needs the same arguments on every rank, got {seen}; to "
                         f"run different inputs per rank, wrap the call in hookvene.distributed.local()")


def sum_disjoint(t: Tensor) -> Tensor:
    """Gather a tensor that each rank filled in its own disjoint entries (zeros elsewhere): an all-reduce sum,
    which is exact here since every entry is x + 0 + ... + 0 = x. Returns the full tensor, identical on every
    rank, on `t`'s device."""
    buf = t.to(comm_device())
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.to(t.device)


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_sum(t: Tensor) -> Tensor:
    """The sum of `t` over the ranks (a real reduction: the order of additions is the backend's), on `t`'s
    device, identical on every rank."""
    buf = t.to(comm_device())
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.to(t.device)


def gather_objects(obj: object) -> list[object]:
    """Every rank's `obj` (small picklable values: shapes, counts), in rank order."""
    every: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(every, obj)
    return every
