"""Training images: decoded once, kept in memory, augmented by a seeded generator per image.

Augmentation draws from a generator seeded by (seed, epoch, image), not from a global
stream, so the same image gets the same pixels in any process and in any order: thread
and DataLoader decoding give bit-identical weights, and a resumed run repeats exactly
what an uninterrupted one would have done.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from ..dataset import Dataset
from ..errors import ImageDecodeError, ImageReadError
from ..forward import stack_channels_last
from ..models import Preprocessing
from ..preprocess import load_pixels

__all__ = ["DecodedImages", "augment", "training_crop", "dropout_seed", "epoch_order", "global_batches",
           "training_batches", "DECODED_MEMORY_BUDGET"]

DECODED_MEMORY_BUDGET = 2 << 30  # bytes of decoded training images kept between epochs


class DecodedImages:
    """Decoded images of one data set: the training base (resize + central square of the
    resize side) and the evaluation crop (exactly extraction's preprocessing), kept in
    memory up to a budget so later epochs skip decoding."""

    def __init__(self, dataset: Dataset, prep: Preprocessing, budget: int = DECODED_MEMORY_BUDGET):
        self.dataset, self.prep = dataset, prep
        self.base_prep = dataclasses.replace(prep, crop_size=prep.resize_size)
        self._memo: dict[tuple[str, int], torch.Tensor] = {}
        self._budget = budget

    def _get(self, kind: str, position: int) -> torch.Tensor:
        key = (kind, position)
        pixels = self._memo.get(key)
        if pixels is None:
            item = self.dataset.items[position]
            try:
                data = self.dataset.read_bytes(item)
            except OSError as error:  # the file went away or became unreadable after the scan
                raise ImageReadError(item.path, f"cannot read file ({error})") from None
            pixels = load_pixels(data, item.path, self.base_prep if kind == "base" else self.prep).contiguous()
            if self._budget >= pixels.numel():
                self._budget -= pixels.numel()
                self._memo[key] = pixels
        return pixels

    def base(self, position: int) -> torch.Tensor:
        return self._get("base", position)

    def eval_crop(self, position: int) -> tuple[torch.Tensor | None, ImageDecodeError | None]:
        """(pixels, None) for :func:`tlp.forward.batches`; a file that fails after the scan raises."""
        return self._get("eval", position), None


def _sample_seed(seed: int, epoch: int, position: int) -> int:
    digest = hashlib.sha256(f"{seed}/{epoch}/{position}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def dropout_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of one epoch's dropout and drop-path draws on one rank (streams -2, -3, ...
    next to each image's own and the shuffle's -1)."""
    return _sample_seed(seed, epoch, -2 - rank)


def augment(base: torch.Tensor, crop_size: int, generator: torch.Generator, min_scale: float, hflip: bool,
            rotate: bool = False) -> torch.Tensor:
    """Random resized crop (area ``min_scale``..1, aspect 3/4..4/3), optional flip and
    optional quarter turn (0, 90, 180 or 270 degrees) of a uint8 (3, R, R) image, resized
    to ``crop_size`` with the antialiased uint8 kernels. The turn is drawn after every
    other number, so runs without it see the same crops and flips as before it existed."""
    _, height, width = base.shape
    box = (0, 0, height, width)
    for _ in range(10):
        area = height * width * (min_scale + (1 - min_scale) * torch.rand(1, generator=generator).item())
        log_ratio = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * torch.rand(1, generator=generator).item()
        w = int(round(math.sqrt(area * math.exp(log_ratio))))
        h = int(round(math.sqrt(area / math.exp(log_ratio))))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            box = (top, left, h, w)
            break
    flip = hflip and torch.rand(1, generator=generator).item() < 0.5
    top, left, h, w = box
    pixels = base[:, top:top + h, left:left + w].unsqueeze(0).contiguous(memory_format=torch.channels_last)
    if (h, w) != (crop_size, crop_size):
        pixels = F.interpolate(pixels, size=(crop_size, crop_size), mode="bilinear", antialias=True, align_corners=False)
    pixels = pixels[0].flip(-1) if flip else pixels[0]
    turns = int(torch.randint(0, 4, (1,), generator=generator)) if rotate else 0
    if turns:  # a turned copy in the same height-width-channel memory order as the others
        pixels = pixels.rot90(turns, dims=(1, 2)).permute(1, 2, 0).contiguous().permute(2, 0, 1)
    return pixels


def training_crop(settings, prep: Preprocessing) -> int:
    """The side of the training crops: ``settings.train_size``, else the evaluation crop.
    A training step costs about the square of the side, and the convolutions run at any
    size, so a network can train on smaller crops than it is validated and saved at."""
    return settings.train_size or prep.crop_size


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The seeded shuffle of ``n`` training positions for one epoch."""
    generator = torch.Generator().manual_seed(_sample_seed(seed, epoch, -1))
    return torch.randperm(n, generator=generator).tolist()


class _Augmented:
    """One epoch's training images (picklable for DataLoader workers): the same pixels for
    an image in any process, in any order."""

    def __init__(self, images: DecodedImages, labels: np.ndarray, settings, epoch: int):
        self.images, self.labels, self.settings, self.epoch = images, labels, settings, epoch
        self.crop_size = training_crop(settings, images.prep)

    def __call__(self, position: int):
        # Seeded by the image's position in the data set as scanned, so a training part
        # cut by --test trains exactly as before the part became a data set of its own.
        seed = _sample_seed(self.settings.seed, self.epoch, self.images.dataset.position(position))
        generator = torch.Generator().manual_seed(seed)
        pixels = augment(self.images.base(position), self.crop_size, generator,
                         self.settings.min_scale, self.settings.hflip, self.settings.rotate)
        return pixels, int(self.labels[position])


class _AugmentedSet(torch.utils.data.Dataset):
    def __init__(self, sample: _Augmented):
        self.sample = sample

    def __len__(self) -> int:
        return len(self.sample.images.dataset.items)

    def __getitem__(self, position: int):
        return self.sample(position)


def _collate(samples):
    return stack_channels_last([s[0] for s in samples]), torch.as_tensor([s[1] for s in samples], dtype=torch.long)


def global_batches(order, batch_size: int, ranks) -> Iterator:
    """The epoch's global batches of ``ranks.world * batch_size`` positions in ``order``;
    a last one smaller than ``ranks.smallest_batch`` is dropped."""
    size = batch_size * ranks.world
    for start in range(0, len(order), size):
        batch = order[start:start + size]
        if len(batch) < ranks.smallest_batch:
            return
        yield batch


def training_batches(images: DecodedImages, labels: np.ndarray, positions: list[int], settings, epoch: int, *,
                     workers: int, pool, ranks, pin_memory: bool = False
                     ) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
    """(uint8 batch, labels, size of the global batch) of one epoch in its seeded order:
    this rank's part of each global batch (see :class:`tlp.finetuning.parallel.Ranks`;
    in one process, the whole batch). A last global batch of one image (or of fewer
    than one per rank) is dropped: BatchNorm cannot train on it. Decoded in ``pool``'s
    threads between steps (``workers=0``, the CPU default: the training step already
    uses every core) or by DataLoader workers."""
    order = [positions[i] for i in epoch_order(len(positions), settings.seed, epoch)]
    batches = list(global_batches(order, settings.batch_size, ranks))
    parts = [ranks.part(batch) for batch in batches]
    sample = _Augmented(images, labels, settings, epoch)
    if workers:
        loader = torch.utils.data.DataLoader(_AugmentedSet(sample), batch_sampler=parts, num_workers=workers,
                                             collate_fn=_collate, pin_memory=pin_memory)
    else:
        loader = (_collate(list(pool.map(sample, part))) for part in parts)
    for (pixels, targets), batch in zip(loader, batches):
        yield pixels, targets, len(batch)
