"""Whether a data set has an up: the measurement behind d4 features and quarter-turn training.

A satellite tile, a cell under a microscope or a fabric texture is the same class after a
quarter turn; a photo of an object, a hand sign or a digit is not (or is not a photo any
more). Averaging features over the square's eight symmetries (``--tta d4``) and training
on quarter-turned crops (``--rotate``) help the first kind and cost the second, and no
rule of thumb tells them apart from a folder of files. So :func:`measure_orientation`
asks the data: the planner's k-NN probe is fitted on the upright ``late`` features of
most of the training part and scores the held-out rest twice, upright and turned by a
quarter turn. When the turned images are clearly classified worse (one-sided McNemar at
:data:`tlp.ensemble.BEHIND_P`, and at least :data:`tlp.racing.RACE_MIN_GAP` behind),
the labels depend on which way is up; otherwise the data has no up.

It costs one forward pass over the held-out images (at most :data:`ORIENTATION_IMAGES`);
the upright rows come from the cache the frozen sweep filled.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from .dataset import Dataset

__all__ = ["ORIENTATION_IMAGES", "MIN_ORIENTATION_IMAGES", "measure_orientation"]

# Held-out images scored upright and turned. 400 paired images resolve a 2-point drop at
# one-sided 5% when a few dozen images change their answer; the photos' drops measured
# 20 points and more.
ORIENTATION_IMAGES = 400
# Fewer held-out images than this cannot show a drop of the photos' size reliably: the
# answer is then "not measured" (None), and nothing that assumes no up is done.
MIN_ORIENTATION_IMAGES = 40


def measure_orientation(training: Dataset, extraction, seed: int = 0) -> dict:
    """Score held-out images of ``training`` upright and a quarter turn away.

    ``extraction`` (an ExtractSettings) names the network, its weights and how it runs;
    its ``late`` tap is used, average-pooled, without TTA. Returns a report entry:
    ``has_up`` and the evidence (both accuracies on the same images, the paired z, the
    number of images, seconds)."""
    from sklearn.model_selection import train_test_split

    from ._extract import extract
    from .ensemble import behind
    from .featurefile import FeatureFile
    from .heads import make_head
    from .plan import PROBE_K

    started = time.monotonic()
    upright = dataclasses.replace(extraction, layers=("late",), pool="avg", tta="none", shard=None,
                                  progress=False)
    result = extract(training, upright)
    with FeatureFile(result.path) as features:
        paths, labels, X = features.paths, features.labels, features.load("late")
    smallest = int(np.bincount(labels).min())
    n_held = min(ORIENTATION_IMAGES, len(paths) // 4)
    if smallest < 4 or n_held < max(MIN_ORIENTATION_IMAGES, len(set(labels.tolist()))):
        return {"has_up": None, "n_images": 0, "why": f"not measured: fewer than {4 * MIN_ORIENTATION_IMAGES} "
                "training images or a class with fewer than 4, too few to hold some out and tell"}
    fit, held = train_test_split(np.arange(len(paths)), test_size=n_held, stratify=labels, random_state=seed)
    held = np.sort(held)
    probe = make_head("knn", {"k": max(1, min(PROBE_K, int(np.bincount(labels[fit]).min()) - 1))})
    probe.fit(X[fit], labels[fit])
    turned = _turned_features(training, [paths[i] for i in held], upright, result.precision)
    right_upright = probe.predict(X[held]) == labels[held]
    right_turned = probe.predict(turned) == labels[held]
    has_up, z = behind(right_upright, right_turned)
    upright_acc, turned_acc = float(right_upright.mean()), float(right_turned.mean())
    why = (f"quarter-turned images are classified {100 * (upright_acc - turned_acc):.1f} points worse "
           f"({turned_acc:.4f} vs {upright_acc:.4f} upright, paired z {z:.2f}): the data has an up" if has_up else
           f"quarter-turned images are classified as well as upright ones ({turned_acc:.4f} vs {upright_acc:.4f}, "
           f"paired z {z:.2f}): the data has no up")
    return {"has_up": has_up, "upright_accuracy": round(upright_acc, 6), "turned_accuracy": round(turned_acc, 6),
            "paired_z": z, "n_images": int(n_held), "why": why, "seconds": round(time.monotonic() - started, 2)}


def _turned_features(training: Dataset, paths: list[str], settings, precision: str) -> np.ndarray:
    """``late`` features (average-pooled) of these images turned a quarter turn, computed
    as the extraction computes them (same network, weights, device, precision, folding)."""
    from .device import resolve_device
    from .forward import Forward, ItemBytes, PreparedImages
    from .layers import resolve_taps
    from .models import resolve_model

    spec = resolve_model(settings.model, weights=settings.weights, image_size=settings.image_size)
    wanted = set(paths)
    items = [item for item in training.items if item.path in wanted]
    forward = Forward.for_taps(spec, resolve_taps(spec, ["late"]), {"late": "avg"},
                               device=resolve_device(settings.device), precision=precision,
                               fold_bn=settings.fold_bn)
    prepare = PreparedImages(ItemBytes(training, items), spec.preprocessing, settings.max_pixels)

    def turned(position: int):
        pixels, error = prepare(position)
        return (pixels.rot90(1, dims=(1, 2)) if pixels is not None else None), error

    kept, rows = forward.rows(turned, len(items), batch_size=settings.batch_size)
    by_path = dict(zip((items[i].path for i in kept), rows["late"]))
    return np.stack([by_path[path] for path in paths])
