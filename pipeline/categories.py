"""The 1,000 ImageNet class names that pretrained heads predict, read when first needed.

torchvision ships them (no download), but importing torchvision costs about 1.5 s, which
a warm cache hit or a sweep of cached features would pay for nothing; so a network's
``ModelSpec.categories`` is an :class:`ImageNetCategories`, which knows its length and
reads the names on first indexing.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

__all__ = ["imagenet_categories", "ImageNetCategories"]


@functools.lru_cache(maxsize=1)
def imagenet_categories() -> tuple[str, ...]:
    """The 1,000 ImageNet class names, shipped with torchvision (no download)."""
    from torchvision.models import ResNet50_Weights

    return tuple(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


class ImageNetCategories(Sequence):
    """The 1,000 ImageNet class names of a timm or embedded network's head, read from
    torchvision only when a name is needed: importing torchvision costs about 1.5 s,
    which a warm cache hit (or a sweep of cached features) would pay for nothing."""

    def __len__(self) -> int:
        return 1000

    def __getitem__(self, index):
        return imagenet_categories()[index]

    def __eq__(self, other) -> bool:
        return isinstance(other, ImageNetCategories)

    def __hash__(self) -> int:
        return hash("imagenet-1k categories")

    def __repr__(self) -> str:
        return "ImageNetCategories()"
