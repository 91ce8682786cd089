"""Fashion-MNIST adapter on tiny synthetic IDX files (no real dataset needed)."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from data_manifests.build import build_manifest
from data_manifests.cli import fashion_mnist_command
from data_manifests.fashion_mnist import CLASS_NAMES, MARKER, FashionMnistError, prepare_fashion_mnist


def _idx(array: np.ndarray) -> bytes:
    magic = 0x0800 | array.ndim
    header = magic.to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) * 3 % 10).astype(np.uint8)  # every class, interleaved
    return images, labels


def write_source(source: Path, n_train: int = 40, n_test: int = 20) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Train files gzipped, test files plain: the adapter must read both."""
    source.mkdir(parents=True, exist_ok=True)
    splits = {"train": _split(n_train, 0), "t10k": _split(n_test, 1)}
    for prefix, (images, labels) in splits.items():
        for kind, array in (("images-idx3-ubyte", images), ("labels-idx1-ubyte", labels)):
            name = f"{prefix}-{kind}"
            if prefix == "train":
                (source / f"{name}.gz").write_bytes(gzip.compress(_idx(array)))
            else:
                (source / name).write_bytes(_idx(array))
    return splits


def _tree_contents(root: Path) -> dict[int, tuple[int, np.ndarray]]:
    """index -> (label, pixels) read back from the PNG tree."""
    found = {}
    for label, name in enumerate(CLASS_NAMES):
        for png in (root / name).glob("*.png"):
            found[int(png.stem)] = (label, np.asarray(Image.open(png)))
    return found


def test_writes_trees_with_correct_labels_and_pixels(tmp_path: Path):
    splits = write_source(tmp_path / "src")
    train_root, test_root = prepare_fashion_mnist(tmp_path / "src", tmp_path / "out")
    assert (train_root, test_root) == (tmp_path / "out" / "train", tmp_path / "out" / "test")
    for root, (images, labels) in ((train_root, splits["train"]), (test_root, splits["t10k"])):
        assert sorted(p.name for p in root.iterdir() if p.is_dir()) == sorted(CLASS_NAMES)
        found = _tree_contents(root)
        assert sorted(found) == list(range(len(labels)))
        for index, (label, pixels) in found.items():
            assert label == labels[index]
            np.testing.assert_array_equal(pixels, images[index])
        assert (root / MARKER).is_file()

    manifest = build_manifest(train_root, tmp_path / "train.parquet", progress=False)
    assert manifest.num_images == 40 and sorted(manifest.class_names) == sorted(CLASS_NAMES)
    for i, rel in enumerate(manifest.paths):
        assert manifest.class_names[manifest.labels[i]] == CLASS_NAMES[splits["train"][1][int(Path(rel).stem)]]


def test_limit_takes_first_images_of_each_class_and_reruns_are_idempotent(tmp_path: Path):
    splits = write_source(tmp_path / "src")
    train_root, _ = prepare_fashion_mnist(tmp_path / "src", tmp_path / "out", train_limit=23, test_limit=10)
    labels = splits["train"][1]
    found = _tree_contents(train_root)
    expected = [i for c in range(10) for i in np.flatnonzero(labels == c)[: 2 + (c < 3)]]
    assert sorted(found) == sorted(expected)

    marker_mtime = (train_root / MARKER).stat().st_mtime_ns
    prepare_fashion_mnist(tmp_path / "src", tmp_path / "out", train_limit=23, test_limit=10)
    assert (train_root / MARKER).stat().st_mtime_ns == marker_mtime  # complete: left alone

    prepare_fashion_mnist(tmp_path / "src", tmp_path / "out", train_limit=10, test_limit=10)
    assert len(_tree_contents(train_root)) == 10  # different limit: rebuilt, old files gone


def test_missing_source_names_the_install_command(tmp_path: Path):
    with pytest.raises(FashionMnistError, match="apt-get install -y dataset-fashion-mnist") as err:
        prepare_fashion_mnist(tmp_path / "nowhere", tmp_path / "out")
    assert f"Fashion-MNIST not found in {tmp_path / 'nowhere'}" in str(err.value)

    result = CliRunner().invoke(fashion_mnist_command, ["--source", str(tmp_path / "nowhere"), "--out", str(tmp_path)])
    assert result.exit_code == 1 and "dataset-fashion-mnist" in result.output
    assert "Traceback" not in result.output


def test_malformed_idx_is_named(tmp_path: Path):
    write_source(tmp_path / "src")
    labels_file = tmp_path / "src" / "t10k-labels-idx1-ubyte"
    labels_file.write_bytes(labels_file.read_bytes()[:-3])
    with pytest.raises(FashionMnistError, match="t10k-labels-idx1-ubyte: .* needs"):
        prepare_fashion_mnist(tmp_path / "src", tmp_path / "out")

    labels_file.write_bytes(_idx(np.zeros((20, 28, 28), np.uint8)))  # images where labels belong
    with pytest.raises(FashionMnistError, match="t10k-labels-idx1-ubyte: IDX magic number"):
        prepare_fashion_mnist(tmp_path / "src", tmp_path / "out")
