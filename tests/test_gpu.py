"""CUDA paths: autocast precisions, pinned-memory loading, fp16 training with a gradient
scaler. Skipped without a CUDA device; ``benchmarks/gpu_check.sh`` runs them on one.

What a user would notice: the GPU gives the CPU's features (within the precision's
rounding), workers with pinned memory give the same rows as threads, and an fp16
fine-tune trains, saves its scaler and resumes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tlp

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

# Lowest per-image cosine between CUDA and CPU features of the same images (lite0, 96 px):
# fp32 differs by kernel rounding only; bf16 keeps 8 mantissa bits, fp16 11.
MIN_COSINE = {"fp32": 0.9999, "bf16": 0.99, "fp16": 0.995}


def _features(result, layer: str = "late") -> np.ndarray:
    with tlp.FeatureFile(result.path) as cached:
        order = np.argsort(cached.paths)
        return cached.load(layer)[order]


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_cuda_features_match_the_cpu_within_the_precision(image_folder, tmp_path, precision):
    common = dict(image_size=96, layers=["mid", "late"], cache_dir=str(tmp_path / "cache"), progress=False)
    cpu = tlp.extract(str(image_folder), device="cpu", precision="fp32", **common)
    cuda = tlp.extract(str(image_folder), device="cuda", precision=precision, **common)
    assert cuda.path != cpu.path  # the device and precision are in the key
    for layer in ("mid", "late"):
        assert _cosine(_features(cpu, layer), _features(cuda, layer)).min() >= MIN_COSINE[precision]


def test_pinned_memory_workers_give_the_rows_of_threads(image_folder, tmp_path):
    common = dict(image_size=96, layers=["late"], device="cuda", precision="fp32", progress=False)
    threads = tlp.extract(str(image_folder), workers=0, cache_dir=str(tmp_path / "a"), **common)
    workers = tlp.extract(str(image_folder), workers=2, cache_dir=str(tmp_path / "b"), **common)
    np.testing.assert_allclose(_features(threads), _features(workers), rtol=1e-5, atol=1e-6)


def test_fp16_finetune_trains_with_a_scaler_and_resumes(image_folder, tmp_path):
    settings = dict(image_size=64, batch_size=8, device="cuda", precision="fp16", seed=0, progress=False,
                    val=0.25, out=str(tmp_path / "ft"))
    first = tlp.finetune(str(image_folder), epochs=2, **settings)
    assert all(np.isfinite(epoch["train_loss"]) for epoch in first.history)
    assert first.val_accuracy is not None
    checkpoints = sorted((tmp_path / "ft" / "checkpoints").glob("*.pt"))
    assert checkpoints
    saved = torch.load(checkpoints[-1], map_location="cpu", weights_only=True)
    assert saved["scaler"] and "scale" in saved["scaler"]  # the gradient scaler's state is kept
    again = tlp.finetune(str(image_folder), epochs=2, **settings)  # the same command: resumes, trains nothing
    assert again.resumed_from_epoch == 2
    assert again.val_accuracy == first.val_accuracy


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_two_gpus_train_with_nccl_like_one_gpu_of_the_global_batch(image_folder, tmp_path):
    """torchrun on 2 GPUs (nccl, cuda:LOCAL_RANK each) against one GPU of batch 2 x 8: the
    same training to rounding (tests/test_ddp.py states the CPU's figures)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    options = dict(image_size=64, epochs=2, precision="fp32", seed=0, case="4", val=0.25)
    one = tlp.finetune(str(image_folder), batch_size=16, device="cuda", progress=False, **options)
    out = tmp_path / "two"
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "tlp", "finetune", str(image_folder),
               "--model", "efficientnet_lite0", "--batch-size", "8", "--out", str(out), "--quiet",
               *[f"--{k.replace('_', '-')}={v}" for k, v in options.items()]]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    spec = json.loads((out / "model.json").read_text())
    got = torch.load(out / spec["finetuned"]["file"], weights_only=True)
    expected = {k: v.detach().cpu() for k, v in one.network.state_dict().items()}
    floats = [k for k in expected if expected[k].is_floating_point()]
    differing = sum(int((~torch.isclose(got[k], expected[k], rtol=1e-3, atol=1e-4)).sum()) for k in floats)
    assert differing / sum(expected[k].numel() for k in floats) <= 0.05
