"""Data sources: ImageFolder, CSV manifests (with path-escape checks) and digits."""

from __future__ import annotations

import pytest

from tlp import extract, load_dataset
from tlp.errors import TlpInputError

from helpers import FAST, write_images


def test_csv_manifest_relative_paths_and_numeric_label_order(tmp_path):
    images = write_images(tmp_path / "imgs", 4)
    manifest = tmp_path / "list.csv"
    manifest.write_text("path,label\n" + "".join(f"imgs/{p.name},{label}\n" for p, label in zip(images, [10, 2, 2, 10])))
    dataset = load_dataset(manifest)
    assert dataset.classes == ["2", "10"]
    assert [item.label for item in dataset.items] == [1, 0, 0, 1]
    assert dataset.items[0].path == "imgs/img_0000.jpg"


@pytest.mark.parametrize("bad", ["../outside.jpg", "/etc/passwd", "C:\\x.jpg", "file:///etc/passwd", "a\\b.jpg"])
def test_csv_rejects_paths_that_escape(tmp_path, bad):
    manifest = tmp_path / "list.csv"
    manifest.write_text(f"{bad},cat\n")
    with pytest.raises(TlpInputError, match=r"list\.csv:1"):
        load_dataset(manifest)


def test_symlink_out_of_the_folder_is_refused(tmp_path):
    outside = write_images(tmp_path / "outside", 1)[0]
    root = tmp_path / "data"
    write_images(root / "a", 2)
    (root / "a" / "link.jpg").symlink_to(outside)
    with pytest.raises(TlpInputError, match="outside the data folder"):
        load_dataset(root)
    dataset = load_dataset(root, on_error="skip")
    assert [s.path for s in dataset.skipped] == ["a/link.jpg"]


def test_missing_csv_file_follows_on_error(tmp_path):
    write_images(tmp_path / "imgs", 2)
    manifest = tmp_path / "list.csv"
    manifest.write_text("imgs/img_0000.jpg,a\nimgs/nope.jpg,b\nimgs/img_0001.jpg,b\n")
    with pytest.raises(TlpInputError, match="nope.jpg.*file not found"):
        load_dataset(manifest)
    dataset = load_dataset(manifest, on_error="skip")
    assert [(i.path, dataset.classes[i.label]) for i in dataset.items] == [
        ("imgs/img_0000.jpg", "a"), ("imgs/img_0001.jpg", "b")]


def test_folder_ignores_non_images_and_hidden_files(tmp_path):
    root = tmp_path / "data"
    write_images(root / "a", 2, fmt="PNG")
    (root / "a" / "notes.txt").write_text("hello")
    (root / "a" / ".DS_Store").write_bytes(b"\0")
    (root / ".hidden").mkdir()
    dataset = load_dataset(root)
    assert dataset.classes == ["a"] and len(dataset.items) == 2


def test_empty_or_wrong_data_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(TlpInputError, match="no class sub-folders"):
        load_dataset(tmp_path / "empty")
    with pytest.raises(TlpInputError, match="not a folder"):
        load_dataset(tmp_path / "nothing-here")


def test_csv_and_folder_give_same_features(tmp_path):
    root = tmp_path / "data"
    write_images(root / "a", 3)
    write_images(root / "b", 3, start=50)
    manifest = root / "list.csv"
    manifest.write_text("".join(f"{p.parent.name}/{p.name},{p.parent.name}\n" for p in sorted(root.glob("*/*.jpg"))))
    extract(root, cache_dir=tmp_path / "c", **FAST)
    from_csv = extract(manifest, cache_dir=tmp_path / "c", **FAST)
    assert from_csv.n_extracted == 0 and from_csv.n_reused == 6


def test_separate_test_labels_are_matched_by_class_name():
    from tlp.data import labels_by_class_name

    # The test folder lists its classes in another order: index 0 there is "dog".
    mapped = labels_by_class_name([0, 1, 1, 0], ["dog", "cat"], into=["cat", "dog", "owl"], source="test/")
    assert mapped.tolist() == [1, 0, 0, 1]
    with pytest.raises(TlpInputError, match=r"'test/' has classes not in the training data: emu"):
        labels_by_class_name([0], ["emu"], into=["cat", "dog"], source="test/")


