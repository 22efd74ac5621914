"""Where this process sits in a launch of several (``torchrun``, Slurm ``srun``), and
which images are its part of a sharded extraction.

tlp brings no scheduler: the cluster's launcher starts N copies of ``tlp extract``, and
each copy reads its rank from the variables the launcher sets. An image belongs to part
``int(sha256[:16], 16) % WORLD`` of its content digest, so the split depends neither on
file order nor on paths, every rank computes the same split without talking to the
others, and a rerun with another world size still reuses every finished row (rows are
filed by digest, whichever rank made them).
"""

from __future__ import annotations

import os
from typing import Mapping, NamedTuple

from .errors import TlpInputError

__all__ = ["Shard", "parse_shard", "launcher_shard", "resolve_shard", "launcher_device"]

# (rank variable, world-size variable, a variable only the launcher's processes have) of each
# launcher, in the order they are tried. A Slurm batch script itself has SLURM_PROCID=0 and
# the allocation's SLURM_NTASKS too, and a plain `tlp extract` there must extract every
# image: only the tasks of an srun step have SLURM_STEP_NUM_TASKS.
LAUNCHERS = (("RANK", "WORLD_SIZE", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS"))


class Shard(NamedTuple):
    """Part ``rank`` (0-based) of ``world`` parts."""

    rank: int
    world: int

    def owns(self, digest: str) -> bool:
        """Whether the image with this content digest (hex sha256) is in this part."""
        return int(digest[:16], 16) % self.world == self.rank

    def __str__(self) -> str:
        return f"{self.rank}/{self.world}"


def parse_shard(text: str) -> Shard:
    """``"RANK/WORLD"`` (e.g. ``"0/4"``) as a Shard; anything else is a TlpInputError."""
    try:
        rank_text, world_text = str(text).split("/")
        rank, world = int(rank_text), int(world_text)
    except ValueError:
        raise TlpInputError(f"--shard must be RANK/WORLD such as 0/4, got {text!r}") from None
    if world < 1 or not 0 <= rank < world:
        raise TlpInputError(f"--shard {text}: RANK must be 0 to WORLD-1 and WORLD at least 1")
    return Shard(rank, world)


def launcher_shard(environ: Mapping[str, str] = os.environ) -> Shard | None:
    """This process's part when a launcher started several: torchrun's RANK/WORLD_SIZE,
    else Slurm's SLURM_PROCID/SLURM_NTASKS in an srun step; None for a single process."""
    for rank_name, world_name, marker in LAUNCHERS:
        if rank_name in environ and world_name in environ and marker in environ:
            shard = parse_shard(f"{environ[rank_name]}/{environ[world_name]}")
            return shard if shard.world > 1 else None
    return None


def resolve_shard(value: str | None, environ: Mapping[str, str] = os.environ) -> Shard | None:
    """The part an extraction computes: None or ``"all"`` for every image, ``"auto"`` for
    the launcher's (see launcher_shard), or an explicit ``"RANK/WORLD"``."""
    if value is None or value == "all":
        return None
    if value == "auto":
        return launcher_shard(environ)
    shard = parse_shard(value)
    return shard if shard.world > 1 else None


def launcher_device(device: str, environ: Mapping[str, str] = os.environ) -> str:
    """``device`` as given, except ``auto`` or a bare ``cuda`` under a launcher on a machine
    with CUDA: the GPU of this process's LOCAL_RANK (torchrun; SLURM_LOCALID under srun),
    so that ranks on one node do not all take GPU 0."""
    local = environ.get("LOCAL_RANK", environ.get("SLURM_LOCALID"))
    if device not in ("auto", "cuda") or local is None:
        return device
    import torch

    if not torch.cuda.is_available():
        return device
    return f"cuda:{int(local) % torch.cuda.device_count()}"
