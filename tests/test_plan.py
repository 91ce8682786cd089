"""The epoch index: crop coverage, determinism, rank shares, multi-crop."""
import numpy as np
import pytest

from stage2_student_distill.plan import (
    crop_permutations,
    epoch_crops,
    plan_epoch,
    rank_share,
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
