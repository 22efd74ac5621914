"""Model registry, real weights, layer presets and one-pass taps, over every family."""

from __future__ import annotations


import pytest
import torch
from PIL import Image
from sklearn.datasets import load_sample_image

from tlp import FeatureFile, extract
from tlp.cli import main
from tlp.errors import TlpInputError
from tlp.layers import build_tap_extractor, preset_nodes, resolve_taps
from tlp.families import list_families
from tlp.models import imagenet_categories, resolve_model
from tlp.pooling import pool, pooled_dim

# One architecture per registered family (random init: no download needed).
FAMILY_EXAMPLES = {
    "resnet": "resnet18",
    "regnet": "regnet_x_400mf",
    "vgg": "vgg11",
    "alexnet": "alexnet",
    "googlenet": "googlenet",
    "mobilenet": "mobilenet_v3_small",
    "efficientnet": "efficientnet_b0",
    "convnext": "convnext_tiny",
    "densenet": "densenet121",
}


# Top-1 of scikit-learn's two sample photos. The flower is a close-up of florets that
# lite1 and lite2 call "honeycomb" (lite2 with p = 0.33; lite1 is unsure at p = 0.04, so
# it is not pinned); their logits equal those of the weights' own architecture
# (efficientnet-lite-pytorch, checked by hand: max difference 0.0 on random inputs).
EMBEDDED_TOP1 = {
    "efficientnet_lite0": {"china": "palace", "flower": "daisy"},
    "efficientnet_lite1": {"china": "palace"},
    "efficientnet_lite2": {"china": "palace", "flower": "honeycomb"},
}


@pytest.mark.parametrize("model", sorted(EMBEDDED_TOP1))
def test_embedded_models_have_real_imagenet_weights(tmp_path, model):
    data = tmp_path / "photos"
    for name in ("china", "flower"):
        (data / name).mkdir(parents=True)
        Image.fromarray(load_sample_image(f"{name}.jpg")).save(data / name / f"{name}.jpg", quality=95)
    result = extract(data, model=model, layers=("logits",), dtype="float32", precision="fp32",
                     cache_dir=tmp_path / "c", workers=0, progress=False)
    categories = imagenet_categories()
    with FeatureFile(result.path) as features:
        logits = features.load("logits")
        top1 = {path.split("/")[0]: categories[int(row.argmax())] for path, row in zip(features.paths, logits)}
    assert {name: top1[name] for name in EMBEDDED_TOP1[model]} == EMBEDDED_TOP1[model]


@pytest.mark.parametrize("model", sorted(EMBEDDED_TOP1))
def test_embedded_preprocessing_is_timms_pretrained_config(model):
    import timm

    config = timm.get_pretrained_cfg(f"tf_{model}").to_dict()
    prep = resolve_model(model).preprocessing
    assert prep.crop_size == config["input_size"][-1]
    assert prep.resize_size == int(config["input_size"][-1] / config["crop_pct"])
    assert (prep.interpolation, prep.mean, prep.std) == (config["interpolation"], config["mean"], config["std"])


@pytest.mark.parametrize("family,arch", sorted(FAMILY_EXAMPLES.items()))
def test_family_presets_resolve_to_taps_with_expected_strides(family, arch):
    spec = resolve_model(arch, weights="none")
    assert spec.family == family
    presets = preset_nodes(spec)
    taps = resolve_taps(spec, ["early", "mid", "late", "penultimate", "logits"])
    extractor = build_tap_extractor(spec, spec.build(), taps)
    with torch.inference_mode():
        outputs = extractor(torch.zeros(1, 3, 128, 128))
    sides = {name: outputs[presets[name]].shape[-1] for name in ("early", "mid", "late")}
    assert sides["early"] > sides["mid"] > sides["late"]
    assert outputs[presets["logits"]].shape == (1, 1000)
    assert outputs[presets["penultimate"]].ndim == 2


def test_every_registered_family_has_an_example():
    assert set(list_families()) - {"timm_efficientnet", "timm_resnet"} == set(FAMILY_EXAMPLES)


@pytest.mark.parametrize("arch", ["efficientnet_lite0", "resnet18"])
def test_multi_tap_pass_equals_single_tap_passes(arch):
    spec = resolve_model(arch, weights=None if arch == "efficientnet_lite0" else "none")
    model = spec.build()
    taps = resolve_taps(spec, ["early", "mid", "late", "logits"])
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        together = build_tap_extractor(spec, model, taps)(x)
        for tap in taps:
            alone = build_tap_extractor(spec, model, [tap])(x)
            torch.testing.assert_close(alone[tap.node], together[tap.node], rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["efficientnet_lite0", "resnet18", "vgg11", "mobilenet_v3_small", "convnext_tiny",
                                  "densenet121"])
