"""BatchNorm folded into the convolutions for frozen passes (the default, ``--no-fold-bn``
to turn it off).

What a user would notice: the same features to float rounding, a cache key that says
which computation made them (and, turned off, the key tlp 0.5 gave), a head trained on
folded features predicting with the same computation, and a network whose modules do not
run in the order they are registered left unfolded rather than computed wrongly.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from torch import nn

import tlp
from tlp.cli import main
from tlp.folding import fold_batchnorm


def _extract(folder, cache, **options):
    result = tlp.extract(str(folder), layers=["early", "mid", "late"], pool="avg", image_size=96, dtype="float32",
                         cache_dir=str(cache), progress=False, **options)
    with tlp.FeatureFile(result.path) as cached:
        rows = {name: cached.load(name).astype(np.float64) for name in ("early", "mid", "late")}
        return result, rows, cached.attrs


def _min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).min())


def test_folded_features_equal_unfolded_ones_to_rounding_under_their_own_key(image_folder, tmp_path):
    # efficientnet_lite0's real weights: 49 BatchNorms folded.
    folded, folded_rows, folded_attrs = _extract(image_folder, tmp_path / "cache", precision="fp32")
    plain, plain_rows, plain_attrs = _extract(image_folder, tmp_path / "cache", precision="fp32", fold_bn=False)
    assert folded.key != plain.key
    assert bool(folded_attrs["fold_bn"]) and not bool(plain_attrs["fold_bn"])
    assert "fold_bn" in folded_attrs["fingerprint_spec"]["extractor"]
    assert "fold_bn" not in plain_attrs["fingerprint_spec"]["extractor"]  # the key entries of tlp 0.5
    for name in folded_rows:
        a, b = folded_rows[name], plain_rows[name]
        assert _min_cosine(a, b) >= 0.9999, name
        assert np.abs(a - b).max() <= 1e-3 * np.abs(b).max(), name


def test_bf16_folded_features_are_as_close_to_fp32_as_bf16_unfolded_ones(image_folder, tmp_path):
    # bf16 rounds the folded weights instead of the BatchNorm's inputs: measured min cosine
    # to fp32 0.993 folded, 0.993-0.994 unfolded, per layer.
    _, reference, _ = _extract(image_folder, tmp_path / "cache", precision="fp32", fold_bn=False)
    _, folded, _ = _extract(image_folder, tmp_path / "cache", precision="bf16")
    _, plain, _ = _extract(image_folder, tmp_path / "cache", precision="bf16", fold_bn=False)
    for name in reference:
        assert _min_cosine(folded[name], reference[name]) >= _min_cosine(plain[name], reference[name]) - 0.005, name
        assert _min_cosine(folded[name], reference[name]) >= 0.98, name


def test_no_fold_bn_flag_on_the_command_line(image_folder, tmp_path, capsys):
    reports = {}
    for flag in ([], ["--no-fold-bn"]):
        path = tmp_path / f"report{len(flag)}.json"
        assert main(["extract", str(image_folder), "--image-size", "64", "--weights", "none", "--layers", "late",
                     "--cache-dir", str(tmp_path / "cache"), "--report", str(path), "--quiet", *flag]) == 0
        reports[len(flag)] = json.loads(path.read_text())
    assert reports[0]["key"] != reports[1]["key"]


def test_a_head_on_folded_features_predicts_from_the_rows_it_was_trained_on(image_folder, tmp_path):
    out = tmp_path / "model"
    result = tlp.sweep(str(image_folder), image_size=64, layers=["late"], heads=["softmax"], cv=2, out=str(out),
                       cache_dir=str(tmp_path / "cache"), progress=False)
    spec = json.loads((out / "model.json").read_text())
    parts = spec.get("parts") or [spec]
    assert all(part.get("fold_bn") is True for part in parts)
    with tlp.FeatureFile(result.extract.path) as cached:
        rows = dict(zip(cached.paths, cached.load("late")))
    images = sorted(rows)[:4]
    predicted = tlp.predict(str(out), [str(image_folder / path) for path in images], top_k=3)
    expected = result.best_estimator.predict_proba(np.stack([rows[path] for path in images]).astype(np.float32))
    for row, probabilities in zip(predicted.rows, expected):
        assert np.allclose(sorted(row["probabilities"], reverse=True), np.sort(probabilities)[::-1], atol=1e-5)
    # A model.json whose fold_bn is not a boolean is refused, naming the file.
    for part in parts:
        part["fold_bn"] = "yes"
    (out / "model.json").write_text(json.dumps(spec))
    with pytest.raises(tlp.TlpInputError, match="model.json.*fold_bn must be true or false"):
        tlp.predict(str(out), [str(image_folder / images[0])])


class _NormBeforeConv(nn.Module):
    """Registers a convolution, then a BatchNorm, but runs the BatchNorm first."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        with torch.no_grad():
            self.bn.running_mean.fill_(0.5)
            self.bn.running_var.fill_(4.0)
            self.bn.weight.fill_(2.0)

    def forward(self, x):
        return self.conv(self.bn(x))


def test_a_network_that_does_not_run_in_registration_order_is_left_unfolded(caplog):
    network = _NormBeforeConv().eval()
    probe = torch.randn(2, 3, 16, 16)
    before = network(probe)
    with caplog.at_level(logging.WARNING):
        folded, n_folded = fold_batchnorm(network, probe_size=16)
    assert n_folded == 0 and folded is network
    assert "running it unfolded" in caplog.text
    assert torch.equal(network(probe), before)  # the network itself is never changed


def test_folding_a_torchvision_network_keeps_its_outputs_and_leaves_it_unchanged():
    from torchvision.models import resnet18

    torch.manual_seed(0)
    network = resnet18(weights=None)
    for module in network.modules():  # non-trivial statistics, so folding has work to do
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    network.eval()
    probe = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = network(probe)
        folded, n_folded = fold_batchnorm(network, probe_size=64)
        after = folded(probe)
    assert n_folded == 20  # every BatchNorm of resnet18 follows its convolution
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert torch.allclose(after, before, rtol=1e-4, atol=1e-4 * float(before.abs().max()))
    assert any(isinstance(m, nn.BatchNorm2d) for m in network.modules())


class _FixedSize(nn.Module):
    """A convolution and BatchNorm that only accept 96-pixel inputs (as some hybrids do)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        with torch.no_grad():
            self.bn.running_var.fill_(9.0)

    def forward(self, x):
        if x.shape[-1] != 96:
            raise ValueError("this network takes 96-pixel inputs")
        return self.bn(self.conv(x))


def test_a_network_that_refuses_the_small_probe_is_folded_at_its_own_size():
    network = _FixedSize().eval()
    folded, n_folded = fold_batchnorm(network, probe_size=96)
    probe = torch.randn(2, 3, 96, 96)
    assert n_folded == 1
    assert torch.allclose(folded(probe), network(probe), atol=1e-5)


def test_folding_needs_eval_mode():
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(_NormBeforeConv().train())
