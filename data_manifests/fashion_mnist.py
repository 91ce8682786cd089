"""Fashion-MNIST (IDX files) -> PNG ImageFolder trees for the demo.

The pipeline reads images through manifests of ImageFolder trees, so the demo
dataset is turned into one rather than given a special loader: the demo then
exercises exactly the path a real dataset takes.

Output: ``OUT/train/<class>/<index>.png`` and ``OUT/test/...``; ``index`` is
the image's position in the IDX file, zero-padded so path order is file order.
A split is written into a temporary folder and renamed into place after its
completion marker (``.complete.json``, hidden so manifest builds ignore it), so
an interrupted run never leaves a tree that looks complete.
"""
from __future__ import annotations

import gzip
import json
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from common.errors import PipelineError
from data_manifests.build import build_manifest

CLASS_NAMES = (
    "T-shirt_top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle_boot",
)  # fmt: skip
SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
MARKER = ".complete.json"
_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension
_INSTALL_HINT = "install it with `apt-get install -y dataset-fashion-mnist`"


class FashionMnistError(PipelineError):
    """The Fashion-MNIST source files are missing or malformed."""


def prepare_fashion_mnist(
    source_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    train_limit: int | None = None,
    test_limit: int | None = None,
) -> tuple[Path, Path]:
    """Write the train and test ImageFolder trees; return (train_root, test_root).

    A limit keeps a class-balanced, deterministic subset: the first
    ``limit // 10`` images of each class in file order (the remainder goes to
    the lowest class indices). A split already complete with the same source
    and limit is left alone.
    """
    out_dir = Path(out_dir)
    train = prepare_split(source_dir, "train", out_dir / "train", train_limit)
    return train, prepare_split(source_dir, "test", out_dir / "test", test_limit)


def prepare_split(source_dir: str | os.PathLike, split: str, split_dir: str | os.PathLike, limit: int | None = None,
                  skip: int = 0) -> Path:
    """One split (``train`` or ``test``) as an ImageFolder tree in ``split_dir``; returns it.

    ``limit``: the class-balanced subset of ``prepare_fashion_mnist``, taken after the first ``skip``
    class-balanced images (``balanced_subset``), so that two subsets can be disjoint.
    """
    if split not in SPLIT_FILES:
        raise FashionMnistError(f"unknown split {split!r}: use {' or '.join(SPLIT_FILES)}")
    if limit is not None and limit < len(CLASS_NAMES):
        raise FashionMnistError(f"{split} limit {limit} is below one image per class ({len(CLASS_NAMES)})")
    if skip < 0:
        raise FashionMnistError(f"{split} skip {skip} is negative")
    images_file, labels_file = (_find(Path(source_dir), name) for name in SPLIT_FILES[split])
    return _write_split(Path(split_dir), images_file, labels_file, limit, skip)


def subset_manifest(source_dir: str | os.PathLike, data_dir: str | os.PathLike, split: str, images: int,
                    progress: bool = False, skip: int = 0) -> str:
    """PNG tree + manifest of the first ``images`` (class-balanced) of ``split`` -> the manifest's path.

    ``skip``: start after the first ``skip`` class-balanced images, so that teachers can learn from
    images other than the students' (the students' ``subset_manifest(..., N)`` and the teachers'
    ``subset_manifest(..., M, skip=N)`` share no image).

    One folder per split, size and skip (``DATA_DIR/{split}-{images}[-skip{skip}]``), so a
    manifest is never paired with another tree and runs of the same subset share it; both
    steps are skipped when already complete.
    """
    split_dir = Path(data_dir) / (f"{split}-{images}" + (f"-skip{skip}" if skip else ""))
    root = prepare_split(source_dir, split, split_dir / "images", limit=images, skip=skip)
    path = split_dir / "manifest.parquet"
    if not path.exists():
        after = f" after the first {skip}" if skip else ""
        build_manifest(root, path, description=f"Fashion-MNIST {split}, {images} images{after}", progress=progress)
    return str(path)


