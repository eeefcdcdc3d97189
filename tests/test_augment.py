"""Batched per-sample augmentation checked against torchvision's per-image functional ops.

Every reference here is computed independently, one sample at a time, with torchvision (the ops the
per-image SimCLR pipeline uses), replaying the parameters the batch drew."""

import pytest
import torch
import torchvision.transforms.v2.functional as TF

from selfsup.augment import JITTER_OPS, BatchAugment

# Everything random switched off, no normalisation: the output is the input in [0, 1].
OFF = dict(hflip_p=0, jitter_p=0, gray_p=0, blur_p=0, solarize_p=0, mean=(0, 0, 0), std=(1, 1, 1))
TV_OPS = dict(brightness=TF.adjust_brightness, contrast=TF.adjust_contrast,
              saturation=TF.adjust_saturation, hue=TF.adjust_hue)


def images(b=6, c=3, h=16, w=16, seed=0):
    return torch.randint(0, 256, (b, c, h, w), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_all_off_same_size_is_identity_and_normalises():
    x = images()
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)
    out = BatchAugment(16, **{**OFF, "mean": mean, "std": std})(x, gen())
    ref = (x.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    # A constant gray image maps to (v - mean) / std per channel, with the default ImageNet stats.
    const = torch.full((2, 3, 16, 16), 128, dtype=torch.uint8)
    out = BatchAugment(16, **{k: v for k, v in OFF.items() if k not in ("mean", "std")})(const, gen())
    want = [(128 / 255 - m) / s for m, s in zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]
    torch.testing.assert_close(out, torch.tensor(want).view(1, 3, 1, 1).expand_as(out), atol=1e-6, rtol=0)


def test_flip_is_the_mirror_of_the_unflipped_view():
    x = images(h=16, w=16)
    plain = BatchAugment(16, **OFF)(x, gen(3))
    flipped = BatchAugment(16, **{**OFF, "hflip_p": 1.0})(x, gen(3))
    torch.testing.assert_close(flipped, torch.flip(plain, dims=[-1]), atol=1e-6, rtol=0)
    assert (flipped - plain).abs().max() > 0.1


def replay_jitter(img, p, i):
    for op in p["order"][i].tolist():
        name = JITTER_OPS[op]
        img = TV_OPS[name](img, p[name][i].item())
    return img


def test_colour_jitter_matches_torchvision_per_sample_in_each_samples_order():
    n = 12
    x = images(b=n)
    aug = BatchAugment(16, **{**OFF, "jitter_p": 0.7, "brightness": 0.4, "contrast": 0.4,
                              "saturation": 0.4, "hue": 0.1})
    out, p = aug(x, gen(4), return_params=True)
    assert 0 < p["jitter"].sum() < n
    for key in ("brightness", "contrast", "saturation", "hue"):
        assert len(set(p[key].tolist())) == n  # a different factor per sample
    assert len({tuple(o) for o in p["order"].tolist()}) > 3  # and a different order
    moved = 0
    for i in range(n):
        img = x[i].float() / 255
        ref = replay_jitter(img, p, i) if p["jitter"][i] else img
        torch.testing.assert_close(out[i], ref, atol=2e-5, rtol=0)
        if p["jitter"][i]:  # the order matters: the fixed order gives a visibly different image
            fixed = {**p, "order": torch.arange(4).expand(n, 4)}
            moved = max(moved, (replay_jitter(img, fixed, i) - ref).abs().max().item())
    assert moved > 1e-2


def test_zero_strength_jitter_is_skipped():
    x = images()
    off = BatchAugment(16, **OFF)(x, gen())
    on = BatchAugment(16, **{**OFF, "jitter_p": 1.0, "brightness": 0, "contrast": 0,
                             "saturation": 0, "hue": 0})(x, gen())
    assert torch.equal(on, off)


@pytest.mark.parametrize("frac,kernel", [(0.1, 3), (0.2, 7)])
def test_blur_matches_torchvision_gaussian_blur(frac, kernel):
    x = images(b=6, h=32, w=32)
    aug = BatchAugment(32, **{**OFF, "blur_p": 0.5, "blur_kernel_frac": frac})
    out, p = aug(x, gen(5), return_params=True)
    assert aug.blur_kernel == kernel and 0 < p["blur"].sum() < 6
    assert len(set(p["sigma"].tolist())) == 6
    for i in range(6):
        img = x[i].float() / 255
        ref = TF.gaussian_blur(img, [kernel, kernel], [p["sigma"][i].item()] * 2) if p["blur"][i] else img
        torch.testing.assert_close(out[i], ref, atol=1e-5, rtol=0)


def test_blur_kernel_size_follows_the_10_percent_rule():
    assert [BatchAugment(s).blur_kernel for s in (16, 32, 96, 224)] == [3, 3, 9, 23]


def test_grayscale_solarize_and_single_channel_input():
    x = images(b=4)
    out = BatchAugment(16, **{**OFF, "gray_p": 1.0})(x, gen())
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 1], out[:, 2])
    torch.testing.assert_close(out[:, :1], TF.rgb_to_grayscale(x.float() / 255), atol=1e-6, rtol=0)
    sol = BatchAugment(16, **{**OFF, "solarize_p": 1.0})(x, gen())
    v = x.float() / 255
    torch.testing.assert_close(sol, torch.where(v >= 0.5, 1 - v, v), atol=1e-6, rtol=0)
    gray = BatchAugment(16, **OFF)(x[:, :1], gen())
    assert gray.shape == (4, 3, 16, 16) and torch.equal(gray[:, 0], gray[:, 2])
    torch.testing.assert_close(gray[:, 1], x[:, 0].float() / 255, atol=1e-6, rtol=0)
    with pytest.raises(ValueError):
        BatchAugment(16)(images(c=2), gen())


def test_same_seed_same_views_different_seed_different_and_no_global_rng():
    x = images(b=8, h=24, w=24)
    aug = BatchAugment(24, solarize_p=0.2)
    state = torch.get_rng_state()
    g = gen(0)
    a = aug(x, g)
    assert torch.equal(torch.get_rng_state(), state)  # only the given generator is used
    assert torch.equal(a, aug(x, gen(0)))
    assert not torch.allclose(a, aug(x, g))  # the second view of the same generator differs
    assert not torch.allclose(a, aug(x, gen(1)))
    assert a.shape == (8, 3, 24, 24) and a.dtype == torch.float32 and torch.isfinite(a).all()
    p = aug.sample_params(8, gen(0))
    assert len({tuple(o) for o in p["order"].tolist()}) > 1  # per-sample parameters
    # Normalised default views of random uint8 images: roughly zero-mean, unit-scale.
    assert abs(a.mean().item()) < 0.5 and 0.3 < a.std().item() < 2.0


def test_float32_under_autocast():
    x = images(b=4)
    aug = BatchAugment(16, blur_p=0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = aug(x, gen(2))
    assert out.dtype == torch.float32 and torch.equal(out, aug(x, gen(2)))
