"""Data-parallel fine-tuning under a launcher (``torchrun``, Slurm ``srun``): one process
per rank, ``DistributedDataParallel``, and BatchNorm statistics of the global batch.

Every rank cuts the same global batches of ``world x --batch-size`` images from the
epoch's seeded permutation and trains on its own contiguous slice of each (no
``DistributedSampler``: it pads with repeated images or drops some). DDP averages the
gradients. Two more things make ``W`` ranks of batch ``b`` train like one process of
batch ``W * b``:

- BatchNorm layers that train normalise with the mean and variance of the global batch
  (:class:`SyncedNorm`; ``torch.nn.SyncBatchNorm`` runs on GPUs only, and timm's
  ``BatchNormAct2d`` would lose its activation in it), so their statistics and running
  averages are those of the ``W * b`` images;
- each rank's loss is weighted by its share of the global batch (:meth:`Ranks.share`),
  so an uneven last batch still averages to the mean over the global batch.

Decisions (the case, early stopping, the time budget) are taken from shared numbers, so
every rank takes the same one, and rank 0 alone writes checkpoints and outputs.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from typing import Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..device import resolve_device
from ..errors import TlpInputError
from ..launch import launcher_device, launcher_shard

__all__ = ["Ranks", "data_parallel", "SyncedNorm", "synced_norms", "wrap_data_parallel"]

# A rank waits this long in a collective for the others (rank 0 may be measuring the
# case, or writing a checkpoint); a rank that dies is noticed by the launcher, which
# stops the others, long before.
COLLECTIVE_TIMEOUT = datetime.timedelta(hours=2)


class Ranks:
    """This process's place in a training run (rank ``rank`` of ``world``, training on
    ``device``) and the few collectives the loop needs. ``Ranks(device=...)`` is a single
    process, whose collectives return their inputs."""

    def __init__(self, rank: int = 0, world: int = 1, device: torch.device | None = None, norm_group=None):
        self.rank, self.world = rank, world
        self.device = device if device is not None else torch.device("cpu")
        self.norm_group = norm_group  # the process group of BatchNorm statistics

    @property
    def is_main(self) -> bool:
        """Whether this rank writes the checkpoints, outputs and log lines."""
        return self.rank == 0

    @property
    def smallest_batch(self) -> int:
        """The smallest global batch trained on: one image per rank, and at least two
        (BatchNorm cannot train on one image)."""
        return max(2, self.world)

    def part(self, batch: list[int]) -> list[int]:
        """This rank's contiguous slice of a global batch (sizes differ by at most one)."""
        size, extra = divmod(len(batch), self.world)
        start = self.rank * size + min(self.rank, extra)
        return batch[start:start + size + (self.rank < extra)]

    def share(self, local: int, total: int) -> float:
        """The weight of this rank's mean loss over ``local`` of the ``total`` images of a
        global batch, so that DDP's average of the ranks' gradients is the gradient of the
        mean loss over the whole batch."""
        return local * self.world / total

    def _reduce(self, values: list[float], op: str) -> list[float]:
        if self.world == 1:
            return list(values)
        import torch.distributed as dist

        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, op=getattr(dist.ReduceOp, op))
        return tensor.tolist()

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sums over the ranks (float64, so counts stay exact)."""
        return self._reduce(values, "SUM")

    def min(self, value: int) -> int:
        """The smallest ``value`` of any rank."""
        return int(self._reduce([value], "MIN")[0])

    def max(self, value: int) -> int:
        """The largest ``value`` of any rank."""
        return int(self._reduce([value], "MAX")[0])

    def broadcast(self, value: int) -> int:
        """Rank 0's ``value``, on every rank."""
        if self.world == 1:
            return value
        import torch.distributed as dist

        tensor = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.broadcast(tensor, src=0)
        return int(tensor.item())

    def barrier(self) -> None:
        """Wait until every rank gets here."""
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


@contextlib.contextmanager
def data_parallel(device: str, environ: Mapping[str, str] = os.environ) -> Iterator[Ranks]:
    """The :class:`Ranks` of this process: a single process, or, under a launcher that
    started several (``RANK``/``WORLD_SIZE`` from torchrun, ``SLURM_PROCID``/``SLURM_NTASKS``
    in an srun step), a member of a process group (nccl on CUDA, gloo on a CPU) that is
    left again on exit. Each rank trains on ``cuda:LOCAL_RANK`` where CUDA is there."""
    shard = launcher_shard(environ)
    if shard is None:
        yield Ranks(device=resolve_device(device))
        return
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not environ.get(name)]
    if missing:
        raise TlpInputError(f"rank {shard.rank} of {shard.world} has no {' or '.join(missing)}: start the ranks with "
                            "torchrun, or export MASTER_ADDR (the first node's host name) and MASTER_PORT "
                            "(a free port) before srun")
    import torch.distributed as dist

    rank_device = resolve_device(launcher_device(device, environ))
    backend = "nccl" if rank_device.type == "cuda" else "gloo"
    if rank_device.type == "cuda":
        torch.cuda.set_device(rank_device)
    os.environ.setdefault("MASTER_ADDR", environ["MASTER_ADDR"])
    os.environ.setdefault("MASTER_PORT", environ["MASTER_PORT"])
    dist.init_process_group(backend, rank=shard.rank, world_size=shard.world, timeout=COLLECTIVE_TIMEOUT)
    try:
        # BatchNorm statistics travel on a group of their own, so their collectives (some
        # issued from the backward pass) never interleave with DDP's gradient buckets.
        yield Ranks(shard.rank, shard.world, rank_device, norm_group=dist.new_group(backend=backend))
    finally:
        dist.destroy_process_group()


