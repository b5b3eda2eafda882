"""One run in several processes: set-up from torchrun's or SLURM's environment, reductions, rank-0 writing.

A run started by ``torchrun --nproc_per_node=N -m alr.train ...`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set)
or as the N tasks of a SLURM job step (Hydra's submitit launcher with ``hydra.launcher.tasks_per_node=N``,
or ``srun -n N``: :func:`setup` derives the same variables from SLURM's own) trains with
``DistributedDataParallel``: NCCL on CUDA (process ``i`` on ``cuda:LOCAL_RANK``), gloo on the CPU.
Without either, :func:`setup` returns a one-process :class:`World` whose reductions do nothing. A process group
the caller initialised is joined whatever its size: one process in a group of one trains as each of several
does (DDP, reductions), which is how a single GPU checks that path.

What keeps N processes equal to one process with the same global batch:

- ``trainer.batch_size`` is the global batch; each process takes ``batch_size / N`` (the data sets shard it).
- The backbone is wrapped in DDP (gradients averaged, BN buffers broadcast from rank 0 at each forward);
  the method's own parameters (ALR's ``S``) get their gradients averaged in :meth:`World.average_gradients`
  inside the trainer's one ``update``, so they end every step identical on every rank.
- Counts are summed across ranks (:func:`all_reduce_sum`): ALR's running ``acc_train``, the epoch's
  training accuracy and losses, and the validation counts, each validation image counted once.
- Only rank 0 writes the run folder, ``last.pt``, the logs and W&B; a stop signal seen by any rank makes
  every rank stop at the same step (checked every ``trainer.log_every`` steps, where the trainer syncs anyway).
"""

from __future__ import annotations