def test_taps_on_modules_give_the_traced_graphs_numbers_without_running_past_the_deepest(arch):
    """Taps that name modules (the presets, but for ``flatten`` and DenseNet's final
    ``relu``) are read by hooks on the network as it is; every value equals the torch.fx
    feature extractor's, and nothing after the deepest tap runs."""
    import timm.models
    import torchvision.models.feature_extraction

    spec = resolve_model(arch, weights=None if arch == "efficientnet_lite0" else "none")
    model = spec.build()
    modules = dict(model.named_modules())
    taps = [tap for tap in resolve_taps(spec, ["early", "mid", "late", "penultimate", "logits"])
            if tap.node in modules]
    create = (timm.models.create_feature_extractor if spec.source in ("timm", "embedded")
              else torchvision.models.feature_extraction.create_feature_extractor)
    traced = create(model, return_nodes={tap.node: tap.node for tap in taps}).eval()
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = traced(x)
        hooked = build_tap_extractor(spec, model, taps)
        assert not isinstance(hooked, torch.fx.GraphModule)
        got = hooked(x)
        assert set(got) == set(expected)
        for node in expected:
            torch.testing.assert_close(got[node], expected[node], rtol=0, atol=0)
        calls = []
        early = taps[0]  # after it, the classifier must not run
        last = list(modules)[-1]
        handle = modules[last].register_forward_hook(lambda *_: calls.append(last))
        build_tap_extractor(spec, model, [early])(x)
        handle.remove()
    assert calls == []
    assert not model._forward_hooks and not any(m._forward_hooks for m in modules.values())


def test_missing_weights_say_where_to_put_the_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(TlpInputError, match=r"put resnet18-f37072fd\.pth .* at .*checkpoints"):
        resolve_model("resnet18")
    assert main(["extract", "digits", "--model", "resnet18", "--cache-dir", str(tmp_path / "c")]) == 2
    assert "--download" in capsys.readouterr().err


def test_weights_from_file_and_bad_names(tmp_path):
    spec = resolve_model("resnet18", weights="none")
    state = spec.build().state_dict()
    with torch.no_grad():
        state["fc.bias"].fill_(1.5)
    path = tmp_path / "mine.pth"
    torch.save(state, path)
    from_file = resolve_model("resnet18", weights=str(path))
    assert from_file.weights_id == "file:mine.pth"
    assert from_file.weights_sha256 != spec.weights_sha256
    assert torch.equal(from_file.build().fc.bias, torch.full((1000,), 1.5))
    with pytest.raises(TlpInputError, match="unknown model 'resnet5000'"):
        resolve_model("resnet5000")
    with pytest.raises(TlpInputError, match="has no weights 'IMAGENET9K'"):
        resolve_model("resnet50:IMAGENET9K", weights="none")
    wrong = tmp_path / "wrong.pth"
    torch.save(resolve_model("alexnet", weights="none").build().state_dict(), wrong)
    with pytest.raises(TlpInputError, match="does not fit resnet18"):
        resolve_model("resnet18", weights=str(wrong)).build()


def test_random_init_is_reproducible():
    a = resolve_model("resnet18", weights="none")
    assert a.weights_sha256 == resolve_model("resnet18", weights="none").weights_sha256
    torch.testing.assert_close(a.build().conv1.weight, a.build().conv1.weight, rtol=0, atol=0)


def test_preprocessing_comes_from_weights_and_image_size_overrides():
    lite = resolve_model("efficientnet_lite0")
    assert (lite.preprocessing.mean, lite.preprocessing.std) == ((0.5,) * 3, (0.5,) * 3)
    assert lite.preprocessing.interpolation == "bicubic"
    resnet = resolve_model("resnet50:IMAGENET1K_V2", weights="none")
    assert (resnet.preprocessing.resize_size, resnet.preprocessing.crop_size) == (232, 224)
    small = resolve_model("efficientnet_lite0", image_size=96).preprocessing
    assert small.crop_size == 96 and small.resize_size == int(96 / (224 / 256))


def test_layers_command_lists_presets_and_nodes(capsys):
    assert main(["layers", "efficientnet_lite0"]) == 0
    out = capsys.readouterr().out
    assert "early" in out and "blocks.2" in out and "bn2" in out and "stride" in out
    assert main(["layers", "resnet18"]) == 0  # no weights present: the graph is listed anyway
    assert "layer4" in capsys.readouterr().out


@pytest.mark.parametrize("name,expected", [("avg", 8), ("max", 8), ("avgmax", 16), ("grid2", 32)])
def test_pooling_shapes_and_values(name, expected):
    x = torch.arange(2 * 8 * 4 * 4, dtype=torch.float32).view(2, 8, 4, 4)
    out = pool(x.to(torch.bfloat16), name)
    assert out.shape == (2, expected) and out.dtype == torch.float32
    assert pooled_dim((8, 4, 4), name) == expected
    if name == "avg":
        torch.testing.assert_close(out, x.to(torch.bfloat16).float().mean(dim=(2, 3)))
    if name == "grid2":
        assert out[0, 0] == x[0, 0, :2, :2].mean()
