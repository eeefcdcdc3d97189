"""Per-sample augmentation of a whole uint8 batch, on whatever device the batch lives on.

torchvision.transforms.v2 applied to a batched tensor draws ONE set of random parameters for the
whole batch; SSL needs different crops and colours per image. Doing it per image in the loader
workers (lightly's ``SimCLRTransform``) costs most of a CPU core per few hundred images. Here the
loader only decodes; this module draws every sample's parameters from one CPU ``torch.Generator``
(tiny tensors, checkpointed by the trainer for exact resume) and applies them with batched tensor
ops: crop + flip as one ``affine_grid``/``grid_sample``, colour jitter with per-sample factors,
grayscale, Gaussian blur as a grouped convolution, solarisation, normalisation.

Semantics follow torchvision's RandomResizedCrop → RandomHorizontalFlip → RandomApply(ColorJitter)
→ RandomGrayscale → GaussianBlur → Normalize pipeline, with two documented differences: colour
jitter is applied in a fixed order (brightness, contrast, saturation, hue) instead of a random
order per image, and crops are resampled bilinearly without antialiasing (only large downscales
differ visibly).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

GRAY = (0.2989, 0.587, 0.114)  # torchvision rgb_to_grayscale weights


def _gray(x: torch.Tensor) -> torch.Tensor:
    w = x.new_tensor(GRAY).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def _rgb2hsv(x):
    r, g, b = x.unbind(1)
    maxc, _ = x.max(1)
    minc, _ = x.min(1)
    cr = maxc - minc
    s = cr / torch.where(maxc == 0, torch.ones_like(maxc), maxc)
    crd = torch.where(cr == 0, torch.ones_like(cr), cr)
    rc, gc, bc = (maxc - r) / crd, (maxc - g) / crd, (maxc - b) / crd
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = torch.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    return h, s, maxc


def _hsv2rgb(h, s, v):
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.to(torch.int64) % 6
    p = (v * (1 - s)).clamp(0, 1)
    q = (v * (1 - s * f)).clamp(0, 1)
    t = (v * (1 - s * (1 - f))).clamp(0, 1)
    mask = i.unsqueeze(1) == torch.arange(6, device=h.device).view(1, -1, 1, 1)
    table = [torch.stack(c, 1) for c in ((v, q, p, p, t, v), (t, v, v, q, p, p), (p, p, t, v, v, q))]
    return torch.stack([(mask * c).sum(1) for c in table], 1)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Hue rotation by a per-sample fraction of the colour circle (torchvision semantics)."""
    h, s, v = _rgb2hsv(x)
    h = torch.fmod(h + shift.view(-1, 1, 1) + 1.0, 1.0)
    return _hsv2rgb(h, s, v)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, ksize: int) -> torch.Tensor:
    """Separable Gaussian blur with one sigma per sample, reflect padding (as torchvision)."""
    b, c, h, w = x.shape
    half = (ksize - 1) * 0.5
    t = torch.linspace(-half, half, ksize, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (t.view(1, -1) / sigma.view(-1, 1)) ** 2)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (b*c, ksize)
    pad = ksize // 2
    y = F.pad(x.reshape(1, b * c, h, w), (pad, pad, pad, pad), mode="reflect")
    y = F.conv2d(y, k.view(b * c, 1, 1, ksize), groups=b * c)
    y = F.conv2d(y, k.view(b * c, 1, ksize, 1), groups=b * c)
    return y.view(b, c, h, w)


