"""How fast is ``tlp extract`` compared with its limit and with the script users write instead?

One process measures, on the same generated JPEG photos (ImageFolder layout) with the
default model ``efficientnet_lite0`` at 224 pixels: with ``--photos small`` (default) a
few hundred at about 500x375, with ``--photos large`` a few dozen camera-size ones
(4032x3024, quality 90, tiled from upscaled crops of the sample photos, so they compress
and decode like photos), where decoding every pixel costs several forward passes:

bare forward (the limit)
    The tap extractor of the network as loaded, fed pre-decoded, pre-normalised
    tensors already in memory (``torch.inference_mode``), for every precision/layout
    combination this CPU can run (fp32, bf16 where native) x (NCHW at batch 32,
    channels_last at batch 16, 32, 64). The best is the limit: no decoding, no pooling,
    no I/O. Also timed, not part of the limit: tlp's own forward, the same extractor
    with its BatchNorms folded into the convolutions (``tlp.folding``, tlp's default),
    at tlp's batch size; ``ratio_cold_vs_tlp_forward`` says how much of tlp's time is
    its forward pass.
naive script
    What the PyTorch tutorials lead to: ``ImageFolder`` + ``Resize(256, bicubic)``,
    ``CenterCrop(224)``, ``ToTensor``, ``Normalize``; a default ``DataLoader`` (no
    workers), fp32, NCHW, forward hooks on the three tapped modules, global average
    pooling, ``np.save``.
tlp cold
    ``tlp.extract`` into a fresh cache directory with default settings, end to end
    (scan and hash every file, build the model, decode, forward, write HDF5).
tlp warm
    The same call again: a cache hit that must run zero forward passes.

Targets: cold reaches >= 0.85x the limit and >= 3x the naive script (>= 8x on large
photos, which tlp decodes at the JPEG scale the resize needs); warm takes <= 5% of cold. A profile of tlp's per-image stages (decode, resize, normalise, forward) is
recorded too, so a missed target points at its cause.

Fairness: every file is read once before timing (page cache warm); naive and tlp run
on the same files. The naive script runs first, under glibc's default allocator as in
a user's own process; then the allocator is tuned as tlp tunes it (process-wide, for
good), and the limit and tlp are measured under that same allocator. tlp's in-process memos
(layer presets, weights sha256) are cleared before each tlp call so that each call
pays what a fresh ``tlp extract`` process pays, except process start-up (imports),
which no measurement here includes. Other busy processes skew everything; the share of
CPU busy before and after is recorded.

Run: ``python benchmarks/extract.py --json benchmarks/results/extract.json`` (and
``--photos large --json benchmarks/results/extract_large.json``)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image, ImageEnhance, ImageOps

import tlp
from tlp import layers as tlp_layers
from tlp import models as tlp_models
from tlp.device import autocast, cpu_has_native_bf16, default_workers, tune_cpu_allocator
from tlp.files import forget_file_hashes
from tlp.folding import fold_batchnorm
from tlp.images import decode_image
from tlp.preprocess import normalize, resize_and_crop
from tlp.settings import ExtractSettings

MODEL = "efficientnet_lite0"
LAYERS = ("early", "mid", "late")
BATCH_SIZE = ExtractSettings().batch_size  # tlp's default, and the naive script's
BARE_BATCH_SIZES = (16, 32, 64)  # the limit takes the best of these
TARGETS = {
    "cold_vs_limit_at_least": 0.85,
    "cold_vs_naive_at_least": 3.0,
    "warm_vs_cold_at_most": 0.05,
}
LARGE_TARGETS = {**TARGETS, "cold_vs_naive_at_least": 8.0}
# --photos: landscape size (every fifth photo is portrait) and default count.
PHOTOS = {"small": {"size": (500, 375), "n_images": 300}, "large": {"size": (4032, 3024), "n_images": 40}}
JPEG_QUALITY = 90
CPU = torch.device("cpu")
TUNED_ALLOCATOR = False


# ----------------------------------------------------------------------------- data
def _source_photos() -> list[Image.Image]:
    from sklearn.datasets import load_sample_image

    return [Image.fromarray(load_sample_image(name)) for name in ("china.jpg", "flower.jpg")]


def _photo(rng: np.random.Generator, sources: list[Image.Image], size: tuple[int, int]) -> Image.Image:
    """A random crop of a sample photo, scaled to ``size``, maybe mirrored, colour-jittered."""
    source = sources[rng.integers(len(sources))]
    width, height = size
    aspect = width / height
    crop_h = rng.uniform(0.45, 1.0) * min(source.height, source.width / aspect)
    crop_w = crop_h * aspect
    left = rng.uniform(0, source.width - crop_w)
    top = rng.uniform(0, source.height - crop_h)
    image = source.resize(size, Image.BICUBIC, box=(left, top, left + crop_w, top + crop_h))
    if rng.random() < 0.5:
        image = ImageOps.mirror(image)
    for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        image = enhancer(image).enhance(rng.uniform(0.7, 1.3))
    return image


def _camera_photo(rng: np.random.Generator, sources: list[Image.Image], size: tuple[int, int]) -> Image.Image:
    """A camera-size photo: 2x2 tiles, each a random sample-photo crop upscaled to a quarter.

    Upscaling one 640x427 sample to 12 megapixels would give a blurrier image than a
    camera's (so a faster decode); tiles of smaller crops keep edges at photo density.
    """
    width, height = size
    tile = (width // 2, height // 2)
    photo = Image.new("RGB", size)
    for index in range(4):
        photo.paste(_photo(rng, sources, tile), ((index % 2) * tile[0], (index // 2) * tile[1]))
    return photo


def make_images(root: Path, n_images: int, n_classes: int, seed: int, photos: str = "small") -> list[Path]:
    """Write ``n_images`` JPEGs as ``root/class<k>/<i>.jpg``; every fifth is portrait.

    Natural content matters: random noise compresses badly and decodes several times
    slower than a photo of the same size, which would flatter any pipeline that
    overlaps decoding with the forward pass.
    """
    rng = np.random.default_rng(seed)
    sources = _source_photos()
    landscape = PHOTOS[photos]["size"]
    draw = _camera_photo if photos == "large" else _photo
    paths = []
    for i in range(n_images):
        folder = root / f"class{i % n_classes}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{i:05d}.jpg"
        size = landscape[::-1] if i % 5 == 4 else landscape
        draw(rng, sources, size).save(path, format="JPEG", quality=JPEG_QUALITY)
        paths.append(path)
    return paths


def read_all(paths: list[Path]) -> list[bytes]:
    """Read every file once, so no timed run pays for the disk."""
    return [path.read_bytes() for path in paths]


# ----------------------------------------------------------------------------- profile
@dataclass
class DecodeProfile:
    pixels: torch.Tensor  # uint8 (N, 3, crop, crop)
    decode_s: list[float]  # per image: bytes -> RGB PIL image (tlp's decode_image, at the JPEG scale the resize needs)
    resize_s: list[float]  # per image: resize + centre crop (tlp's resize_and_crop)


def decode_profile(blobs: list[bytes], prep) -> DecodeProfile:
    """Decode and resize every image with tlp's own functions, timing each step per image."""
    decode_s, resize_s, tensors = [], [], []
    for i, data in enumerate(blobs):
        start = time.perf_counter()
        image = decode_image(data, f"image-{i}", reduce_to=prep.resize_size)
        middle = time.perf_counter()
        tensors.append(resize_and_crop(image, prep))
        end = time.perf_counter()
        decode_s.append(middle - start)
        resize_s.append(end - middle)
    return DecodeProfile(torch.stack(tensors), decode_s, resize_s)


