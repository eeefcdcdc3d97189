"""Decoding a sample's views: only as many pixels as its crops need, on the CPU or on the GPU.

Both paths take the crop boxes drawn from the image's header size (:mod:`selfsup.views`) and give
the same thing, uint8 views (V, 3, S, S) per sample, so what follows never knows which ran.

* **CPU** (:func:`decode_views`, in the loader's workers): a JPEG is decoded with libjpeg's DCT
  scaling (PIL's ``draft``) at the largest reduction 1/2, 1/4 or 1/8 that still leaves every box at
  least ``S`` pixels across, so a 2,000-px photo whose crops are 224 px is decoded at 500 px. Every
  view is then cut and resized in one antialiased bilinear ``Image.resize(box=...)``, what
  ``RandomResizedCrop`` does on a PIL image, from the pixels around the box rather than a copy
  clamped at its edge. Neither PIL nor torchvision can decode only a region of a JPEG, so the
  scaled image is decoded whole.
* **Device** (:class:`DeviceDecoder`, for machines with few cores per GPU): workers only read the
  bytes and the header; the JPEGs of a batch are decoded together by
  ``torchvision.io.decode_jpeg(list, device=...)`` (nvJPEG on CUDA) and every view is cut with
  ``roi_align`` (bilinear samples averaged over each output pixel's footprint: antialiased when
  shrinking, plain bilinear when enlarging). Samples the device decoder should not get (PNG, WEBP,
  CMYK, progressive JPEGs, a JPEG without its end marker) are decoded by the worker on the CPU
  path; a JPEG the device decoder still refuses is decoded on the host, and one nobody can decode takes another
  sample's views and is counted as corrupt (the batch keeps its size: every rank must). With
  ``device="cpu"`` the same code runs on the CPU, which is how the tests cover it.

**The device's pixel budget** (:func:`to_device`). nvJPEG decodes a JPEG whole, at the size its
header claims, while the CPU path decodes it DCT-scaled: 48 copies of a 1.9 KB JPEG whose header
claims 9000 x 9000 once took 8.8 GB (243 MB each on the device) against 0.91 GB on the CPU path.
So a worker sends a JPEG to the device only while the batch's JPEGs stay within
:func:`device_pixel_budget` (``batch_size`` x 2 M pixels, ``SELFSUP_DEVICE_PIXELS`` pixels per
image to change it), and never one larger than its per-image share that the CPU path would
DCT-scale down: those are decoded scaled by the worker, as with ``decode="cpu"``.
"""

from __future__ import annotations

import io
import os

import numpy as np
import torch
from PIL import Image

from selfsup_io.images import check_pixels, to_8bit

JPEG_DEVICE_MODES = ("RGB", "L")  # what nvJPEG decodes to RGB; CMYK/YCCK stay on the CPU
JPEG_FORMATS = ("JPEG", "MPO")  # MPO: the multi-picture JPEG of many cameras (first picture)
DEVICE_PIXELS_ENV = "SELFSUP_DEVICE_PIXELS"
DEVICE_PIXELS_PER_IMAGE = 1 << 21  # 2 M pixels (e.g. 1672 x 1254): 6 MB decoded, per batch image


def open_image(data: bytes) -> Image.Image:
    """A lazily opened PIL image (header parsed, pixels not decoded). Raises on empty or
    unrecognised bytes."""
    if not data:
        raise ValueError("empty image member")
    return Image.open(io.BytesIO(data))


def dct_reduction(boxes: torch.Tensor, size: int) -> int:
    """The largest JPEG DCT reduction (8, 4, 2 or 1) that keeps every box (V, 4: top, left, h, w)
    at least ``size`` pixels high and wide, i.e. that never decodes fewer pixels than a crop needs."""
    need = float(boxes[:, 2:].min()) / size
    return next(r for r in (8, 4, 2, 1) if r <= need or r == 1)


