"""The epoch index: which images, in which order, with which cached crops.

Everything here is a pure function of (seed, epoch, rank, world_size) and the
image ids -- no global RNG, no state carried between epochs -- so a resumed or
re-sharded run replays exactly the same samples, and every rank can compute its
share without talking to the others. Random numbers come from the counter-based
hash of ``common.crops`` (its ``_uniform``), on draw streams of their own so they
are independent of the crop boxes drawn with the same seed.

Crop order ("every cached crop of an image is used before any is repeated"):
image ``i`` walks through a seeded permutation of its C cached crops, one per
epoch, and draws a fresh permutation every C epochs. With FKD multi-crop (m
crops per decoded image and epoch) one *cycle* lasts E = ceil(C / m) epochs and
epoch ``e`` takes slots ``(e % E) * m + j`` (j < m) of the cycle's permutation.
When m divides C that is ``perm[(e*m + j) % C]``; otherwise the last epoch of a
cycle wraps around to the cycle's first slots, so the m crops of one epoch are
always distinct and all C crops are still used before any repeats.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from common.crops import _uniform

# Draw numbers far from common.crops' (0..4*TRIES): the same (seed, image, index)
# counters must not give the shuffle and the crop boxes correlated numbers.
_SHUFFLE_DRAW = 1 << 32
_CROP_ORDER_DRAW = 2 << 32
_BLOCK_DRAW = 3 << 32


def shuffled_images(seed: int, epoch: int, num_images: int) -> np.ndarray:
    """A permutation of 0..num_images-1 seeded by (seed, epoch): the global epoch order."""
    ids = np.arange(num_images, dtype=np.int64)
    keys = _uniform(seed, ids, np.full_like(ids, epoch), _SHUFFLE_DRAW)
    return ids[np.argsort(keys, kind="stable")]


def rank_share(order: np.ndarray, rank: int, world_size: int, drop_remainder: bool) -> np.ndarray:
    """This rank's strided share of ``order``.

    ``drop_remainder``: every rank gets exactly len(order) // world_size items
    (training: equal step counts keep DDP's collectives in step). Otherwise the
    shares cover ``order`` exactly once and may differ in length by one (eval).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside 0..{world_size - 1}")
    if drop_remainder:
        order = order[: len(order) // world_size * world_size]
    return order[rank::world_size]


def shard_local_share(seed: int, epoch: int, num_images: int, rank: int, world_size: int, block: int) -> np.ndarray:
    """This rank's training share when targets live in shards of ``block`` consecutive images.

    A strided share of a global shuffle spreads every rank over every cache shard,
    so each of R ranks on a host decompresses the whole cache every epoch (R-fold
    redundant work; docs/performance.md). Here the shards are put in a seeded
    per-epoch order, the images inside them follow their seeded keys, and each
    rank takes one contiguous 1/R of that sequence: it touches about
    ``num_shards / R + 1`` shards. The rank then orders its share by the same
    image keys, so its batches mix all of its shards. Over the ranks an epoch is
    still a permutation of the images (minus ``num_images % R``, which rotates
    with the epoch), and a shard's images go to a different rank each epoch.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside 0..{world_size - 1}")
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    ids = np.arange(num_images, dtype=np.int64)
    keys = _uniform(seed, ids, np.full_like(ids, epoch), _SHUFFLE_DRAW)
    num_blocks = -(-num_images // block)
    blocks = np.arange(num_blocks, dtype=np.int64)
    block_rank = np.empty(num_blocks, dtype=np.int64)
    block_rank[np.argsort(_uniform(seed, blocks, np.full_like(blocks, epoch), _BLOCK_DRAW), kind="stable")] = blocks
    order = np.lexsort((keys, block_rank[ids // block]))  # by shard position, then by image key
    per_rank = num_images // world_size
    share = order[rank * per_rank : (rank + 1) * per_rank]
    return share[np.argsort(keys[share], kind="stable")]


def crop_permutations(seed: int, image_ids: np.ndarray, cycle: int, num_crops: int) -> np.ndarray:
    """[n, C] int64: each image's seeded permutation of its C crops for ``cycle``."""
    image_ids = np.asarray(image_ids, dtype=np.int64)
    cycles = np.full_like(image_ids, cycle)
    keys = np.stack([_uniform(seed, image_ids, cycles, _CROP_ORDER_DRAW + k) for k in range(num_crops)], axis=-1)
    return np.argsort(keys, axis=-1, kind="stable").astype(np.int64)


def epoch_crops(seed: int, image_ids: np.ndarray, epoch: int, num_crops: int, crops_per_image: int = 1) -> np.ndarray:
    """[n, m] int64: the m distinct cached crops each image uses in ``epoch`` (see module doc)."""
    m, C = crops_per_image, num_crops
    if not 1 <= m <= C:
        raise ValueError(f"crops_per_image = {m} must be in 1..num_crops ({C}): an epoch's crops of one image are distinct")
    epochs_per_cycle = -(-C // m)
    perms = crop_permutations(seed, image_ids, epoch // epochs_per_cycle, C)
    slots = ((epoch % epochs_per_cycle) * m + np.arange(m)) % C
    return perms[:, slots]


@dataclass(frozen=True)
class EpochPlan:
    """One rank's images for one epoch, in order, grouped into batches of whole images."""

    image_ids: np.ndarray  # int64 [n]
    images_per_batch: int
    drop_last: bool

    @property
    def num_batches(self) -> int:
        n, b = len(self.image_ids), self.images_per_batch
        return n // b if self.drop_last else -(-n // b)

    def batch_slice(self, index: int) -> slice:
        """Rows of ``image_ids`` (and of per-image arrays aligned with it) in batch ``index``."""
        if not 0 <= index < self.num_batches:
            raise IndexError(f"batch {index} outside 0..{self.num_batches - 1}")
        start = index * self.images_per_batch
        return slice(start, min(start + self.images_per_batch, len(self.image_ids)))


def plan_epoch(
    num_images: int,
    *,
    seed: int,
    epoch: int,
    rank: int,
    world_size: int,
    images_per_batch: int,
    shuffle: bool,
    shard_block: int | None = None,
) -> EpochPlan:
    """Training (``shuffle``): a seeded global order, equal strided rank shares, full
    batches only; with ``shard_block`` (the cache's images per shard) and several
    ranks, shard-local shares instead (``shard_local_share``). Evaluation: images in
    id order, every image exactly once across ranks, the last batch kept however small."""
    if images_per_batch < 1:
        raise ValueError(f"images_per_batch must be >= 1, got {images_per_batch}")
    if shuffle and shard_block and world_size > 1:
        ids = shard_local_share(seed, epoch, num_images, rank, world_size, shard_block)
        return EpochPlan(image_ids=ids, images_per_batch=images_per_batch, drop_last=True)
    order = shuffled_images(seed, epoch, num_images) if shuffle else np.arange(num_images, dtype=np.int64)
    ids = rank_share(order, rank, world_size, drop_remainder=shuffle)
    return EpochPlan(image_ids=ids, images_per_batch=images_per_batch, drop_last=shuffle)
