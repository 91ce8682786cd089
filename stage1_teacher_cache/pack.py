"""`pipeline cache pack|unpack`: a cache as one file, for transfer.

The pack is an uncompressed POSIX tar (the chunks are zstd already) of the
cache's files (a local directory or any fsspec URL: s3://, gs://...), in
sorted order with zeroed owners and times (the same cache always packs to the
same bytes, wherever it is stored), followed by a JSON member
``meal-v2-pack.json`` listing every file's size and sha256. Packing hashes each
file while it streams into the tar, so every byte is read once.

A pack is untrusted input. Unpacking accepts only regular files with canonical
relative names (no absolute paths, ``..``, links, devices or sparse members),
writes each member itself (never ``TarFile.extract``), checks every checksum and
that the member list equals the index, all inside a temporary directory that is
renamed to the destination only when everything matched. Any failure names the
member and leaves nothing at the destination.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
from pathlib import Path
from typing import Any, BinaryIO

from common.cache_format import MAX_TREE_DEPTH, CacheReader, load_json_bounded
from common.errors import PipelineError, shown
from common.locations import open_read, require_local
from common.manifest import check_relative_path

PACK_FORMAT = "meal-v2-cache-pack"
PACK_VERSION = 1
INDEX_NAME = "meal-v2-pack.json"
MAX_INDEX_BYTES = 64 << 20
_PARTIAL_SUFFIX = ".partial"  # temp files a killed zarr write leaves behind: not part of the cache


class PackError(PipelineError):
    """A pack cannot be written or is not a sound pack; the message names the member."""


class _HashingReader:
    """File wrapper that hashes what tarfile reads through it."""

    def __init__(self, f: BinaryIO):
        self.f = f
        self.sha256 = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.sha256.update(data)
        return data


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o644, 0
    return info


def cache_files(reader: CacheReader) -> dict[str, int]:
    """``{relative POSIX name: size}`` of the cache's files, sorted: the reader's listing, which
    refused anything but regular files and folders (object stores hold only objects)."""
    cache = reader.path
    files = {name: size for name, size in reader.files.items() if not name.endswith(_PARTIAL_SUFFIX)}
    for name in files:
        problem = check_relative_path(name)
        if problem:  # a forged object key must not become a member that unpack would refuse
            raise PackError(f"{cache}: file {name!r}: {problem}")
    if INDEX_NAME in files:
        raise PackError(f"{cache}: holds a file named {INDEX_NAME}, the name reserved for the pack index")
    return files


def pack_cache(cache: str, out: str) -> dict[str, Any]:
    """Pack a cache (local directory or URL) into the local file ``out``."""
    require_local(out, "the pack file")
    reader = CacheReader(cache, require_complete=False)  # refuse what is not a cache before writing anything
    files = cache_files(reader)
    base = cache.rstrip("/")
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}")
    index: dict[str, dict[str, Any]] = {}
    try:
        with open(tmp, "wb") as raw:
            with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
                for name, size in files.items():
                    with open_read(f"{base}/{name}") as f:
                        hashing = _HashingReader(f)
                        tar.addfile(_tarinfo(name, size), hashing)
                    index[name] = {"size": size, "sha256": hashing.sha256.hexdigest()}
                body = json.dumps({"format": PACK_FORMAT, "version": PACK_VERSION, "files": index},
                                  indent=1, sort_keys=True).encode()
                tar.addfile(_tarinfo(INDEX_NAME, len(body)), io.BytesIO(body))
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    return {"pack": str(out_path), "files": len(index), "bytes": out_path.stat().st_size,
            "complete": bool(reader.complete.all())}


def _member_name(member: tarfile.TarInfo, pack: str) -> str:
    """The member's name if it is a plain file or directory with a safe relative name."""
    name = member.name.rstrip("/") if member.isdir() else member.name
    kind = ("a symbolic link" if member.issym() else "a hard link" if member.islnk()
            else "a sparse file" if member.issparse() else None)
    if kind is None and not (member.isreg() or member.isdir()):
        kind = "a device, fifo or other special file"
    if kind:
        raise PackError(f"{pack}: member {member.name!r} is {kind}; a cache pack holds only regular files")
    problem = check_relative_path(name)
    if problem:
        raise PackError(f"{pack}: member {member.name!r}: {problem}; refusing to unpack")
    if name.count("/") + 1 > MAX_TREE_DEPTH:  # a cache's deepest file has 6 parts; mkdir of 2,000 would recurse
        raise PackError(f"{pack}: member {shown(member.name, 80)} is nested {name.count('/') + 1} levels deep, "
                        f"deeper than any cache file ({MAX_TREE_DEPTH}); refusing to unpack")
    return name


