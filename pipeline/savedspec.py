"""``model.json``, the spec of a saved model: its formats, keys, types and values, checked
before anything it names is read, and the one way a file it names is opened.

A spec is validated whole first (a JSON object of a known format, every key present
with its type, classes, precision, sizes and dtypes in range, a fused head's ``parts``
likewise). A file it names must be a plain name that resolves inside the folder, and its
bytes must match the recorded sha256; they are read once, so what is checked is what is
loaded (see :mod:`tlp.saved`).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .errors import TlpInputError
from .settings import TTA_CHOICES

__all__ = ["SPEC_NAME", "HEAD_FORMAT", "PICKLE_HEAD_FORMAT", "FINETUNED_FORMAT", "ENSEMBLE_FORMAT", "SPEC_KEYS",
           "ENTRY_KEYS", "PRECISIONS", "MissingFile", "command_of", "short", "read_spec", "inside", "member_folder",
           "verified_bytes"]

SPEC_NAME = "model.json"
HEAD_FORMAT = "tlp-head-v2"  # head-<sha12>.skops
PICKLE_HEAD_FORMAT = "tlp-head-v1"  # head.joblib: read with trust_pickle=True only
FINETUNED_FORMAT = "tlp-finetuned-v1"  # model-<sha12>.pt (model.pt before the atomic layout)
ENSEMBLE_FORMAT = "tlp-ensemble-v1"  # members: sub-folders, each a saved model of the two formats above
_NONE = type(None)
_COMMON_KEYS = {"model": str, "weights": (str, _NONE), "weights_sha256": (str, _NONE),
                "image_size": (int, _NONE), "preprocessing": dict, "precision": str, "classes": list,
                "versions": dict}
SPEC_KEYS = {
    HEAD_FORMAT: {**_COMMON_KEYS, "layer": str, "node": str, "pooling": str, "storage_dtype": str, "head": dict},
    FINETUNED_FORMAT: {**_COMMON_KEYS, "classifier": str, "finetuned": dict},
}
SPEC_KEYS[PICKLE_HEAD_FORMAT] = SPEC_KEYS[HEAD_FORMAT]
SPEC_KEYS[ENSEMBLE_FORMAT] = {"classes": list, "members": list, "versions": dict}
ENTRY_KEYS = {"head": {"name": str, "params": dict, "file": str, "sha256": str},
              "finetuned": {"file": str, "sha256": str}}
PRECISIONS = ("fp32", "bf16", "fp16")


class MissingFile(TlpInputError):
    """A file the spec names is not there (perhaps replaced by a save since the spec was read)."""


def command_of(spec: dict) -> str:
    return {FINETUNED_FORMAT: "tlp finetune", ENSEMBLE_FORMAT: "tlp run"}.get(spec.get("format"), "tlp sweep")


def short(value) -> str:
    import reprlib

    return reprlib.repr(value)


def read_spec(directory: Path) -> dict:
    """model.json, parsed and validated: a JSON object of a known format whose keys have
    the right types; nothing it names has been read yet."""
    spec_path = directory / SPEC_NAME
    if not spec_path.is_file():
        raise TlpInputError(f"{str(directory)!r} holds no {SPEC_NAME}; pass a folder written by "
                            "`tlp sweep --out` or `tlp finetune --out`")
    try:
        spec = json.loads(spec_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise TlpInputError(f"{spec_path} is not valid JSON ({error}); re-run the `tlp sweep --out` or "
                            "`tlp finetune --out` that wrote this folder") from None
    if not isinstance(spec, dict):
        raise TlpInputError(f"{spec_path} holds a JSON {type(spec).__name__}, not an object; re-run the "
                            "`tlp sweep --out` or `tlp finetune --out` that wrote this folder")
    if spec.get("format") not in SPEC_KEYS:
        raise TlpInputError(f"{spec_path} has format {short(spec.get('format'))}, expected one of "
                            f"{', '.join(map(repr, SPEC_KEYS))}; re-run the command that wrote it with this tlp")
    _check_keys(spec_path, spec, SPEC_KEYS[spec["format"]], "")
    if spec["format"] == ENSEMBLE_FORMAT:
        _check_members(spec_path, spec)
        return spec
    entry = "head" if "head" in SPEC_KEYS[spec["format"]] else "finetuned"
    _check_keys(spec_path, spec[entry], ENTRY_KEYS[entry], f"{entry}.")
    _check_values(spec_path, spec)
    if "parts" in spec:
        _check_parts(spec_path, spec)
    return spec


def _check_parts(spec_path: Path, spec: dict) -> None:
    """A fused head's ``parts``: a list of at least two entries, each with every key a
    one-layer head has, of the right types and values."""
    parts, fix = spec["parts"], "re-run `tlp sweep --out` to write the folder again"
    if not isinstance(parts, list) or len(parts) < 2 or not all(isinstance(p, dict) for p in parts):
        raise TlpInputError(f"{spec_path}: parts must be a list of at least 2 objects, got {short(parts)}; {fix}")
    keys = {k: v for k, v in SPEC_KEYS[HEAD_FORMAT].items() if k not in ("classes", "versions", "head")}
    for i, part in enumerate(parts):
        _check_keys(spec_path, part, keys, f"parts[{i}].")
        _check_values(spec_path, {**part, "classes": spec["classes"], "format": spec["format"]}, f"parts[{i}].")


def _check_members(spec_path: Path, spec: dict) -> None:
    """An ensemble's classes and ``members``: at least two ``{"folder": NAME, "weight":
    W > 0}``, distinct folders (each checked as a saved model when it is loaded)."""
    members, fix = spec["members"], "re-run `tlp run --out` to write the folder again"
    _check_classes(spec_path, spec["classes"], "", fix)
    if not isinstance(members, list) or len(members) < 2 or not all(isinstance(m, dict) for m in members):
        raise TlpInputError(f"{spec_path}: members must be a list of at least 2 objects, got {short(members)}; {fix}")
    for i, member in enumerate(members):
        _check_keys(spec_path, member, {"folder": str, "weight": (int, float)}, f"members[{i}].")
        if not member["weight"] > 0:
            raise TlpInputError(f"{spec_path}: members[{i}].weight must be positive, got {member['weight']}; {fix}")
    if len({m["folder"] for m in members}) != len(members):
        raise TlpInputError(f"{spec_path}: members name the same folder twice; {fix}")


def _has_type(value, kinds) -> bool:
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    return isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)


def _check_keys(spec_path: Path, mapping: dict, keys: dict, prefix: str) -> None:
    for key, kinds in keys.items():
        if key not in mapping:
            raise TlpInputError(f"{spec_path} lacks the key {prefix}{key!r}; re-run the command that wrote the "
                                "folder (`tlp sweep --out` or `tlp finetune --out`)")
        if not _has_type(mapping[key], kinds):
            names = " or ".join(k.__name__.replace("NoneType", "null")
                                for k in (kinds if isinstance(kinds, tuple) else (kinds,)))
            raise TlpInputError(f"{spec_path}: {prefix}{key} must be {names}, got {short(mapping[key])}; re-run "
                                "the command that wrote the folder (`tlp sweep --out` or `tlp finetune --out`)")


def _check_classes(spec_path: Path, classes: list, prefix: str, fix: str) -> None:
    if len(classes) < 2 or not all(isinstance(c, str) for c in classes) or len(set(classes)) != len(classes):
        raise TlpInputError(f"{spec_path}: {prefix}classes must be a list of at least 2 distinct names, got "
                            f"{short(classes)}; {fix}")


def _check_values(spec_path: Path, spec: dict, prefix: str = "") -> None:
    fix = f"re-run `{command_of(spec)} --out` to write the folder again"
    _check_classes(spec_path, spec["classes"], prefix, fix)
    if spec["precision"] not in PRECISIONS:
        raise TlpInputError(f"{spec_path}: {prefix}precision must be one of {', '.join(PRECISIONS)}, got "
                            f"{short(spec['precision'])}; {fix}")
    if spec["image_size"] is not None and spec["image_size"] <= 0:
        raise TlpInputError(f"{spec_path}: {prefix}image_size must be a positive integer, got {spec['image_size']}; {fix}")
    if spec.get("tta", "none") not in TTA_CHOICES:
        raise TlpInputError(f"{spec_path}: {prefix}tta must be none, flip or d4, got {short(spec['tta'])}; {fix}")
    if not isinstance(spec.get("fold_bn", False), bool):
        raise TlpInputError(f"{spec_path}: {prefix}fold_bn must be true or false, got {short(spec['fold_bn'])}; {fix}")
    if "storage_dtype" in spec and "parts" not in spec and spec["storage_dtype"] not in ("float16", "float32",
                                                                                       "float64"):
        raise TlpInputError(f"{spec_path}: {prefix}storage_dtype must be float16, float32 or float64, got "
                            f"{short(spec['storage_dtype'])}; {fix}")


def _resolved_inside(directory: Path, name: str, what: str, fix: str) -> Path:
    """``directory / name`` resolved, if ``name`` is a plain name (no absolute path, no
    ``..``, no separator) that does not lead out of ``directory`` through a link; ``what``
    says in the error what named it (``head.file``, ``member folder``)."""
    spec_path = directory / SPEC_NAME
    separators = {"/", "\\", os.sep, os.altsep} - {None}
    if not name or name in (".", "..") or "\0" in name or any(s in name for s in separators):
        raise TlpInputError(f"{spec_path}: {what} {name!r} is not a plain name beside {SPEC_NAME}; a saved model only "
                            f"names what is inside its folder, so nothing is read; {fix}")
    root = os.path.realpath(directory)
    path = os.path.realpath(os.path.join(root, name))
    if os.path.dirname(path) != root:
        raise TlpInputError(f"{spec_path}: {what} {name!r} is a link to {path!r}, outside the folder; a saved model "
                            f"only names what is inside its folder, so nothing is read; {fix}")
    return Path(path)


def inside(directory: Path, spec: dict, key: str) -> Path:
    """The file ``spec[key]["file"]`` names, if it is a plain name that resolves inside
    the folder (no absolute path, no ``..``, no symbolic link out of it)."""
    return _resolved_inside(directory, spec[key]["file"], f"{key}.file",
                            f"re-run `{command_of(spec)} --out` to write the folder again")


def member_folder(directory: Path, name: str) -> Path:
    """The ensemble member folder ``name``, if it is a plain name of a folder inside
    ``directory`` (as :func:`inside` checks a file)."""
    fix = "re-run `tlp run --out` to write the folder again"
    path = _resolved_inside(directory, name, "member folder", fix)
    if not path.is_dir():
        raise TlpInputError(f"{directory / SPEC_NAME}: member folder {str(directory / name)!r} is missing; {fix}")
    return path


def verified_bytes(directory: Path, spec: dict, key: str) -> tuple[Path, bytes]:
    """The bytes of the file ``spec[key]`` names, if they match its recorded sha256 (read
    once: what is checked is what is loaded)."""
    path, command = inside(directory, spec, key), command_of(spec)
    shown = str(directory / spec[key]["file"])
    if not path.is_file():
        raise MissingFile(f"file {shown!r} named by {directory / SPEC_NAME} is missing; re-run `{command} --out`")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != spec[key]["sha256"]:
        raise TlpInputError(
            f"file {shown!r} does not match the sha256 in {SPEC_NAME}: it was modified "
            f"or corrupted, so it is not loaded; re-run `{command} --out` to write it again"
        )
    return path, data
