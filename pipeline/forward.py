"""The one forward path: image bytes -> decoded, cropped batches -> network -> taps -> pooled rows.

Every stage that runs a network on images uses it: extraction, prediction, fine-tuning's
evaluation and the planner (through extraction). So a saved head sees at prediction time
exactly the numbers it was trained on, and a fine-tuned network is evaluated on exactly
the crops extraction would make.

- :class:`PreparedImages` turns a position into uint8 pixels (decode, EXIF, RGB, resize,
  centre crop) or a reason it could not; failures are data, not exceptions, so a batch
  can skip a bad file under ``--on-error skip``.
- :func:`batches` groups positions into channels-last uint8 batches: decoded by threads
  *between* forward passes on a CPU, or by DataLoader processes that overlap the GPU.
- :class:`Forward` normalises a batch, runs the network under autocast and
  ``inference_mode``, and returns the pooled taps (or the network's own output).
"""

from __future__ import annotations

from typing import Callable, Iterator, NamedTuple

import numpy as np
import torch
from torch import nn

from .device import autocast, image_threads, tune_cpu_allocator
from .errors import ImageDecodeError
from .folding import fold_batchnorm
from .images import DEFAULT_MAX_PIXELS
from .layers import Tap, build_tap_extractor
from .models import ModelSpec, Preprocessing
from .pooling import check_grid_fits, pool
from .preprocess import load_pixels, normalize
from .scan import read_image_file
from .settings import TTA_PASSES

__all__ = ["Batch", "PreparedImages", "FileBytes", "ItemBytes", "stack_channels_last", "batches", "Forward"]


class Batch(NamedTuple):
    positions: list[int]  # every position of the batch, decoded or not
    good: list[int]  # the positions whose pixels are in ``pixels``, in order
    pixels: torch.Tensor | None  # uint8 (B, 3, H, W), channels-last strides; None if nothing decoded
    failures: list[tuple[int, ImageDecodeError]]  # (position, why it could not be decoded)


class ItemBytes:
    """Position -> encoded bytes of a data set's items (picklable for DataLoader workers)."""

    def __init__(self, dataset, items):
        self.dataset, self.items = dataset, items

    def __call__(self, position: int) -> bytes:
        return self.dataset.read_bytes(self.items[position])

    def name(self, position: int) -> str:
        return self.items[position].path


class FileBytes:
    """Position -> encoded bytes of image files named by path (prediction's inputs)."""

    def __init__(self, paths: list[str]):
        self.paths = list(paths)

    def __call__(self, position: int) -> bytes:
        return read_image_file(self.paths[position], self.paths[position])

    def name(self, position: int) -> str:
        return self.paths[position]


class PreparedImages:
    """Position -> (uint8 (3, crop, crop) pixels, None) or (None, the error): the decode
    path of :func:`tlp.preprocess.load_pixels` over a byte source."""

    def __init__(self, source: ItemBytes | FileBytes, prep: Preprocessing, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.source, self.prep, self.max_pixels = source, prep, max_pixels

    def __call__(self, position: int):
        name = self.source.name(position)
        try:
            return load_pixels(self.source(position), name, self.prep, self.max_pixels), None
        except ImageDecodeError as error:
            return None, error


def stack_channels_last(pixels: list[torch.Tensor]) -> torch.Tensor:
    """Stack (3, H, W) uint8 images as (B, H, W, 3) and view them as (B, 3, H, W):
    channels-last without a transposing copy."""
    return torch.stack([p.permute(1, 2, 0) for p in pixels]).permute(0, 3, 1, 2)


def _batch(positions, samples) -> Batch:
    good = [(p, pixels) for p, (pixels, _) in zip(positions, samples) if pixels is not None]
    stacked = stack_channels_last([pixels for _, pixels in good]) if good else None
    failures = [(p, error) for p, (pixels, error) in zip(positions, samples) if pixels is None]
    return Batch(list(positions), [p for p, _ in good], stacked, failures)


class _PositionSet(torch.utils.data.Dataset):
    """Positions for DataLoader workers: position -> (position, (pixels or None, error))."""

    def __init__(self, prepare: Callable, n: int):
        self.prepare, self.n = prepare, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, position: int):
        return position, self.prepare(position)


def _collate(samples) -> Batch:
    return _batch([s[0] for s in samples], [s[1] for s in samples])


# Images one DataLoader worker decodes per task. A whole forward batch per task (256 on a
# GPU) leaves most workers idle on small sets and delays the first batch by a whole batch's
# decode; a few dozen keeps every worker busy at a small per-task cost (one message each).
WORKER_CHUNK = 32


