"""Build a manifest from an ImageFolder tree (``ROOT/<class_name>/.../<image>``).

Class index = position of the class folder in sorted order (torchvision's
ImageFolder rule), image_id = position of the relative path in sorted order,
so two builds of the same tree give the same manifest and content hash.

Every file is read once, hashed and fully decoded, because a bad file found
during a multi-hour teacher-cache run costs far more than finding it here.
The whole tree is scanned before anything is decided, so one run reports every
problem. Nothing is dropped silently: by default any problem fails the build;
with ``skip_bad`` each rejected file is listed with its reason in
``<out stem>.rejects.jsonl`` next to the manifest.

Decisions on what counts as a problem:

* hidden files and folders (name starts with ``.``) are ignored, not reported;
* any symlink is rejected: the manifest must describe the bytes under ROOT,
  and a link can point outside it or change target after the build;
* a file with a non-image extension inside a class folder, or any file
  directly under ROOT, is rejected rather than ignored;
* a second file with the same sha256 as an earlier one (in path order) is
  rejected, naming the kept one: duplicates leak between splits and bias
  the target statistics;
* an empty class folder is a problem; with ``skip_bad`` the class keeps its
  index and name with 0 images, so class indices still match the other splits
  and the teachers' outputs;
* a tree without any valid image gives no manifest (a manifest has at least
  one image); duplicate paths and class names cannot come from one folder
  tree, and ``write_manifest`` refuses them from any other source;
* an ``--out`` that cannot be written (a folder, under a file, no permission,
  a read-only filesystem) is refused before any image is read.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from tqdm import tqdm

from common.errors import PipelineError
from common.images import ImageError, decoded_size
from common.locations import is_url, remove, write_bytes
from common.manifest import Manifest, ManifestRow, check_relative_path, load_manifest, write_manifest
from common.prefetch import prefetch

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"})
MAX_LISTED_PROBLEMS = 20
_WORKERS = min(32, (os.cpu_count() or 1) + 4)  # ThreadPoolExecutor's default: the threads mostly wait on reads
_IN_FLIGHT = 1024  # files read and not yet collected; bounds memory on huge trees
_OUT_HINT = "choose an --out in a folder you can write to"


class ManifestBuildError(PipelineError):
    """The input tree cannot be turned into a manifest; the message lists what to fix."""


@dataclass(frozen=True)
class Reject:
    path: str  # relative to the root, POSIX
    reason: str


def rejects_path(out: str | os.PathLike) -> Path | str:
    """Sidecar listing rejected inputs: ``M.parquet`` -> ``M.rejects.jsonl``, next to it (a path or URL)."""
    folder, _, name = str(out).rpartition("/")
    sidecar = f"{Path(name).stem}.rejects.jsonl"
    return f"{folder}/{sidecar}" if is_url(out) else Path(out).with_name(sidecar)


def build_manifest(
    root: str | os.PathLike,
    out: str | os.PathLike,
    skip_bad: bool = False,
    description: str = "",
    progress: bool = True,
) -> Manifest:
    """Scan, hash and decode every image under ``root``; write the manifest to ``out``."""
    root = _checked_root(Path(root))
    out = str(out) if is_url(out) else Path(out).absolute()  # images are local; the manifest may be a URL
    _check_writable(out)
    sidecar = rejects_path(out)
    written = {Path(p).resolve() for p in (out, sidecar) if not is_url(p)}  # outputs are not inputs
    class_names, candidates, rejects = _scan(root, exclude=written)

    inspected = _inspect_all(root, [rel for rel, _ in candidates], progress)
    rows: list[ManifestRow] = []
    first_with_digest: dict[str, str] = {}
    for (rel, label), result in zip(candidates, inspected):
        if isinstance(result, Reject):
            rejects.append(result)
            continue
        digest, size, (width, height) = result
        kept = first_with_digest.setdefault(digest, rel)
        if kept != rel:
            rejects.append(Reject(rel, f"duplicate content: same sha256 as {kept} (kept); remove one of the copies"))
            continue
        rows.append(ManifestRow(rel, label, width, height, size, digest))
    rejects.sort(key=lambda r: r.path)

    if rejects and not skip_bad:
        raise ManifestBuildError(_problem_report(root, rejects, sidecar))
    if not rows:
        raise ManifestBuildError(f"no valid images under {root}: nothing to write to {out}")

    write_manifest(rows, class_names, root, out, description=description)
    try:
        if rejects:
            lines = (json.dumps({"path": r.path, "reason": r.reason}, ensure_ascii=False) + "\n" for r in rejects)
            write_bytes(sidecar, "".join(lines).encode("utf-8"))
            print(f"skipped {len(rejects)} bad input(s) under {root}; listed in {sidecar}", file=sys.stderr)
        else:
            remove(sidecar)  # a stale list from an earlier build would mislead
    except OSError as e:
        raise ManifestBuildError(f"wrote {out} but cannot update {sidecar} ({e.strerror or e}); {_OUT_HINT}") from e
    return load_manifest(out)


def _check_writable(out: Path | str) -> None:
    """Refuse an --out that cannot be written before hashing the tree, which may take hours.

    Local paths only (an object store says no only when asked to write); the
    write itself still reports any failure this cannot foresee (disk full).
    """
    if is_url(out):
        return
    if out.is_dir():
        raise ManifestBuildError(f"--out {out} is a folder: name the manifest file, e.g. {out / 'train.parquet'}")
    folder = out.parent
    while not folder.exists() and folder != folder.parent:  # missing folders are created at write time
        folder = folder.parent
    if not folder.is_dir():
        raise ManifestBuildError(f"cannot write manifest {out}: {folder} is a file, not a folder; {_OUT_HINT}")
    # os.access says no on a read-only mount also for root, who may write anywhere else
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ManifestBuildError(f"cannot write manifest {out}: no permission to write in {folder}, or it is on a "
                                 f"read-only filesystem; {_OUT_HINT}")


def _checked_root(root: Path) -> Path:
    if not root.exists():
        raise ManifestBuildError(f"image root {root} does not exist")
    if not root.is_dir():
        raise ManifestBuildError(f"image root {root} is not a directory (expected ROOT/<class_name>/<image files>)")
    return root.resolve()


def _scan(root: Path, exclude: set[Path]) -> tuple[list[str], list[tuple[str, int]], list[Reject]]:
    """List class folders and candidate images (sorted); reject what cannot be an image."""
    rejects: list[Reject] = []
    class_names: list[str] = []
    for entry in _entries(root):
        if Path(entry.path) in exclude:
            continue
        if entry.is_symlink():
            rejects.append(_symlink_reject(entry.name, entry.path))
        elif entry.is_dir(follow_symlinks=False):
            class_names.append(entry.name)
        elif entry.is_file(follow_symlinks=False):
            rejects.append(
                Reject(entry.name, "file directly under the root, outside any class folder (layout: ROOT/<class>/<image>)")
            )
        else:
            rejects.append(Reject(entry.name, "not a regular file or directory"))
    if not class_names:
        raise ManifestBuildError(
            f"image root {root} has no class folders: expected ROOT/<class_name>/<image files> "
            "(hidden folders are ignored)"
        )

    candidates: list[tuple[str, int]] = []
    for label, name in enumerate(class_names):
        before = len(candidates)
        for rel, problem in _walk(root / name, name, exclude):
            if problem:
                rejects.append(Reject(rel, problem))
            else:
                candidates.append((rel, label))
        if len(candidates) == before:
            rejects.append(Reject(name, "empty class folder (no image files in it); add images or remove the folder"))
    candidates.sort()
    return class_names, candidates, rejects


def _walk(directory: Path, rel_dir: str, exclude: set[Path]) -> Iterator[tuple[str, str | None]]:
    """Yield (relative path, problem or None) for every non-hidden file below ``directory``."""
    for entry in _entries(directory):
        rel = f"{rel_dir}/{entry.name}"
        if Path(entry.path) in exclude:
            continue
        if entry.is_symlink():
            yield rel, _symlink_reject(rel, entry.path).reason
        elif entry.is_dir(follow_symlinks=False):
            yield from _walk(Path(entry.path), rel, exclude)
        elif not entry.is_file(follow_symlinks=False):
            yield rel, "not a regular file"
        elif Path(entry.name).suffix.lower() not in IMAGE_EXTENSIONS:
            yield rel, f"not an image file extension (accepted: {', '.join(sorted(IMAGE_EXTENSIONS))})"
        else:
            yield rel, _path_problem(rel)


def _entries(directory: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(directory) as it:
            return sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
    except OSError as e:
        raise ManifestBuildError(f"cannot list folder {directory} ({e.strerror or e}); check its permissions") from e


def _symlink_reject(rel: str, path: str) -> Reject:
    return Reject(rel, f"symbolic link (to {os.readlink(path)}); manifests record real files under the root only: "
                       "replace it with a copy of the file")


def _path_problem(rel: str) -> str | None:
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        return "file name is not valid UTF-8; rename it"
    problem = check_relative_path(rel)
    return f"unusable file name: {problem}; rename it" if problem else None


def _inspect_all(root: Path, rels: list[str], progress: bool) -> list[tuple[str, int, tuple[int, int]] | Reject]:
    """Hash and decode every file on threads (Pillow and hashlib release the GIL)."""
    inspected = prefetch(lambda rel: _inspect(root, rel), rels, workers=_WORKERS, depth=_IN_FLIGHT, name="inspect")
    return list(tqdm(inspected, total=len(rels), desc="checking images", unit="img", disable=not progress))


def _inspect(root: Path, rel: str) -> tuple[str, int, tuple[int, int]] | Reject:
    """(sha256, size in bytes, oriented (width, height)) of one file, or why it is bad."""
    try:
        data = (root / rel).read_bytes()
    except OSError as e:
        return Reject(rel, f"cannot read file ({e.strerror or e})")
    try:
        size = decoded_size(data, rel)  # an empty file is refused there too
    except ImageError as e:
        return Reject(rel, e.reason)
    return hashlib.sha256(data).hexdigest(), len(data), size


def _problem_report(root: Path, rejects: list[Reject], sidecar: Path | str) -> str:
    lines = [f"{len(rejects)} problem(s) under {root}:"]
    lines += [f"  {root / r.path}: {r.reason}" for r in rejects[:MAX_LISTED_PROBLEMS]]
    if len(rejects) > MAX_LISTED_PROBLEMS:
        lines.append(f"  ... and {len(rejects) - MAX_LISTED_PROBLEMS} more")
    lines.append(f"fix or remove these files, or pass --skip-bad to record them in {sidecar} and continue")
    return "\n".join(lines)


def manifest_info(path: str | os.PathLike, data_root: str | os.PathLike | None = None) -> dict[str, Any]:
    """Summary of a (verified) manifest, JSON-serialisable."""
    m = load_manifest(path, data_root=data_root)
    counts = np.bincount(m.labels[m.labels >= 0], minlength=m.num_classes)
    return {
        "path": str(m.path),
        "root": str(m.root),
        "description": m.description,
        "content_hash": m.content_hash,
        "num_images": m.num_images,
        "num_classes": m.num_classes,
        "unlabeled": int((m.labels == -1).sum()),
        "images_per_class": {name: int(c) for name, c in zip(m.class_names, counts)},
        "width": _spread(m.widths),
        "height": _spread(m.heights),
        "total_bytes": int(m.file_bytes.sum()),
    }


def _spread(values: np.ndarray) -> dict[str, float]:
    """min / median / max of a verified manifest's column (never empty: a manifest has an image)."""
    return {"min": int(values.min()), "median": float(np.median(values)), "max": int(values.max())}


