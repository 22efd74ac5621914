"""A scanned data set as a value: classes, items (path, label, content digest), files left out.

Stages take a :class:`Dataset`, not a path, so a data set is scanned and hashed once
however many stages use it (``tlp run`` hands the same parts to the planner and to the
sweep or fine-tuning). Labels are attached to items, so leaving a bad file out never
shifts another image's label.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

__all__ = ["Item", "Skipped", "Dataset", "InMemoryImages"]


@dataclass(frozen=True)
class Item:
    """One image of a data set."""

    path: str  # POSIX path relative to the data root ("3/img_01.png"); the name users see
    label: int  # index into Dataset.classes
    digest: str  # sha256 of the file's bytes: what identifies its features in the cache


@dataclass(frozen=True)
class Skipped:
    """A file left out under ``--on-error skip``, with the reason."""

    path: str
    reason: str

    def to_dict(self) -> dict:
        return {"path": self.path, "reason": self.reason}


@dataclass
class Dataset:
    """A scanned data set: classes, good items in a fixed order, files left out."""

    name: str  # "digits", or the folder / CSV path as given
    kind: str  # "folder", "csv" or "builtin"
    classes: list[str]
    items: list[Item]
    skipped: list[Skipped] = field(default_factory=list)
    root: Path | None = None  # folder that relative item paths are under (None for built-ins)
    reader: Callable[[str], bytes] | None = field(default=None, repr=False)  # item path -> encoded bytes
    # A part cut from a scanned data set (subset) remembers where its items came from:
    source: "Dataset | None" = field(default=None, repr=False, compare=False)  # the data set as scanned
    origin: list[int] | None = field(default=None, repr=False, compare=False)  # each item's position there

    def read_bytes(self, item: Item) -> bytes:
        """The encoded bytes of one item (what ``digest`` was computed from)."""
        return self.reader(item.path)

    @property
    def labels(self) -> np.ndarray:
        """(N,) int64 class index of every item."""
        return np.asarray([item.label for item in self.items], dtype=np.int64)

    def subset(self, positions, name: str) -> "Dataset":
        """The items at ``positions`` (in that order) as a data set of their own, for
        samples and training parts; files skipped by the scan stay with the whole, which
        the part names as its ``source`` (with each item's position there, ``origin``)."""
        positions = [int(i) for i in positions]
        return dataclasses.replace(self, name=name, items=[self.items[i] for i in positions], skipped=[],
                                   source=self.source or self, origin=[self.position(i) for i in positions])

    def position(self, index: int) -> int:
        """Where item ``index`` stands in the data set as scanned: what identifies an image
        within its data set however it was split (fine-tuning seeds its augmentation by it)."""
        return index if self.origin is None else self.origin[index]

    def identity(self) -> dict:
        """What decides the cached index: classes and (path, label, digest) per item."""
        digest = hashlib.sha256()
        for item in self.items:
            digest.update(f"{item.path}\x00{item.label}\x00{item.digest}\n".encode())
        return {"classes": list(self.classes), "n_items": len(self.items), "items_sha256": digest.hexdigest()}


class InMemoryImages:
    """Reads images held as uint8 arrays as PNG bytes, so built-in data sets take the
    same decode path as files (a class, not a closure, so DataLoader workers can pickle it)."""

    def __init__(self, names: list[str], images: np.ndarray):
        self.position = {name: i for i, name in enumerate(names)}
        self.images = images

    def __call__(self, relative: str) -> bytes:
        from PIL import Image

        buffer = io.BytesIO()
        Image.fromarray(self.images[self.position[relative]]).save(buffer, format="PNG")
        return buffer.getvalue()

    @staticmethod
    def items(names: list[str], images: np.ndarray, labels, prefix: bytes) -> list[Item]:
        """Items whose digests hash ``prefix`` and each image's pixels (PNG bytes need not be stable)."""
        return [Item(name, int(label), hashlib.sha256(prefix + image.tobytes()).hexdigest())
                for name, image, label in zip(names, images, labels)]