def batches(prepare: Callable, n: int, *, batch_size: int, workers: int = 0,
            pin_memory: bool = False) -> Iterator[Batch]:
    """Positions 0..n-1 in order, as batches of prepared pixels.

    ``workers=0`` decodes each batch with a thread per core in this process, *between*
    forward passes: on a CPU the forward pass already keeps every core busy, and decoding
    processes running beside it make its OpenMP threads wait on each other (PIL and
    torch's resize release the GIL, so the threads use every core; each runs torch on one
    thread: see :func:`tlp.device.image_threads`). ``workers > 0``
    uses DataLoader processes, which overlap decoding with a GPU's work; each decodes
    chunks of a batch (:data:`WORKER_CHUNK` images at most), joined here into the batch.
    """
    if workers == 0:
        with image_threads() as pool_:
            for start in range(0, n, batch_size):
                positions = range(start, min(start + batch_size, n))
                yield _batch(positions, list(pool_.map(prepare, positions)))
        return
    chunk = _chunk_size(batch_size)
    chunks = torch.utils.data.DataLoader(
        _PositionSet(prepare, n), batch_size=chunk, shuffle=False, num_workers=workers,
        collate_fn=_collate, prefetch_factor=4)
    pending: list[Batch] = []
    for part in chunks:
        pending.append(part)
        if len(pending) * chunk == batch_size:
            yield _joined(pending, pin_memory)
            pending = []
    if pending:
        yield _joined(pending, pin_memory)


def _chunk_size(batch_size: int) -> int:
    """The largest divisor of ``batch_size`` up to :data:`WORKER_CHUNK`, so that whole
    chunks make whole batches (the batches are the same positions as without chunks)."""
    return next(size for size in range(min(batch_size, WORKER_CHUNK), 0, -1) if batch_size % size == 0)


def _joined(parts: list[Batch], pin_memory: bool) -> Batch:
    """Consecutive chunks as one batch; its pixels in page-locked memory for the GPU copy."""
    if len(parts) == 1 and not pin_memory:
        return parts[0]
    decoded = [part.pixels for part in parts if part.pixels is not None]
    pixels = None
    if decoded:  # torch.cat keeps the chunks' channels-last strides; one chunk is not copied
        pixels = decoded[0] if len(decoded) == 1 else torch.cat(decoded)
        if pin_memory:
            pixels = pixels.pin_memory()
    return Batch([p for part in parts for p in part.positions], [p for part in parts for p in part.good],
                 pixels, [f for part in parts for f in part.failures])