def _find(source_dir: Path, name: str) -> Path:
    for candidate in (source_dir / name, source_dir / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise FashionMnistError(f"Fashion-MNIST not found in {source_dir} (no {name}[.gz]): {_INSTALL_HINT}")


def _write_split(split_dir: Path, images_file: Path, labels_file: Path, limit: int | None, skip: int = 0) -> Path:
    identity = {
        "images": images_file.name,
        "labels": labels_file.name,
        "images_bytes": images_file.stat().st_size,
        "labels_bytes": labels_file.stat().st_size,
        "limit": limit,
        **({"skip": skip} if skip else {}),  # absent when 0: trees written before the option stay complete
    }
    try:
        if json.loads((split_dir / MARKER).read_text()).get("source") == identity:
            return split_dir
    except (OSError, json.JSONDecodeError):
        pass  # no complete tree there yet

    images = read_idx(images_file, _IMAGES_MAGIC)
    labels = read_idx(labels_file, _LABELS_MAGIC)
    if images.shape[0] != labels.shape[0]:
        raise FashionMnistError(
            f"{images_file} holds {images.shape[0]} images but {labels_file} holds {labels.shape[0]} labels"
        )
    if labels.size and labels.max() >= len(CLASS_NAMES):
        raise FashionMnistError(f"{labels_file}: label {labels.max()} outside 0..{len(CLASS_NAMES) - 1}")
    selected = balanced_subset(labels, limit, skip)
    if skip and limit is not None and len(selected) < limit:  # the skipped images left too few
        raise FashionMnistError(f"{images_file}: {limit} class-balanced images after the first {skip} need more "
                                f"than the {labels.size} it holds; lower the images or the skip")

    tmp = split_dir.with_name(f".{split_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    for name in CLASS_NAMES:
        (tmp / name).mkdir(parents=True)
    width = max(5, len(str(images.shape[0] - 1)))
    for index in selected:
        Image.fromarray(images[index]).save(tmp / CLASS_NAMES[labels[index]] / f"{index:0{width}d}.png")
    marker = {"source": identity, "num_images": len(selected), "class_names": list(CLASS_NAMES)}
    (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    if split_dir.exists():
        shutil.rmtree(split_dir)
    os.replace(tmp, split_dir)
    return split_dir


def balanced_subset(labels: np.ndarray, limit: int | None, skip: int = 0) -> np.ndarray:
    """Indices of the first ``limit // 10`` images of each class (+1 for the first ``limit % 10``),
    after the images ``balanced_subset(labels, skip)`` takes: the two subsets are disjoint."""
    if skip == 0 and (limit is None or limit >= labels.size):
        return np.arange(labels.size)

    def per_class(n: int, c: int) -> int:
        quotient, extra = divmod(n, len(CLASS_NAMES))
        return quotient + (1 if c < extra else 0)

    chosen = []
    for c in range(len(CLASS_NAMES)):
        start = per_class(skip, c)
        stop = None if limit is None else start + per_class(limit, c)
        chosen.append(np.flatnonzero(labels == c)[start:stop])
    return np.sort(np.concatenate(chosen))


def read_idx(path: Path, expected_magic: int) -> np.ndarray:
    """Parse an IDX file (optionally gzipped), checking its magic number and size."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise FashionMnistError(f"{path}: cannot read ({e}); reinstall: {_INSTALL_HINT}") from e
    if len(data) < 4:
        raise FashionMnistError(f"{path}: too short to be an IDX file ({len(data)} bytes)")
    magic = int.from_bytes(data[:4], "big")
    if magic != expected_magic:
        raise FashionMnistError(f"{path}: IDX magic number {magic:#010x}, expected {expected_magic:#010x}")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise FashionMnistError(f"{path}: truncated IDX header")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape))
    if len(data) != expected:
        raise FashionMnistError(
            f"{path}: {len(data)} bytes, but an IDX array of shape {shape} needs {expected}; the file is damaged"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)