def _extract(tar: tarfile.TarFile, member: tarfile.TarInfo, dest: Path) -> str:
    """Copy one member to ``dest`` (which must not exist); return its sha256."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    source = tar.extractfile(member)
    h = hashlib.sha256()
    with source, open(dest, "xb") as f:
        while block := source.read(1 << 20):
            h.update(block)
            f.write(block)
    return h.hexdigest()


def _read_index(tar: tarfile.TarFile, member: tarfile.TarInfo, pack: str) -> dict[str, Any]:
    if member.size > MAX_INDEX_BYTES:
        raise PackError(f"{pack}: {INDEX_NAME} is {member.size:,} bytes, over the {MAX_INDEX_BYTES:,} limit")
    index = load_json_bounded(tar.extractfile(member).read(), f"{pack}: {INDEX_NAME}")
    try:
        if index["format"] != PACK_FORMAT or not isinstance(index["files"], dict):
            raise ValueError(f"format {index.get('format')!r}")
        if not all(isinstance(entry, dict) for entry in index["files"].values()):
            raise ValueError("a file entry is not an object")
    except (ValueError, KeyError, TypeError) as e:
        raise PackError(f"{pack}: {INDEX_NAME} is not a cache pack index ({e})") from None
    if index.get("version") != PACK_VERSION:
        raise PackError(f"{pack}: pack version {index.get('version')!r}; this tool reads version {PACK_VERSION}, "
                        "upgrade the pipeline package")
    return index


def _compare(index: dict[str, Any], found: dict[str, str], pack: str) -> None:
    listed = index["files"]
    for name, digest in found.items():
        if name not in listed:
            raise PackError(f"{pack}: member {name!r} is not in the pack index; refusing to unpack")
        if listed[name].get("sha256") != digest:
            raise PackError(f"{pack}: member {name!r}: sha256 mismatch (damaged in transfer?); refusing to unpack")
    missing = sorted(set(listed) - set(found))
    if missing:
        raise PackError(f"{pack}: member {missing[0]!r} (and {len(missing) - 1} more) listed in the index "
                        "is missing; the pack is truncated or incomplete")


def unpack_cache(pack: str, out: str) -> dict[str, Any]:
    require_local(pack, "the pack to unpack")
    out_path = require_local(out, "the unpacked cache directory")
    if out_path.exists():
        raise PackError(f"{out}: already exists; unpack into a new directory")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.unpack-{os.getpid()}")
    try:
        tmp.mkdir()
        index, found = None, {}
        with tarfile.open(pack, mode="r:") as tar:  # "r:": uncompressed only, as pack writes
            for member in tar:
                name = _member_name(member, pack)
                if member.isdir():
                    continue
                if name == INDEX_NAME:
                    index = _read_index(tar, member, pack)
                elif name in found:
                    raise PackError(f"{pack}: member {name!r} appears twice; refusing to unpack")
                else:
                    found[name] = _extract(tar, member, tmp / name)
        if index is None:
            raise PackError(f"{pack}: no {INDEX_NAME} member (truncated, or not written by `pipeline cache pack`)")
        _compare(index, found, pack)
        os.rename(tmp, out_path)
    except tarfile.TarError as e:
        raise PackError(f"{pack}: not a readable uncompressed tar ({e}); truncated in transfer?") from None
    except OSError as e:
        raise PackError(f"{pack}: unpacking failed ({e})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"cache": str(out_path), "files": len(found)}