def time_normalize(pixels: torch.Tensor, prep, batch_size: int = BATCH_SIZE) -> tuple[torch.Tensor, float]:
    """tlp's ``normalize`` over all batches; returns (channels_last float32 inputs, seconds)."""
    start = time.perf_counter()
    batches = [normalize(pixels[i:i + batch_size], prep) for i in range(0, len(pixels), batch_size)]
    return torch.cat(batches).contiguous(memory_format=torch.channels_last), time.perf_counter() - start


# ----------------------------------------------------------------------------- bare forward
def build_extractor(spec, taps, layout: str, bn_folded: bool = False) -> torch.nn.Module:
    """The tap extractor of the network as loaded (or, ``bn_folded``, with its BatchNorms
    folded into the convolutions, as ``tlp extract`` runs it by default), in the layout."""
    network = spec.build().eval()
    if bn_folded:
        network, _ = fold_batchnorm(network, spec.preprocessing.crop_size)
    extractor = tlp_layers.build_tap_extractor(spec, network, taps)
    if layout == "channels_last":
        extractor = extractor.to(memory_format=torch.channels_last)
    return extractor


def _forward_all(extractor, inputs: torch.Tensor, device: torch.device, precision: str,
                 batch_size: int = BATCH_SIZE) -> None:
    with torch.inference_mode(), autocast(device, precision):
        for start in range(0, len(inputs), batch_size):
            extractor(inputs[start:start + batch_size])
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # kernels run asynchronously: time them, not their launch


