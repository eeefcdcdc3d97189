"""Batched per-sample augmentation against torchvision's per-image functional ops."""

import pytest
import torch
import torchvision.transforms.v2.functional as TF

from selfsup.augment import BatchAugment

OFF = dict(hflip_p=0, jitter_p=0, gray_p=0, blur_p=0, solarize_p=0, scale=(1, 1), ratio=(1, 1),
           mean=(0, 0, 0), std=(1, 1, 1))


def images(b=6, c=3, h=16, w=16, seed=0):
    return torch.randint(0, 256, (b, c, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_everything_off_is_the_identity_and_normalises():
    x = images()
    aug = BatchAugment(16, **{**OFF, "mean": (0.5, 0.4, 0.3), "std": (0.2, 0.25, 0.5)})
    out = aug(x, torch.Generator().manual_seed(0))
    ref = (x.float() / 255 - torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)) / torch.tensor([0.2, 0.25, 0.5]).view(1, 3, 1, 1)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_forced_crop_box_equals_torchvision_resized_crop():
    x = images(b=3, h=20, w=24)
    aug = BatchAugment(8, **OFF)
    p = aug.sample_params(3, 20, 24, torch.Generator().manual_seed(0))
    p["box"] = torch.tensor([[0.0, 0, 16, 16], [4, 8, 8, 8], [2, 3, 16, 8]])  # top, left, h, w
    out = aug.apply(x, p)
    for i, (t, l, h, w) in enumerate(p["box"].int().tolist()):
        ref = TF.resized_crop(x[i].float() / 255, t, l, h, w, [8, 8], antialias=False)
        # same size: an exact crop; 2x downscale: grid_sample at pixel centres == bilinear
        torch.testing.assert_close(out[i], ref, atol=1e-5, rtol=0)


def test_crop_boxes_respect_scale_and_ratio():
    aug = BatchAugment(16, **{**OFF, "scale": (0.2, 0.5), "ratio": (0.75, 1.333)})
    box = aug.sample_params(2000, 64, 64, torch.Generator().manual_seed(1))["box"]
    top, left, h, w = box.unbind(1)
    area = h * w / 64 / 64
    assert area.min() >= 0.2 - 0.05 and area.max() <= 0.5 + 0.05  # rounding to pixels
    assert (w / h).min() >= 0.75 * 0.85 and (w / h).max() <= 1.333 / 0.85
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 64).all() and (left + w <= 64).all()
    assert len(set(box[:, 2].tolist())) > 10  # per-sample boxes differ


def test_flip_is_a_mirror():
    x = images()
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    plain = BatchAugment(16, **OFF)(x, g())
    flipped = BatchAugment(16, **{**OFF, "hflip_p": 1.0})(x, g())
    torch.testing.assert_close(flipped, plain.flip(-1), atol=1e-6, rtol=0)


def test_colour_jitter_matches_torchvision_per_sample():
    x = images(b=5)
    aug = BatchAugment(16, **{**OFF, "jitter_p": 1.0, "brightness": 0.4, "contrast": 0.4,
                              "saturation": 0.4, "hue": 0.1})
    p = aug.sample_params(5, 16, 16, torch.Generator().manual_seed(4))
    out = aug.apply(x, p)
    assert len(set(p["brightness"].tolist())) == 5  # different factors per sample
    for i in range(5):
        ref = x[i].float() / 255
        ref = TF.adjust_brightness(ref, p["brightness"][i].item())
        ref = TF.adjust_contrast(ref, p["contrast"][i].item())
        ref = TF.adjust_saturation(ref, p["saturation"][i].item())
        ref = TF.adjust_hue(ref, p["hue"][i].item())
        torch.testing.assert_close(out[i], ref, atol=1e-4, rtol=0)  # 1/255 = 4e-3


def test_blur_matches_torchvision_gaussian_blur():
    x = images(b=4, h=32, w=32)
    aug = BatchAugment(32, **{**OFF, "blur_p": 1.0, "blur_kernel_frac": 0.1})
    p = aug.sample_params(4, 32, 32, torch.Generator().manual_seed(5))
    out = aug.apply(x, p)
    assert aug.blur_kernel == 3
    for i in range(4):
        ref = TF.gaussian_blur(x[i].float() / 255, [3, 3], [p["sigma"][i].item()] * 2)
        torch.testing.assert_close(out[i], ref, atol=1e-5, rtol=0)


def test_grayscale_solarize_and_single_channel_input():
    x = images(b=4)
    out = BatchAugment(16, **{**OFF, "gray_p": 1.0})(x, torch.Generator().manual_seed(0))
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 1], out[:, 2])
    ref = TF.rgb_to_grayscale(x.float() / 255)
    torch.testing.assert_close(out[:, :1], ref, atol=1e-6, rtol=0)
    sol = BatchAugment(16, **{**OFF, "solarize_p": 1.0})(x, torch.Generator().manual_seed(0))
    v = x.float() / 255
    torch.testing.assert_close(sol, torch.where(v >= 0.5, 1 - v, v), atol=1e-6, rtol=0)
    gray = BatchAugment(16, **OFF)(x[:, :1], torch.Generator().manual_seed(0))
    assert gray.shape == (4, 3, 16, 16) and torch.equal(gray[:, 0], gray[:, 2])


def test_same_seed_same_views_different_seed_different():
    x = images(b=8, h=32, w=32)
    aug = BatchAugment(24, scale=(0.2, 1.0), solarize_p=0.2)
    a = aug(x, torch.Generator().manual_seed(0))
    assert torch.equal(a, aug(x, torch.Generator().manual_seed(0)))
    assert not torch.allclose(a, aug(x, torch.Generator().manual_seed(1)))
    assert a.shape == (8, 3, 24, 24) and a.dtype == torch.float32 and torch.isfinite(a).all()
