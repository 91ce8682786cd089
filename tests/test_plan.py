"""The epoch index: crop coverage, determinism, rank shares, multi-crop."""
import numpy as np
import pytest

from stage2_student_distill.plan import (
    crop_permutations,
    epoch_crops,
    plan_epoch,
    rank_share,
    shard_local_share,
    shuffled_images,
)

IDS = np.arange(50, dtype=np.int64)


@pytest.mark.parametrize("num_crops", [1, 3, 8])
def test_every_crop_used_once_per_cycle(num_crops):
    used = np.concatenate([epoch_crops(7, IDS, e, num_crops) for e in range(3 * num_crops)], axis=1)
    for cycle in range(3):
        block = np.sort(used[:, cycle * num_crops : (cycle + 1) * num_crops], axis=1)
        assert (block == np.arange(num_crops)).all()
    if num_crops > 2:  # a fresh permutation per cycle, not the same order every time
        assert not np.array_equal(used[:, :num_crops], used[:, num_crops : 2 * num_crops])


def test_crop_order_is_a_pure_function():
    a = epoch_crops(3, IDS, 5, 8)
    assert np.array_equal(a, epoch_crops(3, IDS, 5, 8))
    # per image, independent of which other images are asked for (any rank, any batch)
    assert np.array_equal(a[10:20], epoch_crops(3, IDS[10:20], 5, 8))
    assert np.array_equal(a[::-1], epoch_crops(3, IDS[::-1], 5, 8))
    assert not np.array_equal(a, epoch_crops(4, IDS, 5, 8))
    # images get different orders
    perms = crop_permutations(3, IDS, 0, 8)
    assert len({tuple(p) for p in perms}) > 40


@pytest.mark.parametrize("num_crops,m", [(8, 2), (8, 4), (8, 3), (5, 5), (4, 3)])
def test_multi_crop_distinct_and_covering(num_crops, m):
    epochs_per_cycle = -(-num_crops // m)
    seq = []
    for e in range(3 * epochs_per_cycle):
        crops = epoch_crops(1, IDS, e, num_crops, m)
        assert crops.shape == (len(IDS), m)
        assert all(len(set(row)) == m for row in crops.tolist()), "an epoch's crops of one image must differ"
        seq.append(crops)
    seq = np.concatenate(seq, axis=1)
    cycle_len = epochs_per_cycle * m
    for cycle in range(3):
        block = seq[:, cycle * cycle_len : (cycle + 1) * cycle_len]
        # all C crops appear before any repeats within the cycle
        assert (np.sort(block[:, :num_crops], axis=1) == np.arange(num_crops)).all()
    if num_crops % m == 0:  # the plain rule perm[(e*m + j) % C]
        perm = crop_permutations(1, IDS, 0, num_crops)
        assert np.array_equal(seq[:, :num_crops], perm)


def test_multi_crop_needs_enough_crops():
    with pytest.raises(ValueError, match="crops_per_image"):
        epoch_crops(0, IDS, 0, num_crops=2, crops_per_image=3)


def test_shuffle_is_seeded_permutation():
    a = shuffled_images(0, 0, 100)
    assert sorted(a.tolist()) == list(range(100))
    assert np.array_equal(a, shuffled_images(0, 0, 100))
    assert not np.array_equal(a, shuffled_images(0, 1, 100))
    assert not np.array_equal(a, shuffled_images(1, 0, 100))


@pytest.mark.parametrize("num_images,world", [(100, 1), (100, 3), (101, 4), (7, 8)])
def test_rank_shares(num_images, world):
    order = shuffled_images(5, 2, num_images)
    train = [rank_share(order, r, world, drop_remainder=True) for r in range(world)]
    assert len({len(s) for s in train}) == 1 and len(train[0]) == num_images // world
    flat = np.concatenate(train)
    assert len(set(flat.tolist())) == len(flat)  # disjoint
    assert set(flat.tolist()) == set(order[: num_images // world * world].tolist())
    evals = [rank_share(np.arange(num_images), r, world, drop_remainder=False) for r in range(world)]
    assert sorted(np.concatenate(evals).tolist()) == list(range(num_images))  # each image exactly once
    assert all((np.diff(s) > 0).all() for s in evals)  # in id order


def test_plan_epoch_batches():
    train = plan_epoch(10, seed=0, epoch=3, rank=0, world_size=1, images_per_batch=4, shuffle=True)
    assert train.num_batches == 2 and train.drop_last
    assert np.array_equal(train.image_ids, shuffled_images(0, 3, 10))
    assert train.batch_slice(1) == slice(4, 8)
    ev = plan_epoch(10, seed=0, epoch=3, rank=1, world_size=2, images_per_batch=4, shuffle=False)
    assert ev.image_ids.tolist() == [1, 3, 5, 7, 9]
    assert ev.num_batches == 2 and ev.batch_slice(1) == slice(4, 5)
    with pytest.raises(IndexError):
        ev.batch_slice(2)


@pytest.mark.parametrize("num_images,world,block", [(1000, 8, 64), (1001, 3, 100), (50, 4, 7), (10, 2, 100)])
def test_shard_local_shares(num_images, world, block):
    shares = [shard_local_share(3, 5, num_images, r, world, block) for r in range(world)]
    per_rank = num_images // world
    assert all(len(s) == per_rank for s in shares)  # equal step counts under DDP
    flat = np.concatenate(shares)
    assert len(set(flat.tolist())) == len(flat)  # disjoint
    num_blocks = -(-num_images // block)
    for s in shares:  # each rank reads about 1/world of the shards, not all of them (+2: the ends, the short last shard)
        assert len(np.unique(s // block)) <= -(-per_rank // block) + 2
    again = [shard_local_share(3, 5, num_images, r, world, block) for r in range(world)]
    assert all(np.array_equal(a, b) for a, b in zip(shares, again))  # pure function
    nxt = shard_local_share(3, 6, num_images, 0, world, block)
    assert not np.array_equal(np.sort(nxt), np.sort(shares[0])) or num_blocks == 1  # shards move between ranks


def test_shard_local_shares_cover_every_image_over_epochs():
    seen = np.zeros(101, bool)
    for epoch in range(6):
        seen[shard_local_share(0, epoch, 101, 1, 4, 10)] = True
    assert seen.sum() > 2 * 25  # rank 1 (25 images an epoch) does not keep the same shards epoch after epoch
    left_out = [set(range(101)) - set(np.concatenate([shard_local_share(0, e, 101, r, 4, 10) for r in range(4)]).tolist())
                for e in range(4)]
    assert all(len(s) == 1 for s in left_out) and len(set.union(*left_out)) > 1  # the remainder rotates


def test_plan_epoch_shard_block_only_for_several_ranks():
    one = plan_epoch(100, seed=0, epoch=2, rank=0, world_size=1, images_per_batch=8, shuffle=True, shard_block=10)
    assert np.array_equal(one.image_ids, shuffled_images(0, 2, 100))  # single process: the plain global shuffle
    two = plan_epoch(100, seed=0, epoch=2, rank=1, world_size=2, images_per_batch=8, shuffle=True, shard_block=10)
    assert np.array_equal(two.image_ids, shard_local_share(0, 2, 100, 1, 2, 10)) and two.num_batches == 6
    ev = plan_epoch(100, seed=0, epoch=2, rank=1, world_size=2, images_per_batch=8, shuffle=False, shard_block=10)
    assert ev.image_ids.tolist() == list(range(1, 100, 2))