def _views(tta: str) -> int:
    """Forward passes per batch: one plain pass without TTA, else one pass of twice the
    batch (the images and their mirror images) per quarter turn (see TTA_PASSES)."""
    return max(1, TTA_PASSES[tta] // 2)


def _turned(batch: torch.Tensor, turns: int) -> torch.Tensor:
    """The batch turned by ``turns`` quarter turns (the square crop keeps its shape)."""
    if not turns:
        return batch
    return batch.rot90(turns, dims=(2, 3)).contiguous(memory_format=torch.channels_last)


def _mean(views: list[torch.Tensor]) -> torch.Tensor:
    """The mean of the views' outputs (the one view itself when there is no TTA)."""
    return views[0] if len(views) == 1 else torch.stack(views).mean(0)


class Forward:
    """A network ready to run uint8 batches: normalise, autocast, forward, pool the taps.

    With ``taps`` (and ``pools``, tap name -> pooling), calling it returns
    ``{tap name: (B, D) float32 array}`` from one forward pass; ``tap_shapes`` then holds
    each tap's per-image shape before pooling. Without taps it returns the network's own
    output (a fine-tuned network's class scores) as a float32 array. The network is put in
    eval mode and channels-last on ``device``.

    ``tta="flip"`` runs every batch together with its mirror image (one forward pass of
    twice the batch) and returns, per tap, the mean of the two pooled outputs: features
    that no longer depend on which way the object faces. ``tta="d4"`` does the same for
    the eight symmetries of the square crop (four quarter turns, each with its mirror image:
    four forward passes of twice the batch): features of data with no up, such as
    satellite tiles or microscopy, that no longer depend on how the image was turned.

    ``fold_bn=True`` runs a copy of the network with its BatchNorms folded into the
    convolutions before them (see :mod:`tlp.folding`; ``n_folded`` says how many).

    Called with ``pad_to``, a smaller batch is padded to that many images (its last image
    repeated) and the padding's outputs dropped. An image's numbers then depend on the
    batch size alone, never on which images share its batch: on a CPU, oneDNN picks its
    convolution kernels by batch size, and fp32 features of a batch of 13 differed from
    the same images' in a batch of 32 by up to 9e-6 (1 thread), while any 32 images gave
    identical bits. So a resumed, sharded or re-split extraction gives bit-identical rows.
    """

    def __init__(self, network: nn.Module, prep: Preprocessing, *, device: torch.device, precision: str,
                 spec: ModelSpec | None = None, taps: list[Tap] | None = None, pools: dict[str, str] | None = None,
                 tta: str = "none", fold_bn: bool = False):
        tune_cpu_allocator()
        if tta not in TTA_PASSES:
            raise ValueError(f"tta must be one of {', '.join(TTA_PASSES)}, got {tta!r}")
        self.prep, self.device, self.precision, self.tta = prep, device, precision, tta
        self.taps, self.pools = taps, pools or {}
        self.n_folded = 0
        if fold_bn:
            network, self.n_folded = fold_batchnorm(network.eval(), prep.crop_size)
        module = build_tap_extractor(spec, network, taps) if taps else network
        self.module = module.to(device=device, memory_format=torch.channels_last).eval()
        self.tap_shapes: dict[str, tuple[int, ...]] = {}

    @classmethod
    def for_taps(cls, spec: ModelSpec, taps: list[Tap], pools: dict[str, str], *, device: torch.device,
                 precision: str, network: nn.Module | None = None, tta: str = "none",
                 fold_bn: bool = False) -> "Forward":
        """The spec's network (or ``network``) with these taps, pooled as ``pools`` says."""
        network = network if network is not None else spec.build()
        return cls(network, spec.preprocessing, device=device, precision=precision, spec=spec, taps=taps,
                   pools=pools, tta=tta, fold_bn=fold_bn)

    def __call__(self, pixels: torch.Tensor, pad_to: int | None = None):
        kept = pixels.shape[0]
        if pad_to is not None and kept < pad_to:
            pixels = torch.cat([pixels, pixels[-1:].expand(pad_to - kept, -1, -1, -1)])
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        outputs = self._run(pixels)
        if isinstance(outputs, dict):
            return {name: values[:kept] for name, values in outputs.items()}
        return outputs[:kept]

    def _run(self, pixels: torch.Tensor):
        with torch.inference_mode():
            batch = normalize(pixels.to(self.device, non_blocking=True), self.prep)
            views = [self._forward(_turned(batch, turns)) for turns in range(_views(self.tta))]
            if not self.taps:
                return _mean(views).cpu().numpy()
            return {tap.name: _mean([view[tap.name] for view in views]).cpu().numpy() for tap in self.taps}

    def _forward(self, batch: torch.Tensor):
        """One forward pass: the network's output, or each tap pooled (in float32, outside
        autocast: see :func:`tlp.pooling.pool`); with TTA, the rows of the batch and of its
        mirror image (one pass of twice the batch) averaged."""
        n = batch.shape[0]
        if self.tta != "none":  # the mirror images ride in the same forward pass
            batch = torch.cat([batch, batch.flip(-1)]).contiguous(memory_format=torch.channels_last)
        with autocast(self.device, self.precision):
            outputs = self.module(batch)
        if not self.taps:
            return self._flip_mean(outputs.float(), n)
        pooled = {}
        for tap in self.taps:
            tensor = outputs[tap.node]
            if tap.name not in self.tap_shapes:
                shape = tuple(int(v) for v in tensor.shape[1:])
                check_grid_fits(tap.name, tap.node, shape, self.pools.get(tap.name, "avg"), self.prep.crop_size)
                self.tap_shapes[tap.name] = shape
            pooled[tap.name] = self._flip_mean(pool(tensor, self.pools.get(tap.name, "avg")), n)
        return pooled

    def _flip_mean(self, values: torch.Tensor, n: int) -> torch.Tensor:
        """The first ``n`` rows, or with TTA the mean of each row and its mirror's."""
        return (values[:n] + values[n:]) / 2 if self.tta != "none" else values

    def rows(self, prepare: Callable, n: int, *, batch_size: int, workers: int = 0,
             on_failure: Callable[[list[tuple[int, ImageDecodeError]]], None] | None = None):
        """Run every position through the network: (positions kept, outputs stacked).

        ``on_failure`` sees each batch's undecodable positions before its forward pass
        and may raise (``--on-error fail``); by default they are left out.
        """
        kept, parts = [], []
        for batch in batches(prepare, n, batch_size=batch_size, workers=workers,
                             pin_memory=self.device.type == "cuda"):
            if batch.failures and on_failure is not None:
                on_failure(batch.failures)
            if batch.pixels is None:
                continue
            kept += batch.good
            parts.append(self(batch.pixels, pad_to=batch_size))
        if not parts:
            return kept, None
        if isinstance(parts[0], dict):
            return kept, {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
        return kept, np.concatenate(parts)
