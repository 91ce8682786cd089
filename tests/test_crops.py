"""common/crops.py: pure, batch-independent, torchvision-faithful, always in bounds."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from torchvision.transforms import RandomResizedCrop

from common.crops import boxes, centre_box, check_boxes_inside, image_boxes


def _ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic (max CDF distance)."""
    grid = np.sort(np.concatenate([a, b]))
    cdf_a = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    cdf_b = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    return float(np.abs(cdf_a - cdf_b).max())


def test_same_boxes_in_another_process():
    ids = np.arange(50)
    here = image_boxes(7, ids, np.full(50, 640), np.full(50, 480), 4).as_array()
    code = (
        "import json, numpy as np; from common.crops import image_boxes;"
        "b = image_boxes(7, np.arange(50), np.full(50, 640), np.full(50, 480), 4);"
        "print(json.dumps(b.as_array().tolist()))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert np.array_equal(np.array(json.loads(out.stdout)), here)


def test_box_does_not_depend_on_the_rest_of_the_batch():
    widths, heights = np.array([300, 64, 1000, 7]), np.array([200, 64, 50, 900])
    batch = image_boxes(3, np.array([5, 11, 12, 900]), widths, heights, 6)
    alone = boxes(3, 12, np.arange(6), 1000, 50)
    assert np.array_equal(batch.as_array()[2], alone.as_array())
    assert np.array_equal(batch.flip[2], alone.flip)


def test_seed_image_and_crop_index_all_change_the_box():
    base = boxes(0, 1, 0, 500, 400).as_array()
    assert not np.array_equal(base, boxes(1, 1, 0, 500, 400).as_array())
    assert not np.array_equal(base, boxes(0, 2, 0, 500, 400).as_array())
    assert not np.array_equal(base, boxes(0, 1, 1, 500, 400).as_array())


def test_pinned_values_keep_old_caches_valid():
    # The cache stores boxes, but `pipeline teacher-cache --reuse-crops` and
    # resume both recompute them: the hash chain is part of the format.
    # Changing them silently would invalidate every cache in the field; a
    # deliberate change must bump the crop algorithm name in the cache format.
    b = boxes(0, np.array([0, 1, 123456]), 0, 500, 375)
    got = np.concatenate([b.as_array(), b.flip[:, None]], axis=1)
    assert got.tolist() == [[179, 170, 216, 173, 1], [207, 14, 184, 170, 0], [218, 61, 207, 233, 1]]


@pytest.mark.parametrize("w,h", [(640, 480), (100, 700), (2000, 90)])
def test_scale_and_ratio_follow_torchvision(w, h):
    n = 4000
    ours = image_boxes(0, np.arange(n), np.full(n, w), np.full(n, h), 1)
    ours_area = (ours.w * ours.h / (w * h)).ravel()
    ours_ratio = np.log(ours.w / ours.h).ravel()
    torch.manual_seed(0)
    img = torch.empty(3, h, w)
    ref = np.array([RandomResizedCrop.get_params(img, [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(n)])
    ref_area = ref[:, 2] * ref[:, 3] / (w * h)
    ref_ratio = np.log(ref[:, 3] / ref[:, 2])
    # KS critical value at alpha=0.001 for two samples of 4000 is ~0.044
    assert _ks_statistic(ours_area, ref_area) < 0.044
    assert _ks_statistic(ours_ratio, ref_ratio) < 0.044
    # positions: the left edge is uniform over the free space
    free = (w - ours.w).ravel()
    rel = np.where(free > 0, ours.x.ravel() / np.maximum(free, 1), 0.5)
    assert abs(rel.mean() - 0.5) < 0.03


def test_flip_probability():
    b = image_boxes(0, np.arange(5000), np.full(5000, 10), np.full(5000, 10), 2, flip_p=0.3)
    assert abs(b.flip.mean() - 0.3) < 0.02
    assert image_boxes(0, np.arange(100), np.full(100, 10), np.full(100, 10), 2, flip_p=0.0).flip.sum() == 0


@pytest.mark.parametrize("w,h", [(1, 1), (1, 37), (37, 1), (1, 5000), (5000, 1), (20000, 20000), (3, 2)])
def test_boxes_stay_in_bounds(w, h):
    b = image_boxes(5, np.arange(300), np.full(300, w), np.full(300, h), 8)
    assert (b.w >= 1).all() and (b.h >= 1).all()
    assert (b.x >= 0).all() and (b.y >= 0).all()
    assert (b.x + b.w <= w).all() and (b.y + b.h <= h).all()


def test_extreme_aspect_falls_back_to_a_clamped_centre_crop():
    # No try can fit a 3/4..4/3 box into 5000x1 -> torchvision's centre fallback.
    b = boxes(0, np.arange(20), 0, 5000, 1)
    assert (b.h == 1).all() and (b.w == round(1 * 4 / 3)).all()
    assert (b.x == (5000 - b.w) // 2).all()


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="width and height"):
        boxes(0, 0, 0, 0, 10)
    with pytest.raises(ValueError, match="image_id"):
        boxes(0, -1, 0, 10, 10)


def test_centre_box():
    assert centre_box(200, 100, 0.875) == (56, 6, 88, 88)
    assert centre_box(1, 1) == (0, 0, 1, 1)


class _Refused(ValueError):
    pass


def _check(boxes, widths=(10, 6), heights=(8, 4), flips=None):
    check_boxes_inside(np.array(boxes), widths, heights, flips=flips, error=_Refused,
                       where=lambda i, j: f"crop {j} of image {i}", remedy="rebuild it")


def test_boxes_that_touch_the_edges_are_inside():
    _check([[[0, 0, 10, 8], [9, 7, 1, 1]], [[0, 0, 6, 4], [5, 3, 1, 1]]], flips=[[0, 1], [1, 0]])
    _check(np.zeros((0, 2, 4), np.int32), widths=[], heights=[], flips=np.zeros((0, 2)))  # no images: nothing to check


@pytest.mark.parametrize("image, crop, box, flip", [
    (0, 1, [1, 0, 10, 8], 0),  # one pixel past the right edge of the 10x8 image
    (1, 0, [0, 1, 6, 4], 0),  # one past the bottom of the 6x4 image
    (1, 1, [-1, 0, 2, 2], 0),  # left of the image
    (0, 0, [2, 2, 0, 3], 0),  # empty
    (1, 0, [0, 0, 1, 1], 2),  # a flip that is not 0/1
])
def test_the_first_box_not_inside_is_named(image, crop, box, flip):
    boxes = [[[0, 0, 10, 8], [9, 7, 1, 1]], [[0, 0, 6, 4], [5, 3, 1, 1]]]
    flips = [[0, 0], [0, 0]]
    boxes[image][crop], flips[image][crop] = box, flip
    size = ["10x8", "6x4"][image]
    with pytest.raises(_Refused, match=rf"^crop {crop} of image {image}: box \[{', '.join(map(str, box))}\] "
                                       rf"flip {flip} is not inside the {size} image; rebuild it$"):
        _check(boxes, flips=flips)
    if flip == 0:  # without flips the message leaves them out
        with pytest.raises(_Refused, match=rf"^crop {crop} of image {image}: box \[.*\] is not inside"):
            _check(boxes)