def _cpu_usage() -> tuple[float, int]:
    """(system CPU seconds, minor page faults) of this process so far; zeros where unknown."""
    try:
        import resource
    except ImportError:
        return 0.0, 0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_stime, usage.ru_minflt


def time_forward(extractor, inputs, device, precision: str, repeats: int, batch_size: int = BATCH_SIZE) -> dict:
    """Time ``repeats`` passes over all inputs after a two-batch warm-up.

    Also counts kernel time and minor page faults: glibc hands blocks above its mmap
    threshold (32 MiB at most by default) straight back to the kernel, so each batch's
    large activations are page-faulted and zeroed again; this shows up as system time.
    """
    _forward_all(extractor, inputs[: 2 * batch_size], device, precision, batch_size)
    seconds = []
    sys_before, faults_before = _cpu_usage()
    for _ in range(repeats):
        start = time.perf_counter()
        _forward_all(extractor, inputs, device, precision, batch_size)
        seconds.append(time.perf_counter() - start)
    sys_after, faults_after = _cpu_usage()
    images = repeats * len(inputs)
    return {
        "seconds": seconds,
        "system_cpu_ms_per_image": round(1000.0 * (sys_after - sys_before) / images, 3),
        "minor_page_faults_per_image": round((faults_after - faults_before) / images, 1),
    }


def bare_forward(spec, taps, inputs_cl: torch.Tensor, repeats: int, device: torch.device = CPU,
                 batch_size: int = BATCH_SIZE) -> dict[str, dict]:
    """Every precision x layout x batch size this device runs natively -> timing summary."""
    if device.type == "cuda":
        precisions, channels_last_batches = ["fp32", "bf16", "fp16"], (batch_size,)
    else:
        precisions = ["fp32"] + (["bf16"] if cpu_has_native_bf16() else [])
        channels_last_batches = tuple(sorted({*BARE_BATCH_SIZES, batch_size}))
    inputs_cl = inputs_cl.to(device)
    layouts = {"nchw": inputs_cl.contiguous(), "channels_last": inputs_cl}
    variants = {}
    for layout, inputs in layouts.items():
        extractor = build_extractor(spec, taps, layout).to(device)
        for precision in precisions:
            # NCHW is never the best layout here; time it at the run's batch size only.
            for batch_size_ in channels_last_batches if layout == "channels_last" else (batch_size,):
                timing = time_forward(extractor, inputs, device, precision, repeats, batch_size_)
                median = statistics.median(timing["seconds"])
                variants[f"{precision}/{layout}/b{batch_size_}"] = {
                    "precision": precision,
                    "layout": layout,
                    "batch_size": batch_size_,
                    "seconds": [round(s, 4) for s in timing["seconds"]],
                    "median_seconds": round(median, 4),
                    "images_per_s": round(len(inputs) / median, 2),
                    "system_cpu_ms_per_image": timing["system_cpu_ms_per_image"],
                    "minor_page_faults_per_image": timing["minor_page_faults_per_image"],
                }
    # tlp's own forward: BatchNorms folded (not the limit, which is the network as loaded).
    extractor = build_extractor(spec, taps, "channels_last", bn_folded=True).to(device)
    for precision in precisions:
        timing = time_forward(extractor, inputs_cl, device, precision, repeats, batch_size)
        median = statistics.median(timing["seconds"])
        variants[f"{precision}/channels_last/b{batch_size}/bn-folded"] = {
            "precision": precision, "layout": "channels_last", "batch_size": batch_size, "bn_folded": True,
            "seconds": [round(s, 4) for s in timing["seconds"]], "median_seconds": round(median, 4),
            "images_per_s": round(len(inputs_cl) / median, 2),
            "system_cpu_ms_per_image": timing["system_cpu_ms_per_image"],
            "minor_page_faults_per_image": timing["minor_page_faults_per_image"],
        }
    return variants


