"""Crop boxes over the whole original image, against torchvision's RandomResizedCrop.get_params."""

import math

import numpy as np
import pytest
import torch
import torchvision.transforms.v2 as T
from scipy.stats import ks_2samp

from selfsup.views import ViewSpec, crop_box, region, sample_boxes, sample_rng, view_size

H, W = 375, 500  # ImageNet's typical landscape photo


def features(boxes: np.ndarray, height: int, width: int) -> dict:
    """What a crop box is made of: area fraction, log aspect, centre position (fractions)."""
    top, left, h, w = boxes.T
    return {"area": h * w / (height * width), "log_aspect": np.log(w / h),
            "cx": (left + w / 2) / width, "cy": (top + h / 2) / height}


def torchvision_boxes(n: int, height: int, width: int, scale, ratio) -> np.ndarray:
    torch.manual_seed(0)
    img = torch.empty(1, height, width)
    return np.array([T.RandomResizedCrop.get_params(img, list(scale), list(ratio)) for _ in range(n)],
                    dtype=np.float64)


def selfsup_boxes(n: int, height: int, width: int, views) -> np.ndarray:
    return np.concatenate([sample_boxes(views, height, width, sample_rng(0, 0, 0, 0, i)).numpy()
                           for i in range(n)])


@pytest.mark.parametrize("scale,ratio,height,width", [((0.08, 1.0), (3 / 4, 4 / 3), H, W),
                                                      ((0.2, 1.0), (3 / 4, 4 / 3), 500, 333),
                                                      ((0.5, 1.0), (1 / 4, 4.0), 200, 600)])
def test_boxes_have_the_distribution_of_get_params_on_the_original_size(scale, ratio, height, width):
    n = 12000
    ref = torchvision_boxes(n, height, width, scale, ratio)
    ours = selfsup_boxes(n // 2, height, width, [ViewSpec(224, scale, ratio)] * 2)  # 2 views each
    assert ours.shape == (n, 4) and np.array_equal(ours, ours.round())
    top, left, h, w = ours.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w <= width).all()
    # crops reach every border of the image
    assert (top == 0).any() and (left == 0).any() and (top + h == height).any() and (left + w == width).any()
    a, b = features(ours, height, width), features(ref, height, width)
    for key in a:
        assert ks_2samp(a[key], b[key]).pvalue > 1e-3, key
    # The old pipeline (shorter side resized, centre square, crop inside it) fails this test.
    side = min(height, width)
    old = torchvision_boxes(n, side, side, scale, ratio) * (side / side)
    old[:, 0] += (height - side) // 2
    old[:, 1] += (width - side) // 2
    c = features(old, height, width)
    assert min(ks_2samp(c[key], b[key]).pvalue for key in ("area", "cx", "cy")) < 1e-6


def test_fallback_is_the_ratio_clamped_centre_crop():
    rng = sample_rng(1)
    # 10 x 100 image, square boxes of >= 90 % of the area never fit: get_params' fallback
    assert crop_box(rng, 10, 100, (0.9, 1.0), (1.0, 1.0)) == (0, 45, 10, 10)
    assert crop_box(rng, 100, 10, (0.9, 1.0), (0.5, 2.0)) == (40, 0, 20, 10)  # h = round(10 / 0.5)


def test_jigclu_quadrants_follow_the_official_geometry():
    cross = 0.3
    # JigCluTransform on a PIL image (size = (W, H)): float boxes (left, upper, right, lower),
    # which PIL's crop rounds to whole pixels
    cw, ch = cross * W, cross * H
    official = [(0, 0, W // 2 + cw, H // 2 + ch), (0, H // 2 - ch, W // 2 + cw, H),
                (W // 2 - cw, 0, W, H // 2 + ch), (W // 2 - cw, H // 2 - ch, W, H)]
    official = [tuple(round(c) for c in box) for box in official]
    assert official[0] == (0, 0, 400, 300)  # 250 + 150, 187 + 112.5 → 299.5 → 300 (PIL's round)
    views = [ViewSpec(112, (0.2, 1.0), quadrant=q, cross=cross) for q in range(4)]
    for view, (left, upper, right, lower) in zip(views, official):
        assert region(view, H, W) == (upper, left, lower - upper, right - left)
    boxes = selfsup_boxes(3000, H, W, views).reshape(3000, 4, 4)
    for q, (left, upper, right, lower) in enumerate(official):
        t, lf, h, w = boxes[:, q].T
        assert (t >= upper).all() and (lf >= left).all() and (t + h <= lower).all() and (lf + w <= right).all()
        assert (t == upper).any() and (t + h == lower).any()  # the quadrant's own borders reached
        # inside its quadrant, a box is get_params on the quadrant's size
        qh, qw = lower - upper, right - left
        ref = features(torchvision_boxes(3000, qh, qw, (0.2, 1.0), (3 / 4, 4 / 3)), qh, qw)
        local = np.stack([t - upper, lf - left, h, w], 1)
        for key, values in features(local, qh, qw).items():
            assert ks_2samp(values, ref[key]).pvalue > 1e-3, (q, key)


def test_centre_view_and_per_sample_determinism():
    centre = sample_boxes([ViewSpec(32, random=False)], H, W, sample_rng(0))
    assert centre.tolist() == [[0, (W - H) // 2, H, H]]
    views = [ViewSpec(32)] * 2
    a = sample_boxes(views, H, W, sample_rng(3, 1, 0, 2, 17))
    assert torch.equal(a, sample_boxes(views, H, W, sample_rng(3, 1, 0, 2, 17)))
    assert not torch.equal(a, sample_boxes(views, H, W, sample_rng(3, 1, 0, 2, 18)))
    assert not torch.equal(a[0], a[1])  # two views of one image differ
    with pytest.raises(ValueError, match="one size"):
        view_size([ViewSpec(32), ViewSpec(16)])
    assert math.isclose(view_size(views), 32)
