"""Per-sample augmentation of a whole batch of views, on whatever device the batch lives on.

torchvision.transforms.v2 applied to a batched tensor draws ONE set of random parameters for the
whole batch; SSL needs a different flip and colour per image. Doing it per image in the loader
workers (lightly's ``SimCLRTransform``) costs most of a CPU core per few hundred images. Here the
crops arrive already cut (the loader cuts every view from the whole original image:
:mod:`selfsup.views`, :mod:`selfsup.decode`); this module draws every sample's remaining parameters
from one CPU ``torch.Generator`` (tiny tensors; the trainer checkpoints its state, so a resumed run
draws the same views) and applies them with batched tensor ops, reusing torchvision's functional
ops wherever they are batch-safe.

Semantics per sample are those of the SimCLR pipeline after its RandomResizedCrop:
RandomHorizontalFlip → RandomApply(ColorJitter) → RandomGrayscale → RandomApply(GaussianBlur) →
[solarize] → Normalize:

- colour jitter applies brightness, contrast, saturation and hue in a random order per sample,
  exactly as torchvision's ColorJitter (which lightly uses): the ops do not commute (a hue shift
  after a saturation boost differs from before it), and the random order costs nothing here
  because each (step, op) group is gathered by an index computed on the CPU.
- the hue shift uses torchvision's own batched RGB↔HSV conversions, so it matches ``adjust_hue``.
- the blur kernel has a fixed odd side ``≈ blur_kernel_frac * size`` (≥ 3), as SimCLR's 10 % rule;
  sigma is drawn per sample and the kernels are applied as one depthwise separable convolution.

Applying an op only to the samples that draw it (index_select/index_copy_ with CPU-computed
indices, no device sync) also saves the work of the ~20-50 % of samples that skip it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from omegaconf import OmegaConf
from torch import nn
# Private but batched (..., 3, H, W) HSV conversions of the pinned torchvision; tests/test_augment.py
# compares the hue shift with the public adjust_hue, so an upgrade that changes them fails loudly.
from torchvision.transforms.v2.functional._color import _hsv_to_rgb, _rgb_to_hsv

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
JITTER_OPS = ("brightness", "contrast", "saturation", "hue")  # ids used by params["order"]


def to_device_async(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on ``device`` without making the host wait for the device: on CUDA a
    copy from pageable memory may synchronise with the stream (and a plain ``.to`` does), a
    ``non_blocking`` copy from pinned memory is queued behind the kernels already issued. The
    caller must not modify ``t`` afterwards (fresh per-step draws never are)."""
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def _col(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-sample vector as a (B, 1, 1, 1) tensor in ``x``'s dtype. :meth:`BatchAugment.apply`
    passes vectors already on ``x``'s device; a host vector (direct calls) is copied without a
    host sync."""
    if v.device != x.device:
        v = to_device_async(v, x.device)
    return v.to(x.dtype).view(-1, 1, 1, 1)


def _blend(a: torch.Tensor, b: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """torchvision's ``_blend`` (a·f + b·(1-f), clamped to [0, 1]) with a per-sample ratio."""
    f = _col(f, a)
    return (a * f + b * (1 - f)).clamp_(0, 1)


def adjust_brightness(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (x * _col(f, x)).clamp_(0, 1)


def adjust_contrast(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return _blend(x, TF.rgb_to_grayscale(x).mean((-3, -2, -1), keepdim=True), f)


def adjust_saturation(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return _blend(x, TF.rgb_to_grayscale(x), f)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Hue rotation by a per-sample fraction of the colour circle (``adjust_hue`` semantics)."""
    h, s, v = _rgb_to_hsv(x).unbind(-3)
    h = (h + _col(shift, x)[:, 0]).remainder_(1.0)
    return _hsv_to_rgb(torch.stack((h, s, v), -3))


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, ksize: int) -> torch.Tensor:
    """Gaussian blur with one sigma per sample: torchvision's kernel (softmax of -(t/σ)², t spaced
    over ±(k-1)/(2√2)) and reflect padding, as two depthwise 1-D convolutions over B·C groups."""
    b, c, h, w = x.shape
    lim = (ksize - 1) / (2.0 * math.sqrt(2.0))
    t = torch.linspace(-lim, lim, ksize, device=x.device, dtype=x.dtype)
    k = torch.softmax(-(t.view(1, -1) / _col(sigma, x).view(-1, 1)).pow(2), dim=1)
    k = k.repeat_interleave(c, 0)  # (b*c, ksize)
    pad = ksize // 2
    y = F.pad(x.reshape(1, b * c, h, w), (pad, pad, pad, pad), mode="reflect")
    y = F.conv2d(y, k.view(b * c, 1, 1, ksize), groups=b * c)
    y = F.conv2d(y, k.view(b * c, 1, ksize, 1), groups=b * c)
    return y.view(b, c, h, w)


def _on_subset(x: torch.Tensor, idx: torch.Tensor | None, fn, *per_sample: torch.Tensor) -> torch.Tensor:
    """``fn`` applied only to the samples ``idx`` (a device index; None: all of them), the others
    unchanged; ``per_sample`` are the chosen samples' values, already on the device."""
    if idx is None:
        return fn(x, *per_sample).contiguous()
    return x.contiguous().index_copy_(0, idx, fn(x.index_select(0, idx), *per_sample))


def _float3(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 1|3, H, W) → float32 in [0, 1] with 3 channels (gray is replicated)."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected a (B, 1 or 3, H, W) batch, got shape {tuple(images.shape)}")
    x = TF.to_dtype(images, torch.float32, scale=True)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


class BatchAugment(nn.Module):
    """uint8 (B, C, size, size) views → normalised float32 (B, 3, size, size), random per sample.

    ``forward(images, generator)`` = ``apply(images, sample_params(B, generator))``; the two
    halves are public so tests (and debugging) can inspect or force the parameters. ``size`` is
    the views' side (it sets the blur kernel); the crop's ``scale``/``ratio`` of a recipe's
    ``augment`` section belong to the views (:meth:`from_config` leaves them out)."""

    def __init__(self, size: int, hflip_p=0.5,
                 jitter_p=0.8, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1,
                 gray_p=0.2, blur_p=0.5, blur_sigma=(0.1, 2.0), blur_kernel_frac=0.1,
                 solarize_p=0.0, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        if not 0 <= hue <= 0.5:
            raise ValueError(f"hue must be in [0, 0.5], got {hue}")
        self.size = int(size)
        self.hflip_p, self.jitter_p, self.gray_p = hflip_p, jitter_p, gray_p
        self.brightness, self.contrast, self.saturation, self.hue = brightness, contrast, saturation, hue
        self.blur_p, self.blur_sigma, self.solarize_p = blur_p, tuple(blur_sigma), solarize_p
        k = max(3, int(blur_kernel_frac * self.size))
        self.blur_kernel = k + 1 - k % 2  # odd, like SimCLR's 10 % rule (224 px → 23)
        self.mean, self.std = [float(m) for m in mean], [float(s) for s in std]
        # as buffers that move with the objective (not saved: checkpoints stay as they were):
        # torchvision's normalize makes tensors of the two lists on the device every call, a
        # blocking host-to-device copy each
        self.register_buffer("_mean", torch.tensor(self.mean).view(-1, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(self.std).view(-1, 1, 1), persistent=False)

    def extra_repr(self) -> str:
        return (f"size={self.size}, hflip_p={self.hflip_p}, "
                f"jitter_p={self.jitter_p}, gray_p={self.gray_p}, blur_p={self.blur_p}, "
                f"blur_kernel={self.blur_kernel}, solarize_p={self.solarize_p}")

    @classmethod
    def from_config(cls, augment, size: int | None = None) -> "BatchAugment":
        """From a recipe's ``augment`` section, for views of ``size`` (default ``augment.size``)."""
        kwargs = OmegaConf.to_container(augment) if OmegaConf.is_config(augment) else dict(augment)
        for key in ("size", "scale", "ratio"):  # the views' crop, cut before this module
            kwargs.pop(key, None)
        return cls(size or augment.size, **kwargs)

    def sample_params(self, n: int, generator: torch.Generator) -> dict:
        """Every random draw for ``n`` images, as CPU tensors; a fixed number of draws per call
        whatever the settings, so RNG consumption (and resume) does not depend on the data.

        Keys: flip, jitter, order (B, 4: op ids of ``JITTER_OPS`` in the
        order applied), brightness, contrast, saturation (factors), hue (shift), gray, blur,
        sigma, solarize. Factors are U(max(0, 1-s), 1+s) and hue U(-h, h), as ColorJitter."""
        u = torch.rand(n, 11, generator=generator)
        order = torch.rand(n, 4, generator=generator).argsort(1)  # a uniform permutation per sample

        def factor(s: float, col: int) -> torch.Tensor:
            lo = max(0.0, 1.0 - s)
            return lo + (1.0 + s - lo) * u[:, col]

        lo, hi = self.blur_sigma
        return {"flip": u[:, 0] < self.hflip_p, "jitter": u[:, 1] < self.jitter_p,
                "order": order, "brightness": factor(self.brightness, 2),
                "contrast": factor(self.contrast, 3), "saturation": factor(self.saturation, 4),
                "hue": (2 * u[:, 5] - 1) * self.hue, "gray": u[:, 6] < self.gray_p,
                "blur": u[:, 7] < self.blur_p, "sigma": lo + (hi - lo) * u[:, 8],
                "solarize": u[:, 9] < self.solarize_p}

    def _ops(self, p: dict) -> list:
        """``(fn, CPU bool mask of the samples it applies to, per-sample key or None)`` in the
        order applied."""
        ops = []
        if self.hflip_p > 0:
            ops.append((lambda y: y.flip(-1), p["flip"], None))
        if self.jitter_p > 0:
            # An op with zero strength is skipped, as ColorJitter does (hue 0 would still
            # round-trip through HSV); the others run in each sample's own order.
            jitter = [(adjust_brightness, "brightness", self.brightness > 0),
                      (adjust_contrast, "contrast", self.contrast > 0),
                      (adjust_saturation, "saturation", self.saturation > 0),
                      (adjust_hue, "hue", self.hue > 0)]
            for step in range(len(jitter)):
                for op_id, (fn, key, active) in enumerate(jitter):
                    if active:
                        ops.append((fn, p["jitter"] & (p["order"][:, step] == op_id), key))
        if self.gray_p > 0:
            ops.append((lambda y: TF.rgb_to_grayscale(y, num_output_channels=3), p["gray"], None))
        if self.blur_p > 0:
            ops.append((lambda y, s: gaussian_blur(y, s, self.blur_kernel), p["blur"], "sigma"))
        if self.solarize_p > 0:
            ops.append((lambda y: TF.solarize(y, 0.5), p["solarize"], None))
        return ops

    def apply(self, images: torch.Tensor, p: dict) -> torch.Tensor:
        """The views of ``images`` for given parameters (see ``sample_params``).

        Which samples each op touches is decided on the CPU, and every index and per-sample value
        the ops need goes to the device in two copies per batch (pinned, ``non_blocking``): no
        host sync, and no per-op copy (16 small copies each cost the host ~10-20 µs)."""
        x = _float3(images)
        plan, index, values = [], [], []
        for fn, mask, key in self._ops(p):
            idx = mask.nonzero().flatten()
            if len(idx) == 0:
                continue
            whole = len(idx) == len(mask)
            if not whole:
                index.append(idx)
            if key is not None:
                values.append(p[key][idx].float())
            plan.append((fn, whole, key is not None))
        index = to_device_async(torch.cat(index), x.device).split([len(i) for i in index]) if index else []
        values = to_device_async(torch.cat(values), x.device).split([len(v) for v in values]) if values else []
        index, values = iter(index), iter(values)
        for fn, whole, has_value in plan:
            x = _on_subset(x, None if whole else next(index), fn, *([next(values)] if has_value else []))
        mean, std = self._mean, self._std
        if mean.device != x.device:  # a module that was not moved with its objective (benchmarks)
            mean, std = to_device_async(mean, x.device), to_device_async(std, x.device)
        return (x - mean) / std  # torchvision's normalize (sub_, div_), without its copies

    def forward(self, images: torch.Tensor, generator: torch.Generator,
                return_params: bool = False):
        """Views of ``images`` (on their device) with parameters drawn from the CPU ``generator``;
        float32 even inside an autocast region. With ``return_params``: (views, params)."""
        with torch.autocast(images.device.type, enabled=False):
            p = self.sample_params(images.shape[0], generator)
            out = self.apply(images, p)
        return (out, p) if return_params else out