def format_manifest_info(info: dict[str, Any], max_classes_listed: int = 50) -> str:
    """Human-readable text for :func:`manifest_info`; long class lists are summarised."""
    lines = [
        f"manifest      {info['path']}",
        f"root          {info['root']}",
        f"description   {info['description'] or '-'}",
        f"content hash  {info['content_hash']}",
        f"images        {info['num_images']:,} ({info['total_bytes'] / 1e6:,.1f} MB)",
        f"classes       {info['num_classes']:,}",
    ]
    lines += [f"{key:<14}min {info[key]['min']} / median {info[key]['median']:g} / max {info[key]['max']}"
              for key in ("width", "height")]
    if info["unlabeled"]:
        lines.append(f"unlabeled     {info['unlabeled']:,}")
    per_class = info["images_per_class"]
    if len(per_class) <= max_classes_listed:
        lines.append("images per class:")
        lines += [f"  {count:>8,}  {name}" for name, count in per_class.items()]
    elif per_class:
        counts = sorted(per_class.items(), key=lambda kv: kv[1])
        median = float(np.median([c for _, c in counts]))
        lines.append(
            f"per class     min {counts[0][1]:,} ({counts[0][0]}) / median {median:g} / "
            f"max {counts[-1][1]:,} ({counts[-1][0]}); full list with --json"
        )
    return "\n".join(lines)

