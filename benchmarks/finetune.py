"""How fast does ``tlp finetune`` train compared with the PyTorch transfer-learning tutorial loop?

One process, the same model (``efficientnet_lite0`` with a new seeded linear classifier,
every layer trained), the same image size, batch size, number of epochs, training images
and test images:

tutorial
    The loop of the PyTorch "Transfer Learning for Computer Vision" tutorial (finetuning
    the ConvNet): ``ImageFolder`` with ``RandomResizedCrop`` + ``RandomHorizontalFlip`` +
    ``ToTensor`` + ``Normalize``, a shuffling ``DataLoader`` (its ``num_workers=4``, capped
    at the core count), SGD (lr 0.001, momentum 0.9), ``StepLR(7, 0.1)``, a train and a
    val phase per epoch, fp32, NCHW.
tlp
    ``tlp.finetune(train, test=val, case="4", val=0)`` with its defaults:
    fp32 on a CPU (``auto``: bf16 autocast measured slower for training here), channels_last, decoded
    images kept in memory between epochs, decoding in threads between steps, AdamW with
    the pretrained layers at 0.1x the new layer's rate, warm-up + cosine. Where ``auto``
    resolves to a reduced precision (CUDA), also run with ``precision="fp32"``.

limit
    The bare training step on pre-decoded tensors: the same network as ``tlp finetune``'s
    (new seeded classifier, every layer trained, channels_last, fp32), the training
    images decoded and normalised once at the training size, then forward, cross-entropy,
    backward and an AdamW step per batch in a plain loop, no augmentation and no data
    loading. Its median images per second over 3 passes is ``limit_train_images_per_s``:
    what no loader can beat, so ``tlp / limit`` (target >= 0.85) says how much of a
    step's time goes to everything but the network.

Fairness: the tutorial runs first, under glibc's default allocator, as in a user's own
process; then the allocator is tuned as ``tlp finetune`` tunes it (process-wide, for good)
and the limit and tlp run under that same allocator. (Before this order, the limit ran
first under the default allocator, page-faulting every step's activations afresh, and tlp
measured above its own limit: 65.6 against 57.5 img/s.)

Training throughput is images per second of the training phase of each epoch (data
loading included, evaluation excluded); medians over epochs are reported. Accuracy is
measured on the same held-out images after the same number of epochs. Targets: tlp
>= 2x the tutorial's throughput, and its test accuracy no lower (within 2 points).

Data: the Sign Language Digits photos in ``../shared/data`` when present (a seeded,
stratified sample), else the built-in ``digits`` written as PNG files.

Run: ``python benchmarks/finetune.py --json benchmarks/results/finetune.json``
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tlp import __version__ as tlp_version
from tlp import finetune, load_dataset
from tlp.device import tune_cpu_allocator
from tlp.files import write_json
from tlp.finetuning.surgery import build_finetune_model
from tlp.models import resolve_model
from tlp.report import format_table

from extract import cpu_busy_fraction  # noqa: E402  (benchmarks/extract.py)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "sign-language-digits" / "Dataset"
MODEL = "efficientnet_lite0"
TARGETS = {"speedup_at_least": 2.0, "accuracy_gap_points_at_most": 2.0}  # issue 13: >= 2x the tutorial


# ----------------------------------------------------------------------------- data
def materialise(source: str, work: Path, n_train: int, n_test: int, seed: int) -> tuple[Path, Path, str]:
    """ImageFolder ``train/`` and ``val/`` folders: a stratified, seeded sample of ``source``."""
    from sklearn.model_selection import train_test_split

    dataset = load_dataset(source)
    labels = np.asarray([item.label for item in dataset.items])
    indices = np.arange(len(labels))
    train, rest = train_test_split(indices, train_size=n_train, stratify=labels, random_state=seed)
    test, _ = train_test_split(rest, train_size=n_test, stratify=labels[rest], random_state=seed)
    for part, chosen in (("train", train), ("val", test)):
        for index in chosen:
            item = dataset.items[index]
            target = work / part / dataset.classes[item.label] / Path(item.path).name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(dataset.read_bytes(item))
    return work / "train", work / "val", dataset.name


# ----------------------------------------------------------------------------- tutorial
def run_tutorial(train_dir: Path, val_dir: Path, image_size: int, batch_size: int, epochs: int, seed: int) -> dict:
    """The tutorial's train_model loop, unchanged in substance (no best-model copy: the
    comparison scores the final weights, as tlp with ``val=0`` does)."""
    from torchvision import datasets, transforms

    spec = resolve_model(MODEL, image_size=image_size)
    prep = spec.preprocessing
    normalize = transforms.Normalize(prep.mean, prep.std)
    data_transforms = {
        "train": transforms.Compose([transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip(),
                                     transforms.ToTensor(), normalize]),
        "val": transforms.Compose([transforms.Resize(prep.resize_size), transforms.CenterCrop(image_size),
                                   transforms.ToTensor(), normalize]),
    }
    image_datasets = {"train": datasets.ImageFolder(train_dir, data_transforms["train"]),
                      "val": datasets.ImageFolder(val_dir, data_transforms["val"])}
    workers = min(4, os.cpu_count() or 1)
    torch.manual_seed(seed)
    dataloaders = {x: torch.utils.data.DataLoader(image_datasets[x], batch_size=batch_size, shuffle=True,
                                                  num_workers=workers) for x in ("train", "val")}
    model = build_finetune_model(spec, len(image_datasets["train"].classes), seed=seed)
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.1)
    history = []
    for epoch in range(epochs):
        row = {"epoch": epoch + 1}
        for phase in ("train", "val"):
            model.train() if phase == "train" else model.eval()
            running_loss, running_corrects, seen = 0.0, 0, 0
            started = time.perf_counter()
            for inputs, labels in dataloaders[phase]:
                optimizer.zero_grad()
                with torch.set_grad_enabled(phase == "train"):
                    outputs = model(inputs)
                    _, preds = torch.max(outputs, 1)
                    loss = criterion(outputs, labels)
                    if phase == "train":
                        loss.backward()
                        optimizer.step()
                running_loss += loss.item() * inputs.size(0)
                running_corrects += int(torch.sum(preds == labels.data))
                seen += inputs.size(0)
            if phase == "train":
                scheduler.step()
                row["train_seconds"] = time.perf_counter() - started
                row["train_images_per_s"] = seen / row["train_seconds"]
                row["train_loss"] = running_loss / seen
            else:
                row["val_accuracy"] = running_corrects / seen
        history.append(row)
        print(f"  tutorial epoch {epoch + 1}: {row['train_images_per_s']:.1f} img/s, "
              f"val accuracy {row['val_accuracy']:.3f}", flush=True)
    return {"history": history, "num_workers": workers,
            "train_images_per_s": statistics.median(r["train_images_per_s"] for r in history),
            "test_accuracy": history[-1]["val_accuracy"]}


# ----------------------------------------------------------------------------- tlp
def run_tlp(train_dir: Path, val_dir: Path, image_size: int, batch_size: int, epochs: int, seed: int,
            precision: str) -> dict:
    result = finetune(str(train_dir), test=str(val_dir), case="4", val=0.0, image_size=image_size,
                      batch_size=batch_size, epochs=epochs, seed=seed, precision=precision, progress=False)
    for row in result.history:
        print(f"  tlp ({result.recipe['precision']}) epoch {row['epoch']}: {row['images_per_second']:.1f} img/s",
              flush=True)
    return {"history": result.history, "precision": result.recipe["precision"],
            "train_images_per_s": statistics.median(r["images_per_second"] for r in result.history),
            "test_accuracy": result.test_accuracy, "timings": result.timings}


def run_limit(train_dir: Path, image_size: int, batch_size: int, seed: int, passes: int = 3) -> dict:
    """The bare forward+backward+AdamW loop on the training images, decoded beforehand."""
    from tlp.preprocess import load_pixels, normalize

    dataset = load_dataset(str(train_dir))
    spec = resolve_model(MODEL, image_size=image_size)
    prep = spec.preprocessing
    pixels = torch.stack([load_pixels(dataset.read_bytes(item), item.path, prep) for item in dataset.items])
    inputs = normalize(pixels, prep)
    labels = torch.as_tensor(dataset.labels, dtype=torch.long)
    torch.manual_seed(seed)
    model = build_finetune_model(spec, len(dataset.classes), seed=seed).to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    n_full = len(inputs) // batch_size * batch_size  # full batches only, as a drop_last loader steps

    def one_pass() -> float:
        start = time.perf_counter()
        for first in range(0, n_full, batch_size):
            batch = inputs[first:first + batch_size].contiguous(memory_format=torch.channels_last)
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(batch), labels[first:first + batch_size]).backward()
            optimizer.step()
        return n_full / (time.perf_counter() - start)

    one_pass()  # warm-up: allocator and kernel choices
    rates = [one_pass() for _ in range(passes)]
    print(f"  limit (bare step, fp32 channels_last): {statistics.median(rates):.1f} img/s", flush=True)
    return {"train_images_per_s": statistics.median(rates), "passes_images_per_s": [round(r, 2) for r in rates]}


# ----------------------------------------------------------------------------- report
def build_report(args, data_name: str, tutorial: dict, tlp: dict, tlp_fp32: dict | None, busy,
                 limit: dict | None = None) -> dict:
    speedup = tlp["train_images_per_s"] / tutorial["train_images_per_s"]
    gap = 100.0 * (tutorial["test_accuracy"] - tlp["test_accuracy"])
    report = {
        "tlp_train_images_per_s": round(tlp["train_images_per_s"], 2),
        "tutorial_train_images_per_s": round(tutorial["train_images_per_s"], 2),
        "speedup": round(speedup, 3),
        "tlp_test_accuracy": tlp["test_accuracy"],
        "tutorial_test_accuracy": round(tutorial["test_accuracy"], 4),
        "accuracy_gap_points": round(gap, 2),
        "targets": TARGETS,
        "targets_met": {"speedup": speedup >= TARGETS["speedup_at_least"],
                        "accuracy": gap <= TARGETS["accuracy_gap_points_at_most"]},
        "tlp_precision": tlp["precision"],
        "tlp": tlp, "tutorial": tutorial,
        "settings": {"data": data_name, "model": MODEL, "image_size": args.image_size, "batch_size": args.batch_size,
                     "epochs": args.epochs, "n_train": args.n_train, "n_test": args.n_test, "seed": args.seed},
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "python": platform.python_version(), "torch": torch.__version__, "tlp": tlp_version,
                    "cpu_busy_before": busy[0], "cpu_busy_after": busy[1]},
    }
    if limit is not None:
        fp32 = tlp_fp32 or tlp  # the limit runs fp32: compare it with tlp's fp32 run
        report["limit_train_images_per_s"] = round(limit["train_images_per_s"], 2)
        report["ratio_tlp_vs_limit"] = round(fp32["train_images_per_s"] / limit["train_images_per_s"], 3)
        report["targets"] = {**TARGETS, "vs_limit_at_least": 0.85}
        report["targets_met"]["vs_limit"] = report["ratio_tlp_vs_limit"] >= 0.85
        report["limit"] = limit
    if tlp_fp32 is not None:
        report["tlp_fp32_train_images_per_s"] = round(tlp_fp32["train_images_per_s"], 2)
        report["tlp_fp32_test_accuracy"] = tlp_fp32["test_accuracy"]
        report["tlp_fp32"] = tlp_fp32
    return report


def format_report(report: dict) -> str:
    rows = [["tutorial loop (fp32, NCHW)", report["tutorial_train_images_per_s"], "1.00",
             report["tutorial_test_accuracy"]]]
    if "tlp_fp32_train_images_per_s" in report:
        rows.append(["tlp finetune, fp32", report["tlp_fp32_train_images_per_s"],
                     f"{report['tlp_fp32_train_images_per_s'] / report['tutorial_train_images_per_s']:.2f}",
                     report["tlp_fp32_test_accuracy"]])
    rows.append([f"tlp finetune, defaults ({report['tlp_precision']})", report["tlp_train_images_per_s"],
                 f"{report['speedup']:.2f}", report["tlp_test_accuracy"]])
    if "limit_train_images_per_s" in report:
        rows.append(["limit: bare step on decoded tensors (fp32)", report["limit_train_images_per_s"],
                     f"{report['limit_train_images_per_s'] / report['tutorial_train_images_per_s']:.2f}", "-"])
    s = report["settings"]
    lines = [f"{s['data']}: {s['n_train']} training / {s['n_test']} test images, {s['model']} at {s['image_size']} px, "
             f"batch {s['batch_size']}, {s['epochs']} epochs, every layer trained",
             format_table(rows, ["variant", "train img/s (median)", "x tutorial", "test accuracy"]),
             f"targets: speedup >= {TARGETS['speedup_at_least']} -> {report['targets_met']['speedup']}; "
             f"accuracy within {TARGETS['accuracy_gap_points_at_most']} points -> {report['targets_met']['accuracy']}"]
    if "ratio_tlp_vs_limit" in report:
        lines.append(f"tlp (fp32) / limit {report['ratio_tlp_vs_limit']:.2f} (target >= 0.85) -> "
                     f"{report['targets_met']['vs_limit']}")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, required=True, help="write the report here")
    parser.add_argument("--data", default=str(SHARED_DATA) if SHARED_DATA.is_dir() else "digits",
                        help="ImageFolder or built-in data set to sample from (default: the shared sign-language "
                             "digits if present, else digits)")
    parser.add_argument("--n-train", type=int, default=320, help="training images (default: %(default)s)")
    parser.add_argument("--n-test", type=int, default=200, help="test images (default: %(default)s)")
    parser.add_argument("--image-size", type=int, default=128, help="(default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32, help="(default: tlp's, %(default)s)")
    parser.add_argument("--epochs", type=int, default=5, help="(default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-fp32", action="store_true", help="skip the tlp fp32 variant")
    parser.add_argument("--no-limit", action="store_true", help="skip the bare training-step limit")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    busy_before = cpu_busy_fraction()
    if busy_before is not None and busy_before > 0.2:
        print(f"warning: {busy_before:.0%} of the CPU is busy before starting; other processes will skew the numbers")
    work = Path(tempfile.mkdtemp(prefix="tlp-bench-finetune-"))
    try:
        train_dir, val_dir, data_name = materialise(args.data, work, args.n_train, args.n_test, args.seed)
        print(f"data: {data_name}, {args.n_train} train / {args.n_test} test images in {work}", flush=True)
        tutorial = run_tutorial(train_dir, val_dir, args.image_size, args.batch_size, args.epochs, args.seed)
        tune_cpu_allocator()  # what tlp.finetune does first; the limit must run under it too
        limit = None if args.no_limit else run_limit(train_dir, args.image_size, args.batch_size, args.seed)
        tlp = run_tlp(train_dir, val_dir, args.image_size, args.batch_size, args.epochs, args.seed, "auto")
        tlp_fp32 = None
        if not args.no_fp32 and tlp["precision"] != "fp32":
            tlp_fp32 = run_tlp(train_dir, val_dir, args.image_size, args.batch_size, args.epochs, args.seed, "fp32")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = build_report(args, data_name, tutorial, tlp, tlp_fp32, (busy_before, cpu_busy_fraction()), limit)
    print()
    print(format_report(report))
    write_json(args.json, report)
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