def _numbered(labels):
    """A data set of one placeholder item per label (what `split` needs: labels and paths)."""
    from tlp.dataset import Dataset, Item

    return Dataset(name="numbered", kind="builtin", classes=[str(c) for c in sorted(set(labels))],
                   items=[Item(f"{i}.png", int(label), f"digest-{i}") for i, label in enumerate(labels)])


def test_one_stratified_split_for_sweep_finetune_and_run():
    """Where the fraction covers every class it is sklearn's stratified split; below that it
    still holds out as many images as there are classes (the sweep used to refuse;
    fine-tuning did this). `split` of a Dataset gives exactly those parts."""
    import numpy as np
    from sklearn.model_selection import train_test_split

    from tlp import split
    from tlp.data import stratified_split

    labels = np.repeat(np.arange(4), [30, 20, 12, 6])
    dataset = _numbered(labels)
    for fraction in (0.5, 0.25, 0.1):
        kept, held = stratified_split(labels, fraction, seed=3)
        plain_kept, plain_held = train_test_split(np.arange(len(labels)), test_size=fraction, stratify=labels,
                                                  random_state=3)
        assert held.tolist() == sorted(plain_held) and kept.tolist() == sorted(plain_kept)
        train, test = split(dataset, fraction, 3)
        assert [item.path for item in train.items] == [f"{i}.png" for i in kept]
        assert [item.path for item in test.items] == [f"{i}.png" for i in held]
    kept, held = stratified_split(labels, 0.02, seed=3)  # ceil(0.02 x 68) = 2 < 4 classes
    assert len(held) == 4 and len(kept) == 64 and set(labels[held]) <= {0, 1, 2, 3}
    with pytest.raises(TlpInputError, match="cannot hold out 0.5 of the data as val"):
        stratified_split(np.array([0, 0, 0, 1]), 0.5, seed=0, what="val")


def test_split_by_count_and_bad_test_values():
    """An integer --test is a count of images, as scikit-learn's test_size."""
    import numpy as np

    from tlp import split
    from tlp.data import parse_test

    dataset = _numbered(np.repeat(np.arange(3), 10))
    train, test = split(dataset, 6, seed=0)
    assert len(test.items) == 6 and len(train.items) == 24
    assert sorted(item.label for item in test.items) == [0, 0, 1, 1, 2, 2]
    assert split(dataset, None) == (dataset, None)
    for bad, message in [(1.5, "fraction between 0 and 1"), (0, "between 1 and 29"), (30, "between 1 and 29"),
                         (True, "a fraction, a count or a data set")]:
        with pytest.raises(TlpInputError, match=message):
            split(dataset, bad)
    assert [parse_test(v) for v in ("0.25", "10", "no/such/folder")] == [0.25, 10, "no/such/folder"]


def test_separate_test_set_gets_the_training_classes_before_any_forward_pass(tmp_path):
    """A test folder listing its classes in another order is relabelled by name; one with a
    class the training data lacks is refused by `split`, before anything is extracted."""
    from tlp import split

    train_root, test_root = tmp_path / "train", tmp_path / "test"
    for name in ("cat", "dog", "owl"):
        write_images(train_root / name, 2, start=10 * len(name))
    write_images(test_root / "dog", 2, start=500)
    write_images(test_root / "owl", 1, start=600)
    train, test = split(load_dataset(train_root), test_root)
    assert test.classes == ["cat", "dog", "owl"]
    assert [(item.path.split("/")[0], item.label) for item in test.items] == [("dog", 1), ("dog", 1), ("owl", 2)]
    write_images(test_root / "emu", 1, start=700)
    with pytest.raises(TlpInputError, match="has classes not in the training data: emu"):
        split(train, test_root)