class _SumOverRanks(torch.autograd.Function):
    """The sum of a tensor over the ranks; its gradient is the sum of the ranks' gradients
    (every rank's loss depends on every rank's part of the sum)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:
        import torch.distributed as dist

        ctx.group = group
        total = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _SumOverRanks.apply(grad.contiguous(), ctx.group), None


def _all_reduce(tensor: torch.Tensor, group) -> torch.Tensor:
    """The sum over the ranks, differentiable."""
    return _SumOverRanks.apply(tensor, group)


class SyncedNorm(nn.Module):
    """A BatchNorm2d (or timm ``BatchNormAct2d``) that, while training, normalises with the
    mean and variance over every rank's part of the global batch and updates its running
    averages with them. It holds the very parameters and buffers of the layer it stands
    in for, under the same names, so the state dict, the optimiser and checkpoints do not
    change; the layer's activation and dropout follow, as in ``BatchNormAct2d``."""

    def __init__(self, norm: nn.BatchNorm2d, group):
        super().__init__()
        self.eps, self.momentum, self.group = norm.eps, norm.momentum, group
        self.weight, self.bias = norm.weight, norm.bias
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            self.register_buffer(name, getattr(norm, name))
        for name in ("drop", "act"):  # BatchNormAct2d's, in the order it applies them
            child = getattr(norm, name, None)
            if isinstance(child, nn.Module):
                self.add_module(name, child)

    def _global_batch_norm(self, x: torch.Tensor) -> torch.Tensor:
        # One collective forward (and one backward): the sums of (x - c) and (x - c)^2, shifted
        # by the running mean c, which every rank holds alike; the shift keeps E[d^2] - E[d]^2
        # clear of cancellation while the batch mean stays near the running one.
        dims, channels = (0, 2, 3), x.shape[1]
        values = x.float()
        shift = self.running_mean.detach().float().view(1, -1, 1, 1)
        deviations = values - shift
        count = values.new_tensor([x.numel() // channels])
        totals = _all_reduce(torch.cat([deviations.sum(dims), deviations.square().sum(dims), count]), self.group)
        n = totals[-1].detach()
        mean_deviation = totals[:channels] / n
        var = (totals[channels:2 * channels] / n - mean_deviation.square()).clamp_min(0.0)
        mean = shift.view(-1) + mean_deviation
        y = (values - mean.view(1, -1, 1, 1)) * torch.rsqrt(var + self.eps).view(1, -1, 1, 1)
        if self.weight is not None:
            y = y * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            unbiased = var.detach() * (n / max(float(n) - 1.0, 1.0))
            self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), momentum)
            self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
        return y.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            y = self._global_batch_norm(x)
        else:
            y = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        for child in self._modules.values():
            y = child(y)
        return y


def _trainable_norms(model: nn.Module, frozen: list[nn.Module]):
    """(parent, child name, layer) of each BatchNorm2d that trains (frozen ones stay in
    eval mode and need no statistics)."""
    kept = {id(module) for module in frozen}
    for parent in model.modules():
        for name, child in parent._modules.items():
            if (isinstance(child, nn.BatchNorm2d) and id(child) not in kept and child.running_mean is not None
                    and type(child).__name__ != "FrozenBatchNorm2d"):
                yield parent, name, child


@contextlib.contextmanager
def synced_norms(model: nn.Module, frozen: list[nn.Module], ranks: Ranks) -> Iterator[None]:
    """Within the block, the model's trainable BatchNorm layers are :class:`SyncedNorm`
    (on more than one rank); the original layers, which share their tensors, come back
    on exit."""
    if ranks.world == 1:
        yield
        return
    swapped = list(_trainable_norms(model, frozen))
    for parent, name, norm in swapped:
        parent._modules[name] = SyncedNorm(norm, ranks.norm_group)
    try:
        yield
    finally:
        for parent, name, norm in swapped:
            parent._modules[name] = norm


def wrap_data_parallel(model: nn.Module, ranks: Ranks) -> nn.Module:
    """The module the training step calls: the model itself in one process, else a
    ``DistributedDataParallel`` around it (which starts every rank from rank 0's weights).
    Buffers are not re-broadcast before each step: the synced BatchNorm layers keep them
    equal on every rank."""
    if ranks.world == 1:
        return model
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    device_ids = [ranks.device.index] if ranks.device.type == "cuda" else None
    newer = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters  # torch >= 2.12
    no_sync = {"forward_sync_buffers": False} if newer else {"broadcast_buffers": False}
    return DistributedDataParallel(model, device_ids=device_ids, **no_sync)