class BatchAugment(nn.Module):
    """uint8 (B, C, H, W) batch → normalised float32 (B, 3, size, size) views."""

    def __init__(self, size: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip_p=0.5,
                 jitter_p=0.8, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1,
                 gray_p=0.2, blur_p=0.5, blur_sigma=(0.1, 2.0), blur_kernel_frac=0.1,
                 solarize_p=0.0, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)):
        super().__init__()
        self.size, self.scale, self.ratio = int(size), tuple(scale), tuple(ratio)
        self.hflip_p, self.jitter_p, self.gray_p = hflip_p, jitter_p, gray_p
        self.brightness, self.contrast, self.saturation, self.hue = brightness, contrast, saturation, hue
        self.blur_p, self.blur_sigma, self.solarize_p = blur_p, tuple(blur_sigma), solarize_p
        k = max(3, int(blur_kernel_frac * self.size))
        self.blur_kernel = k + 1 - k % 2
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), False)

    def sample_params(self, b: int, height: int, width: int, g: torch.Generator) -> dict:
        """All random draws for ``b`` images (a fixed number per call, so RNG use is
        data-independent). Crop boxes follow RandomResizedCrop.get_params: 10 tries, then a
        centre crop with the ratio clamped."""
        area = height * width
        tries = 10
        target = area * torch.empty(b, tries).uniform_(*self.scale, generator=g)
        logr = torch.empty(b, tries).uniform_(math.log(self.ratio[0]), math.log(self.ratio[1]), generator=g)
        ar = torch.exp(logr)
        w = torch.round(torch.sqrt(target * ar))
        h = torch.round(torch.sqrt(target / ar))
        ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
        first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((b,), -1))
        pick = first.clamp(min=0).unsqueeze(1)
        w, h = w.gather(1, pick).squeeze(1), h.gather(1, pick).squeeze(1)
        in_ratio = width / height
        if in_ratio < min(self.ratio):
            fw, fh = width, round(width / min(self.ratio))
        elif in_ratio > max(self.ratio):
            fw, fh = round(height * max(self.ratio)), height
        else:
            fw, fh = width, height
        fallback = first < 0
        w = torch.where(fallback, torch.tensor(float(fw)), w)
        h = torch.where(fallback, torch.tensor(float(fh)), h)
        u = torch.rand(b, 2, generator=g)
        top = torch.where(fallback, (height - h) // 2, torch.floor(u[:, 0] * (height - h + 1)))
        left = torch.where(fallback, (width - w) // 2, torch.floor(u[:, 1] * (width - w + 1)))
        r = torch.rand(b, 9, generator=g)

        def factor(strength, col):  # U(max(0, 1-s), 1+s) as torchvision's ColorJitter
            lo = max(0.0, 1 - strength)
            return lo + (1 + strength - lo) * r[:, col]

        sig = self.blur_sigma[0] + (self.blur_sigma[1] - self.blur_sigma[0]) * r[:, 8]
        u2 = torch.rand(b, 4, generator=g)
        return {"box": torch.stack([top, left, h, w], 1), "flip": u2[:, 0] < self.hflip_p,
                "jitter": u2[:, 1] < self.jitter_p, "brightness": factor(self.brightness, 0),
                "contrast": factor(self.contrast, 1), "saturation": factor(self.saturation, 2),
                "hue": (r[:, 3] * 2 - 1) * self.hue, "gray": u2[:, 2] < self.gray_p,
                "blur": u2[:, 3] < self.blur_p, "sigma": sig, "solarize": r[:, 7] < self.solarize_p}

    def crop(self, x: torch.Tensor, box: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
        """Resized crop (+ horizontal flip) of every sample's box to ``size`` (bilinear)."""
        b, _, height, width = x.shape
        top, left, h, w = box.to(x.device, x.dtype).unbind(1)
        sx = w / width * torch.where(flip.to(x.device), -1.0, 1.0).to(x.dtype)
        theta = torch.zeros(b, 2, 3, device=x.device, dtype=x.dtype)
        theta[:, 0, 0], theta[:, 1, 1] = sx, h / height
        theta[:, 0, 2] = (2 * left + w) / width - 1
        theta[:, 1, 2] = (2 * top + h) / height - 1
        grid = F.affine_grid(theta, [b, x.shape[1], self.size, self.size], align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def apply(self, images: torch.Tensor, p: dict) -> torch.Tensor:
        dev = images.device
        p = {k: v.to(dev) for k, v in p.items()}
        x = images.float() / 255
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = self.crop(x, p["box"], p["flip"])
        col = lambda v: v.view(-1, 1, 1, 1).to(x.dtype)  # noqa: E731
        if self.jitter_p > 0:
            j = col(p["jitter"])
            y = (x * col(p["brightness"])).clamp(0, 1)
            m = _gray(y).mean((2, 3), keepdim=True)
            y = (col(p["contrast"]) * y + (1 - col(p["contrast"])) * m).clamp(0, 1)
            y = (col(p["saturation"]) * y + (1 - col(p["saturation"])) * _gray(y)).clamp(0, 1)
            if self.hue > 0:
                y = adjust_hue(y, p["hue"].to(x.dtype))
            x = torch.where(j.bool(), y, x)
        if self.gray_p > 0:
            x = torch.where(col(p["gray"]).bool(), _gray(x).expand(-1, 3, -1, -1), x)
        if self.blur_p > 0:
            x = torch.where(col(p["blur"]).bool(), gaussian_blur(x, p["sigma"].to(x.dtype), self.blur_kernel), x)
        if self.solarize_p > 0:
            x = torch.where(col(p["solarize"]).bool() & (x >= 0.5), 1 - x, x)
        return (x - self.mean) / self.std

    def forward(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        with torch.autocast(images.device.type, enabled=False):
            p = self.sample_params(images.shape[0], images.shape[2], images.shape[3], generator)
            return self.apply(images, p)
