"""One run in several processes: set-up from torchrun's or SLURM's environment, reductions, rank-0 writing.

A run started by ``torchrun --nproc_per_node=N -m alr.train ...`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set)
or as the N tasks of a SLURM job through Hydra's submitit launcher (``hydra.launcher.tasks_per_node=N``:
submitit's :class:`~submitit.helpers.TorchDistributedEnvironment` exports the same variables) trains with
``DistributedDataParallel``: NCCL on CUDA (process ``i`` on ``cuda:LOCAL_RANK``), gloo on the CPU.
Without either, :func:`setup` returns a one-process :class:`World` whose reductions do nothing.

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
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum ``tensor`` over all processes in place (nothing in a single process); returns it."""
    if initialized():
        dist.all_reduce(tensor)
    return tensor


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
        return self.size > 1

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any rank (one small all-reduce)."""
        if not self.distributed:
            return flag
        t = torch.tensor([int(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

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
        """``model`` in ``DistributedDataParallel`` when there are several processes, else itself."""
        if not self.distributed:
            return model
        return DistributedDataParallel(model, device_ids=[self.device] if self.device.type == "cuda" else None)


def _export_slurm_environment() -> None:
    """Inside a multi-task SLURM job started by submitit, export RANK, WORLD_SIZE, MASTER_ADDR... for torch."""
    if "RANK" in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
        return
    try:
        from submitit.helpers import TorchDistributedEnvironment

        # Every task keeps seeing the node's GPUs: _device picks its own by LOCAL_RANK.
        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    except (ImportError, RuntimeError):  # not a submitit job (a plain srun): start it with torchrun instead
        return


def _device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"trainer.device={name} but no CUDA device is visible. Use trainer.device=cpu or auto.")
    if name == "cuda":  # one GPU per local process; where SLURM binds one GPU per task, it is device 0
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device(name)


def setup(device: str) -> World:
    """The :class:`World` of this process; initialises the process group once when there are several."""
    _export_slurm_environment()
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World(_device(device, 0))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    world = World(_device(device, local_rank), rank, size, local_rank)
    if not initialized():
        if world.device.type == "cuda":
            torch.cuda.set_device(world.device)
        dist.init_process_group("nccl" if world.device.type == "cuda" else "gloo")
        atexit.register(dist.destroy_process_group)
    return world