def decode_views(data: bytes | Image.Image, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (V, 3, size, size): the ``boxes`` (original-image pixels) of one encoded image, each
    resized to ``size``² (antialiased bilinear). Grayscale (16-bit too), CMYK, palette and alpha
    images are converted to RGB. Raises on undecodable or truncated data, and on an image larger
    than ``selfsup_io.images.max_pixels`` once DCT-scaled."""
    img = data if isinstance(data, Image.Image) else open_image(data)
    with img:
        width = img.size[0]
        scale = 1.0
        if img.format in JPEG_FORMATS:
            r = dct_reduction(boxes, size)
            drafted = img.draft(None, (img.size[0] // r, img.size[1] // r)) if r > 1 else None
            if drafted is not None:
                scale = drafted[1][2] / width  # 1 / the reduction libjpeg will apply
        check_pixels(*img.size)  # what load() allocates (after DCT scaling): bombs stop here
        img.load()  # decodes; raises on truncated or corrupt data
        rgb = to_8bit(img)  # 16-bit grayscale by its high byte (convert would clip at 255)
        rgb = rgb if rgb.mode == "RGB" else rgb.convert("RGB")  # convert("RGB") would copy
        out = np.empty((len(boxes), 3, size, size), dtype=np.uint8)
        for v, (top, left, h, w) in enumerate((boxes * scale).tolist()):
            view = rgb.resize((size, size), Image.BILINEAR, box=(left, top, left + w, top + h))
            out[v] = np.asarray(view).transpose(2, 0, 1)  # numpy: no torch thread pool per image
    return torch.from_numpy(out)


def device_decodable(img: Image.Image, data: bytes) -> bool:
    """Whether a sample goes to the device decoder: a baseline JPEG in RGB or grayscale whose
    bytes end with the end-of-image marker (a cheap test that catches truncated files, which
    nvJPEG may decode to grey without complaint). Progressive JPEGs stay on the CPU path:
    nvJPEG Huffman-decodes them on the host, one at a time, in the training process."""
    return img.format == "JPEG" and img.mode in JPEG_DEVICE_MODES and \
        not img.info.get("progressive") and data.rstrip(b"\x00")[-2:] == b"\xff\xd9"


def device_pixels_per_image() -> int:
    """The per-image share of the device decoder's pixel budget (``SELFSUP_DEVICE_PIXELS``)."""
    value = os.environ.get(DEVICE_PIXELS_ENV)
    return int(value) if value else DEVICE_PIXELS_PER_IMAGE


def device_pixel_budget(batch_size: int) -> int:
    """Pixels the device decoder may decode whole for one batch (decoded RGB: 3 bytes each)."""
    return batch_size * device_pixels_per_image()


def to_device(width: int, height: int, boxes: torch.Tensor, size: int, left: int) -> bool:
    """Whether a device-decodable JPEG of ``width`` x ``height`` goes to the device when ``left``
    pixels of the batch's budget remain: not if it exceeds them, and not if it exceeds its
    per-image share while the CPU path would decode it DCT-scaled (1/2 to 1/8 of each side)."""
    pixels = width * height
    if pixels > left:
        return False
    return pixels <= device_pixels_per_image() or dct_reduction(boxes, size) == 1


def crop_resize(image: torch.Tensor, boxes: torch.Tensor, size: int,
                on_device: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 (3, H, W) image on any device → uint8 (V, 3, size, size): each box (top, left, h, w)
    resized with ``roi_align`` (aligned pixel centres; one bilinear sample per output pixel when
    enlarging, ceil(box/size)² averaged samples when shrinking). Only the part of the image the
    boxes cover (plus a pixel of border) is converted to float. ``boxes`` live on the CPU (the
    bounds are computed there: no device read); ``on_device`` is the same boxes already on the
    image's device, when the caller has moved a whole batch of them at once."""
    from torchvision.ops import roi_align

    top, left, h, w = boxes.unbind(1)
    y0, x0 = max(int(top.min()) - 1, 0), max(int(left.min()) - 1, 0)
    y1 = min(int((top + h).max()) + 2, image.shape[1])
    x1 = min(int((left + w).max()) + 2, image.shape[2])
    part = image[None, :, y0:y1, x0:x1].float()
    if on_device is None:
        on_device = boxes.to(image.device, torch.float32)
    t, lf, bh, bw = on_device.float().unbind(1)
    rois = torch.stack([torch.zeros_like(t), lf - x0, t - y0, lf - x0 + bw, t - y0 + bh], 1)
    out = roi_align(part, rois, (size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    return out.round_().clamp_(0, 255).to(torch.uint8)


class DeviceDecoder:
    """Decodes a batch's JPEGs on ``device`` and cuts their views there (see the module
    docstring). ``decode(batch)`` returns the batch with ``image`` (B, V, 3, S, S) on the device
    and the corrupt count raised by the samples nobody could decode."""

    def __init__(self, device, size: int):
        self.device, self.size = torch.device(device), size

    def _decode_all(self, jpegs: list[torch.Tensor]) -> list[torch.Tensor | None]:
        from torchvision.io import ImageReadMode, decode_jpeg

        if self.device.type == "cuda":
            # torchvision's CUDA decoder writes its outputs from a private stream that does not
            # wait for the current one, so memory the previous step freed while its kernels are
            # still queued (zero_grad's gradients) could be overwritten: drain the stream first
            torch.cuda.current_stream(self.device).synchronize()
        try:
            return list(decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=self.device))
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception:  # one bad file fails the whole batched call: retry one by one
            out = []
            for data in jpegs:
                try:
                    out.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device))
                except torch.cuda.OutOfMemoryError:
                    raise
                except Exception:  # nvJPEG's and libjpeg's errors are not all RuntimeError
                    out.append(None)
            return out

    def decode(self, batch: dict) -> dict:
        batch = dict(batch)
        rows, boxes = batch.pop("jpeg_rows"), batch.pop("jpeg_boxes")
        jpegs = list(batch.pop("jpeg").split(batch.pop("jpeg_sizes").tolist()))
        done, image_rows = batch.pop("image"), batch.pop("image_rows")
        views = torch.empty((len(rows) + len(image_rows), boxes.shape[1], 3, self.size, self.size),
                            dtype=torch.uint8, device=self.device)
        if len(image_rows):  # decoded by the worker (PNG, CMYK, progressive, ...)
            views[image_rows.to(self.device, non_blocking=True)] = done.to(self.device, non_blocking=True)
        on_device = boxes.to(self.device, torch.float32, non_blocking=True)  # one copy per batch
        failed = []
        for i, (row, data, img) in enumerate(zip(rows.tolist(), jpegs, self._decode_all(jpegs))):
            try:
                views[row] = crop_resize(img, boxes[i], self.size, on_device[i]) if img is not None else \
                    decode_views(data.numpy().tobytes(), boxes[i], self.size).to(self.device)
            except torch.cuda.OutOfMemoryError:
                raise
            except Exception:  # refused by the device and by PIL: counted, replaced below
                failed.append(row)
        if failed:
            good = sorted(set(range(len(views))) - set(failed))
            if not good:
                raise ValueError(f"none of the {len(views)} images of a batch could be decoded")
            for i, row in enumerate(failed):
                views[row] = views[good[i % len(good)]]
            batch["corrupt"] = batch.get("corrupt", 0) + len(failed)
        batch["image"] = views
        return batch