# ----------------------------------------------------------------------------- naive script
def run_naive(root: Path, spec, taps, out_dir: Path, device: torch.device = CPU,
              batch_size: int = BATCH_SIZE) -> tuple[float, dict[str, np.ndarray], list[str]]:
    """The tutorial script, timed from model construction to the last ``np.save``.

    Returns (seconds, {tap name: (N, C) features}, relative paths in row order).
    """
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    start = time.perf_counter()
    model = spec.build().to(device)  # the same timm network and weights tlp uses
    transform = transforms.Compose([
        transforms.Resize(256, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(224),
        transforms.ToTensor(),
        transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    ])
    dataset = datasets.ImageFolder(str(root), transform=transform)
    loader = DataLoader(dataset, batch_size=batch_size)
    features: dict[str, list[np.ndarray]] = {tap.name: [] for tap in taps}
    hooks = []
    for tap in taps:
        def keep(_module, _inputs, output, _name=tap.name):
            features[_name].append(output.mean(dim=(2, 3)).cpu().numpy())

        hooks.append(model.get_submodule(tap.node).register_forward_hook(keep))
    with torch.no_grad():
        for images, _labels in loader:
            model(images.to(device))
    for hook in hooks:
        hook.remove()
    out_dir.mkdir(parents=True, exist_ok=True)
    stacked = {name: np.concatenate(parts) for name, parts in features.items()}
    for name, values in stacked.items():
        np.save(out_dir / f"{name}.npy", values)
    seconds = time.perf_counter() - start
    paths = [Path(path).relative_to(root).as_posix() for path, _ in dataset.samples]
    return seconds, stacked, paths


# ----------------------------------------------------------------------------- tlp
def _forget_process_memos() -> None:
    """Clear tlp's in-process memos so a call pays what a fresh ``tlp extract`` pays."""
    tlp_layers.forget_presets()
    forget_file_hashes()


def run_tlp(root: Path, cache_dir: Path, device: torch.device = CPU, batch_size: int = BATCH_SIZE,
            workers: int | None = None):
    """One ``tlp.extract`` call with default settings; returns (seconds, result).

    The device is named (``cpu`` unless ``--device`` says otherwise): on a machine with
    CUDA the default would be the GPU, and the limit and the naive script run on the
    device the run names.
    """
    _forget_process_memos()
    start = time.perf_counter()
    result = tlp.extract(str(root), cache_dir=str(cache_dir), layers=LAYERS, device=str(device),
                         batch_size=batch_size, workers=workers, progress=False)
    return time.perf_counter() - start, result


def agreement(naive: dict[str, np.ndarray], naive_paths: list[str], result) -> dict[str, float]:
    """Lowest per-image cosine similarity between naive (fp32) and tlp features, per layer.

    Checks that both measure the same computation; tlp differs only by precision,
    float16 storage and its one-step resize.
    """
    with tlp.FeatureFile(result.path) as cached:
        row = {path: i for i, path in enumerate(cached.paths)}
        order = [row[path] for path in naive_paths]
        lowest = {}
        for name, ours in naive.items():
            theirs = cached.load(name)[order]
            cosine = (ours * theirs).sum(1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(theirs, axis=1))
            lowest[name] = round(float(cosine.min()), 5)
    return lowest


# ----------------------------------------------------------------------------- report
def cpu_busy_fraction(seconds: float = 1.0) -> float | None:
    """Share of all CPUs busy during the next ``seconds`` (Linux /proc/stat; None elsewhere).

    Sampled instead of the load average, which still counts processes that ended a
    minute ago.
    """
    def snapshot():
        with open("/proc/stat", encoding="ascii") as handle:
            values = [int(v) for v in handle.readline().split()[1:]]
        return sum(values), values[3] + values[4]  # total, idle + iowait

    try:
        total_0, idle_0 = snapshot()
        time.sleep(seconds)
        total_1, idle_1 = snapshot()
    except (OSError, ValueError, IndexError):
        return None
    return round(1.0 - (idle_1 - idle_0) / max(1, total_1 - total_0), 3)


def _ms(seconds: float, n: int) -> float:
    return round(1000.0 * seconds / n, 3)


def _profile(n: int, profile: DecodeProfile, normalize_s: float, forward_s: float, cold_s: float, cold_timings) -> dict:
    """Per-image milliseconds of each stage of tlp's work, measured one stage at a time."""
    stages = {
        "decode": _ms(sum(profile.decode_s), n),
        "resize_crop": _ms(sum(profile.resize_s), n),
        "normalize": _ms(normalize_s, n),
        "forward_tlp_config": _ms(forward_s, n),
    }
    return {
        **stages,
        "serial_sum": round(sum(stages.values()), 3),
        "tlp_cold": _ms(cold_s, n),
        "tlp_cold_outside_forward_loop": _ms(cold_s - cold_timings.get("forward_seconds", 0.0), n),
    }


def _settings(args, n: int) -> dict:
    return {
        "photos": args.photos,
        "landscape_size": list(PHOTOS[args.photos]["size"]),
        "model": MODEL,
        "image_size": 224,
        "layers": list(LAYERS),
        "batch_size": args.batch_size,
        "device": args.device,
        "n_images": n,
        "portrait_fraction": 0.2,
        "jpeg_quality": JPEG_QUALITY,
        "seed": args.seed,
        "repeats": args.repeats,
        "bare_repeats": args.bare_repeats,
        "warm_repeats": args.warm_repeats,
        "statistic": "median",
    }


def _machine(precision: str, busy: tuple, device: torch.device, workers: int | None) -> dict:
    return {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "cpu_has_native_bf16": cpu_has_native_bf16(),
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "resolved_precision": precision,
        # Decoding processes of tlp's calls (0: threads between forward passes, the CPU's default).
        "tlp_workers": default_workers(workers, device),
        "glibc_allocator_tuned": TUNED_ALLOCATOR,
        # Share of the CPU busy in the second before and after the run: other processes
        # running meanwhile make every number here slower and noisier.
        "cpu_busy_before": busy[0],
        "cpu_busy_after": busy[1],
        # glibc malloc settings change the forward pass speed (see time_forward).
        "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
    }


def build_report(args, n, profile, normalize_s, variants, naive_s, cold_runs, warm_runs, cosine, busy) -> dict:
    """All measurements, ratios and targets as one JSON-ready dict."""
    bare_best = max((v for v in variants.values() if not v.get("bn_folded")), key=lambda v: v["images_per_s"])
    bare_ips = bare_best["images_per_s"]
    cold_s = statistics.median(s for s, _ in cold_runs)
    cold_result = min(cold_runs, key=lambda run: abs(run[0] - cold_s))[1]  # the median run
    warm_s = statistics.median(s for s, _ in warm_runs)
    naive_med = statistics.median(naive_s)
    cold_ips, naive_ips = n / cold_s, n / naive_med
    precision = cold_result.precision
    targets = LARGE_TARGETS if args.photos == "large" else TARGETS
    ratios = {
        "ratio_cold_vs_limit": round(cold_ips / bare_ips, 3),
        "ratio_cold_vs_naive": round(cold_ips / naive_ips, 3),
        "ratio_warm_vs_cold": round(warm_s / cold_s, 4),
    }
    tlp_forward = variants[f"{precision}/channels_last/b{args.batch_size}/bn-folded"]
    return {
        "bare_forward_images_per_s": bare_ips,
        # The forward pass as tlp runs it (BatchNorms folded): what its other work is measured against.
        "tlp_forward_images_per_s": tlp_forward["images_per_s"],
        "ratio_cold_vs_tlp_forward": round(cold_ips / tlp_forward["images_per_s"], 3),
        "bare_forward_best_variant": f"{bare_best['precision']}/{bare_best['layout']}/b{bare_best['batch_size']}",
        "bare_forward_variants": variants,
        "tlp_cold_seconds": round(cold_s, 3),
        "tlp_cold_images_per_s": round(cold_ips, 2),
        "tlp_cold_runs_seconds": [round(s, 3) for s, _ in cold_runs],
        "tlp_cold_timings": {k: round(v, 4) for k, v in cold_result.timings.items()},
        "tlp_cold_precision": precision,
        "naive_seconds": round(naive_med, 3),
        "naive_images_per_s": round(naive_ips, 2),
        "naive_runs_seconds": [round(s, 3) for s in naive_s],
        "tlp_warm_seconds": round(warm_s, 4),
        "tlp_warm_runs_seconds": [round(s, 4) for s, _ in warm_runs],
        "tlp_warm_timings": {k: round(v, 4) for k, v in warm_runs[-1][1].timings.items()},
        "n_extracted_warm": warm_runs[-1][1].n_extracted,
        **ratios,
        **({"large_tlp_images_per_s": round(cold_ips, 2), "large_naive_images_per_s": round(naive_ips, 2)}
           if args.photos == "large" else {}),
        "targets": targets,
        "targets_met": {
            "cold_vs_limit": ratios["ratio_cold_vs_limit"] >= targets["cold_vs_limit_at_least"],
            "cold_vs_naive": ratios["ratio_cold_vs_naive"] >= targets["cold_vs_naive_at_least"],
            "warm_vs_cold": ratios["ratio_warm_vs_cold"] <= targets["warm_vs_cold_at_most"],
        },
        "profile_ms_per_image": _profile(
            n, profile, normalize_s, tlp_forward["median_seconds"],
            cold_s, cold_result.timings,
        ),
        "naive_vs_tlp_min_cosine": cosine,
        "settings": _settings(args, n),
        "machine": _machine(precision, busy, torch.device(args.device), args.workers),
    }


def format_table(report: dict) -> str:
    """The report as a plain-text table for people."""
    n = report["settings"]["n_images"]
    met, machine = report["targets_met"], report["machine"]
    rows = [("measurement", "seconds", "images/s", "vs limit")]
    bare = report["bare_forward_images_per_s"]
    for name, variant in report["bare_forward_variants"].items():
        rows.append((f"bare forward {name}", f"{variant['median_seconds']:.2f}", f"{variant['images_per_s']:.1f}",
                     f"{variant['images_per_s'] / bare:.2f}"))
    for label, key in (("naive script", "naive"), ("tlp cold", "tlp_cold")):
        seconds = report[f"{key}_seconds"]
        rows.append((label, f"{seconds:.2f}", f"{n / seconds:.1f}", f"{n / seconds / bare:.2f}"))
    rows.append(("tlp warm (cache hit)", f"{report['tlp_warm_seconds']:.3f}", "-", "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    t = report["targets"]
    lines += [
        "",
        f"cold / limit  {report['ratio_cold_vs_limit']:.2f}  (target >= {t['cold_vs_limit_at_least']})  "
        f"{'met' if met['cold_vs_limit'] else 'NOT met'}",
        f"cold / tlp's own forward (BatchNorms folded)  {report['ratio_cold_vs_tlp_forward']:.2f}",
        f"cold / naive  {report['ratio_cold_vs_naive']:.2f}  (target >= {t['cold_vs_naive_at_least']})  "
        f"{'met' if met['cold_vs_naive'] else 'NOT met'}",
        f"warm / cold   {report['ratio_warm_vs_cold']:.3f} (target <= {t['warm_vs_cold_at_most']})  "
        f"{'met' if met['warm_vs_cold'] else 'NOT met'}",
        "",
        "tlp cold breakdown (s): " + ", ".join(f"{k.removesuffix('_seconds')} {v:.2f}"
                                              for k, v in report["tlp_cold_timings"].items()),
        "bare forward kernel time (ms/img, page faults/img): " + ", ".join(
            f"{name} {v['system_cpu_ms_per_image']:.1f} ({v['minor_page_faults_per_image']:.0f})"
            for name, v in report["bare_forward_variants"].items()),
        "per-image profile (ms): " + ", ".join(f"{k} {v:.2f}" for k, v in report["profile_ms_per_image"].items()),
        f"machine: {machine['cpu_count']} CPUs, {machine['torch_threads']} torch threads, "
        f"native bf16 {machine['cpu_has_native_bf16']}, tlp precision {machine['resolved_precision']}, "
        f"CPU busy before/after {machine['cpu_busy_before']}/{machine['cpu_busy_after']}",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", required=True, type=Path, help="write the results here")
    parser.add_argument("--photos", choices=sorted(PHOTOS), default="small",
                        help="small: about 500x375; large: 4032x3024 camera photos (default small)")
    parser.add_argument("--n-images", type=int, help="JPEGs to generate (default 300 small, 40 large)")
    parser.add_argument("--keep", type=Path, help="generate images and caches in DIR and keep them")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs of naive and tlp cold; medians are reported (default 3)")
    parser.add_argument("--bare-repeats", type=int, default=3, help="timed passes per bare variant (default 3)")
    parser.add_argument("--warm-repeats", type=int, default=3, help="tlp warm calls (default 3)")
    parser.add_argument("--classes", type=int, default=4, help="class folders, 3 to 5 is typical (default 4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]: where the limit, the naive "
                        "script and tlp run")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE,
                        help=f"tlp's and the naive script's batch, and one of the limit's (default {BATCH_SIZE})")
    parser.add_argument("--workers", type=int, default=None,
                        help="tlp's decoding processes (default tlp's: 0 on a CPU, up to 8 on a GPU)")
    args = parser.parse_args(argv)
    if args.n_images is None:
        args.n_images = PHOTOS[args.photos]["n_images"]
    for name in ("n_images", "repeats", "bare_repeats", "warm_repeats", "classes", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if args.keep is not None and args.keep.exists() and any(args.keep.iterdir()):
        # Old caches there would turn the cold run into a warm one.
        parser.error(f"--keep {args.keep} is not empty; pass a new or empty folder")
    if args.n_images < args.batch_size:
        parser.error(f"--n-images must be at least --batch-size {args.batch_size} (one batch), got {args.n_images}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: this torch ({torch.__version__}) sees no CUDA device")
    return args


def run(args, work: Path) -> dict:
    busy_before = cpu_busy_fraction()
    if busy_before is not None and busy_before > 0.2:
        print(f"warning: {busy_before:.0%} of the CPU is busy before starting; other processes will skew the numbers")
    root = work / "images"
    paths = make_images(root, args.n_images, args.classes, args.seed, args.photos)
    blobs = read_all(paths)
    print(f"{len(paths)} JPEGs in {root} ({sum(map(len, blobs)) / len(blobs) / 1024:.0f} KiB each on average)")

    device = torch.device(args.device)
    spec = tlp_models.resolve_model(MODEL)
    taps = tlp_layers.resolve_taps(spec, LAYERS)
    # The naive script runs first, under glibc's default allocator, as in a user's own
    # process. tlp tunes the allocator process-wide (and irreversibly) on its first
    # forward pass, so everything after this loop, the limit included, runs tuned.
    naive_s = []
    naive_features = naive_paths = None
    for repeat in range(args.repeats):
        seconds, naive_features, naive_paths = run_naive(root, spec, taps, work / f"naive-{repeat}", device,
                                                         args.batch_size)
        naive_s.append(seconds)
    global TUNED_ALLOCATOR
    TUNED_ALLOCATOR = tune_cpu_allocator()

    profile = decode_profile(blobs, spec.preprocessing)
    inputs, normalize_s = time_normalize(profile.pixels, spec.preprocessing, args.batch_size)
    variants = bare_forward(spec, taps, inputs, args.bare_repeats, device, args.batch_size)
    del inputs
    cold_runs = [run_tlp(root, work / f"cache-{repeat}", device, args.batch_size, args.workers)
                 for repeat in range(args.repeats)]
    warm_runs = [run_tlp(root, work / f"cache-{args.repeats - 1}", device, args.batch_size, args.workers)
                 for _ in range(args.warm_repeats)]
    for _, result in warm_runs:
        if result.n_extracted != 0:  # a warm call that runs the network is a broken cache
            raise RuntimeError(f"tlp warm extracted {result.n_extracted} images; expected a cache hit")
    cosine = agreement(naive_features, naive_paths, cold_runs[-1][1])
    busy = (busy_before, cpu_busy_fraction())
    return build_report(args, len(paths), profile, normalize_s, variants, naive_s, cold_runs, warm_runs, cosine, busy)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        report = run(args, args.keep)
    else:
        with tempfile.TemporaryDirectory(prefix="tlp-bench-") as work:
            report = run(args, Path(work))
    print()
    print(format_table(report))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