import atexit
import hashlib
import os
import re
import socket
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from alr.errors import RunError


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum ``tensor`` over all processes in place (nothing in a single process); returns it."""
    if initialized():
        dist.all_reduce(tensor)
    return tensor


def summed_means(sums: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    """Per-rank running sums (one row per count) and their counts, summed over every rank in one all-reduce:
    each row's mean (0 where its count is 0) and the counts. What a method's ``end_epoch`` makes of its partial
    sums (OLS's per-class softmax, PS-KD's per-sample predictions, ALR's running-mean residual labels)."""
    total = all_reduce_sum(torch.cat([sums.reshape(-1), counts]))
    sums, counts = total[: sums.numel()].view_as(sums), total[sums.numel() :]
    return sums / counts.clamp_min(1).unsqueeze(1), counts


def is_main() -> bool:
    """True in rank 0, or when not distributed: the one process that writes files."""
    return not initialized() or dist.get_rank() == 0


@dataclass(frozen=True)
class World:
    """This process's place among the run's processes, and its device."""

    device: torch.device
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Several processes, or one in an initialised process group: the backbone trains in DDP and the
        reductions run (in a group of one they change nothing, but take the path several processes take)."""
        return self.size > 1 or initialized()

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any rank (one small all-reduce)."""
        if not self.distributed:
            return flag
        t = torch.tensor([int(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj``, in rank order, on rank 0 (``None`` on the others; ``[obj]`` in one process).

        The way to save state that differs between ranks (an epoch's partial sums, RNG states): a checkpoint
        holds the list, and on resume each rank takes its own entry back with :meth:`own_share`. Tensors are
        moved to the CPU first, so rank 0 can hold another GPU's. A collective: every rank calls it.
        """
        obj = _to_cpu(obj)
        if not self.distributed:
            return [obj]
        out: list[Any] | None = [None] * self.size if self.main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def own_share(self, shares: list[Any]) -> Any | None:
        """This rank's entry of a list :meth:`gather` saved; ``None`` where another process count saved it
        (the owner of the state then decides how to merge the entries)."""
        return shares[self.rank] if len(shares) == self.size else None

    def restore_sums(self, sums: dict[str, Tensor], shares: list[dict[str, Tensor]]) -> bool:
        """Copy into ``sums`` (in place) this rank's entry of per-rank running sums :meth:`gather` saved; whether
        it was this rank's own. Saved by another process count, rank 0 takes the entries' total and the other
        ranks zeros, so a later sum over the ranks is the same (up to the order of float additions)."""
        own = self.own_share(shares)
        for name, tensor in sums.items():
            if own is not None:
                value = own[name]
            elif self.main:
                value = torch.stack([share[name] for share in shares]).sum(dim=0)
            else:
                value = torch.zeros_like(tensor)
            tensor.copy_(value)
        return own is not None

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def broadcast(self, module: nn.Module) -> None:
        """Copy rank 0's parameters and buffers to every rank."""
        if self.distributed:
            for t in [*module.parameters(), *module.buffers()]:
                dist.broadcast(t.data, src=0)

    def broadcast_buffers(self, module: nn.Module) -> None:
        """Copy rank 0's buffers (BN running statistics) to every rank: evaluation then uses one model."""
        if self.distributed:
            for t in module.buffers():
                dist.broadcast(t.data, src=0)

    def average_gradients(self, params: list[nn.Parameter]) -> None:
        """Average the gradients of ``params`` (those that have one) over the ranks, in one all-reduce."""
        grads = [p.grad for p in params if p.grad is not None]
        if not self.distributed or not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.size
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def identical(self, *modules: nn.Module) -> bool:
        """Whether ``modules`` hold bit-identical parameters and buffers on every rank (a hash of each rank's bytes)."""
        if not self.distributed:
            return True
        digest = hashlib.sha256()
        for module in modules:
            for t in module.state_dict().values():
                if isinstance(t, Tensor):
                    digest.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        digests: list[str | None] = [None] * self.size
        dist.all_gather_object(digests, digest.hexdigest())
        return len(set(digests)) == 1

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` in ``DistributedDataParallel`` when :attr:`distributed` (a group of one too), else itself."""
        if not self.distributed:
            return model
        return DistributedDataParallel(model, device_ids=[self.device] if self.device.type == "cuda" else None)


def _to_cpu(obj: Any) -> Any:
    """``obj`` with every tensor in it (in dicts, lists and tuples) moved to the CPU."""
    if isinstance(obj, Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _slurm_step_tasks() -> int:
    """How many tasks the SLURM job step of this process has (0 outside a step).

    Not ``SLURM_NTASKS``: that is the job's, which a batch script of one process (``sbatch --ntasks=N``)
    has too. Only a submitit job, always one ``srun`` step of all the job's tasks, may fall back on it.
    """
    env = os.environ
    if "SLURM_PROCID" not in env:
        return 0
    if "SLURM_STEP_NUM_TASKS" in env:
        return int(env["SLURM_STEP_NUM_TASKS"])
    return int(env.get("SLURM_NTASKS", "1")) if env.get("SUBMITIT_EXECUTOR") == "slurm" else 1


_HOST = r"(?:[^,\[\]]+|\[[0-9,-]+\])+"  # a name, or a name with bracket groups: dgx-a[012-013]


def expand_hostlist(hostlist: str) -> list[str]:
    """SLURM's compressed host list (``SLURM_STEP_NODELIST``) as host names, in SLURM's order.

    ``dgx-a[012-013]`` is dgx-a012, dgx-a013 (a range keeps its first number's zero padding);
    ``gpu[7-8,10],cpu01`` is gpu7, gpu8, gpu10, cpu01; several bracket groups in one name expand left to right
    (``r[1-2]n[1-2]``: r1n1, r1n2, r2n1, r2n2). Written here rather than taken from submitit, which a GPU node
    that runs ``srun`` by hand may lack. Raises ``ValueError`` on anything else.
    """
    if not re.fullmatch(rf"{_HOST}(?:,{_HOST})*", hostlist):
        raise ValueError(f"{hostlist!r} is not a SLURM host list (such as node[1-3,7],login01)")
    hosts = []
    for host in re.findall(_HOST, hostlist):
        names = [""]
        for literal, group in re.findall(r"([^\[]+)|\[([^\]]*)\]", host):
            names = [name + part for name in names for part in ([literal] if literal else _expand_group(group))]
        hosts.extend(names)
    return hosts


def _expand_group(group: str) -> list[str]:
    """The numbers of one bracket group, ``07-09,12`` → 07, 08, 09, 12."""
    out = []
    for item in group.split(","):
        first, dash, last = item.partition("-")
        last = last if dash else first
        if not (first.isdigit() and last.isdigit() and int(first) <= int(last)):
            raise ValueError(f"[{group}] is not a range of SLURM's host list (such as [01-04,07])")
        out += [f"{n:0{len(first)}d}" for n in range(int(first), int(last) + 1)]
    return out


def _export_slurm_environment() -> None:
    """In a SLURM job step of several tasks, set torch's RANK, WORLD_SIZE, MASTER_ADDR... from SLURM's own.

    SLURM hands the submitting shell's environment on to the job, so torch's variables found here may be
    stale (a ``MASTER_PORT`` exported for another run): they are overwritten, unless torchrun set them
    (``srun torchrun ...``: torchrun, not SLURM, started this process). Either way every task ends up in one
    process group; N tasks never train N copies of the run into one folder.
    """
    env = os.environ
    if "TORCHELASTIC_RUN_ID" in env:
        return
    tasks = _slurm_step_tasks()
    if tasks == 1 and int(env.get("WORLD_SIZE", "1")) > 1:
        raise RunError(
            f"WORLD_SIZE={env['WORLD_SIZE']} is set, but this process is the only task of its SLURM job step "
            "and torchrun did not start it: the variable came from the shell that submitted the job. Unset "
            "WORLD_SIZE, RANK, MASTER_ADDR and MASTER_PORT there, or run N tasks (hydra.launcher.tasks_per_node=N)."
        )
    if tasks <= 1:
        return
    nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")  # the job's where the step's is not set
    try:
        master = expand_hostlist(nodes)[0] if nodes else socket.gethostname()
    except ValueError as e:
        raise RunError(f"SLURM's node list: {e}. Set MASTER_ADDR and start the tasks with torchrun instead.") from e
    # One port per job step, away from torchrun's default 29500: a requeued job reuses its own.
    port = 20000 + (int(env["SLURM_JOB_ID"]) * 16 + int(env.get("SLURM_STEP_ID", "0"))) % 40000
    derived = {
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": str(tasks),
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "MASTER_ADDR": master,
        "MASTER_PORT": str(port),
    }
    stale = [f"{k}={env[k]}" for k in TORCHRUN_VARIABLES if k in env and env[k] != derived.get(k)]
    if stale and derived["RANK"] == "0":
        print(f"[alr] SLURM job step of {tasks} tasks: ignoring {', '.join(stale)} (from the submitting shell)")
    env.pop("LOCAL_WORLD_SIZE", None)  # not derived (nothing here reads it): not left stale either
    env.update(derived)


def _device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"trainer.device={name} but no CUDA device is visible. Use trainer.device=cpu or auto.")
    if name == "cuda":  # one GPU per local process; where SLURM binds one GPU per task, it is device 0
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device(name)


def setup(device: str) -> World:
    """The :class:`World` of this process; initialises the process group once when there are several, and
    joins one already initialised (of any size) with its rank and size."""
    _export_slurm_environment()
    if initialized():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        return World(_device(device, local_rank), dist.get_rank(), dist.get_world_size(), local_rank)
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World(_device(device, 0))
    if missing := [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]:
        raise RunError(
            f"WORLD_SIZE={size} is set but {', '.join(missing)} not: start the processes with torchrun "
            "(torchrun --nproc_per_node=N -m alr.train ...) or as SLURM tasks, or unset WORLD_SIZE to train in one."
        )
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    world = World(_device(device, local_rank), rank, size, local_rank)
    if world.device.type == "cuda":
        torch.cuda.set_device(world.device)
    dist.init_process_group("nccl" if world.device.type == "cuda" else "gloo")
    atexit.register(dist.destroy_process_group)
    return world
