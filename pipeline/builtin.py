"""Built-in data sets: ``digits`` (different from ImageNet) and ``photos`` (similar to it).

``digits`` are scikit-learn's 1,797 8x8 digits as RGB images. ``photos`` are seeded crops
of six colour photos of ImageNet-recognisable objects shipped inside installed packages:
the stand-in for target data *similar* to the source domain. Nothing is downloaded: two
photos come with scikit-learn, four from the files bundled in scikit-image's wheel (read
from ``skimage.data.data_dir`` directly, so pooch is never asked to fetch a missing one).
Both are served as PNG bytes, so they take the same decode path as files.
"""

from __future__ import annotations

import os

import numpy as np

from .dataset import Dataset, InMemoryImages
from .errors import TlpInputError

__all__ = ["BUILTIN_DATASETS", "load_builtin", "digits_images", "load_digits", "photos_images", "load_photos",
           "PHOTO_CLASSES", "PHOTO_SOURCES", "source_photo"]


def load_builtin(name: str) -> Dataset:
    """The built-in data set ``name`` (one of BUILTIN_DATASETS)."""
    return BUILTIN_DATASETS[name]()


# ----------------------------------------------------------------------------- digits
def digits_images() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 8x8 digits as uint8 RGB images (N, 8, 8, 3) and labels (N,).

    Value v in 0..16 becomes gray level round(v * 255 / 16): bright ink on black.
    """
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    gray = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=-1), bunch.target.astype(np.int64)


def load_digits() -> Dataset:
    """The built-in ``digits`` data set: classes ``"0"`` to ``"9"``, items ``digits/NNNN.png``."""
    images, labels = digits_images()
    names = [f"digits/{i:04d}.png" for i in range(len(images))]
    return Dataset(name="digits", kind="builtin", classes=[str(d) for d in range(10)],
                   items=InMemoryImages.items(names, images, labels, b"digits-rgb8x8\x00"),
                   reader=InMemoryImages(names, images))


# ----------------------------------------------------------------------------- photos
# (class, package, file, keep box x0, y0, x1, y1 in source pixels). Every crop contains
# the keep box, so it shows the object; each box fits in half the photo's shorter side
# (the smallest crop). The astronaut portrait is left out: ImageNet has no class for it.
PHOTO_SOURCES = (
    ("cat", "skimage", "chelsea.png", (150, 70, 290, 210)),
    ("coffee", "skimage", "coffee.png", (190, 40, 390, 240)),
    ("flower", "sklearn", "flower.jpg", (215, 130, 400, 315)),
    ("motorcycle", "skimage", "motorcycle_left.png", (300, 140, 540, 380)),
    ("pagoda", "sklearn", "china.jpg", (100, 30, 310, 240)),
    ("rocket", "skimage", "rocket.jpg", (295, 120, 345, 330)),
)
PHOTO_CLASSES = [name for name, *_ in PHOTO_SOURCES]


def photos_images(*, per_class: int = 20, size: int = 160, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Seeded square crops of the source photos as uint8 RGB images (N, size, size, 3) and labels (N,).

    Each crop's side is 50-90% of the photo's shorter side, at a random position that
    keeps the object's box; half are mirrored. Class ``k``'s crops come from the
    generator seeded ``[seed, k]``, so a larger ``per_class`` only appends crops.
    """
    from PIL import Image

    if per_class < 1 or size < 1:
        raise TlpInputError(f"photos needs per_class >= 1 and size >= 1, got per_class={per_class}, size={size}")
    images, labels = [], []
    for label, (_, package, filename, (x0, y0, x1, y1)) in enumerate(PHOTO_SOURCES):
        photo = Image.fromarray(source_photo(package, filename))
        width, height = photo.size
        rng = np.random.default_rng([seed, label])
        for _ in range(per_class):
            side = int(round(rng.uniform(0.5, 0.9) * min(width, height)))
            left = int(rng.integers(max(0, x1 - side), min(x0, width - side) + 1))
            top = int(rng.integers(max(0, y1 - side), min(y0, height - side) + 1))
            crop = photo.resize((size, size), Image.Resampling.LANCZOS, box=(left, top, left + side, top + side))
            if rng.random() < 0.5:
                crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            images.append(np.asarray(crop))
            labels.append(label)
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def load_photos(*, per_class: int = 20, size: int = 160, seed: int = 0) -> Dataset:
    """The built-in ``photos`` data set: classes :data:`PHOTO_CLASSES`, items ``photos/CLASS/NNN.png``."""
    images, labels = photos_images(per_class=per_class, size=size, seed=seed)
    names = [f"photos/{PHOTO_CLASSES[label]}/{i % per_class:03d}.png" for i, label in enumerate(labels)]
    items = InMemoryImages.items(names, images, labels, f"photos-rgb{size}x{size}\x00".encode())
    return Dataset(name="photos", kind="builtin", classes=list(PHOTO_CLASSES), items=items,
                   reader=InMemoryImages(names, images))


def source_photo(package: str, filename: str) -> np.ndarray:
    if package == "sklearn":
        from sklearn.datasets import load_sample_image

        return load_sample_image(filename)
    try:
        import skimage.data
    except ImportError:
        raise TlpInputError(
            "built-in data set 'photos' needs scikit-image, which is not installed; "
            "pip install scikit-image (or pip install tlp[photos])"
        ) from None
    from PIL import Image

    path = os.path.join(skimage.data.data_dir, filename)
    if not os.path.isfile(path):
        raise TlpInputError(
            f"built-in data set 'photos' needs {filename}, which this scikit-image does not ship "
            f"in {skimage.data.data_dir}; install a scikit-image that bundles it (0.26 does)"
        )
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


BUILTIN_DATASETS = {"digits": load_digits, "photos": load_photos}
