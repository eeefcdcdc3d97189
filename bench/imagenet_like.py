"""ImageNet-shaped JPEG image folders made offline from the photographs bundled with
scikit-image and scikit-learn.

Why: the data pipeline's costs (JPEG decode, resize, crop) and its failure modes (grayscale, CMYK,
progressive, mislabelled PNG, truncated and empty files) depend on what the files look like, and
synthetic noise or Fashion-MNIST look nothing like ImageNet. This module needs no network and no
data set download: every image is a random crop of one of ten real colour photos that ship inside
the ``scikit-image`` and ``scikit-learn`` wheels, rescaled to ImageNet's mix of sizes and aspect
ratios (median about 500x375, mostly 4:3 landscape, some portrait/square/wide, a heavy tail of
large ones), colour-shifted, and saved as baseline JPEG. The class of an image is the photo it was
cut from, so a k-NN probe on learned features has something to find.

Used by the tests (:func:`write_specials`, :func:`jpeg_bytes` for small files of known size and
kind) and by ``bench/data.py`` (:func:`write_folder`). Everything is deterministic given ``seed``.

    python bench/imagenet_like.py OUT_DIR --images 3000 [--seed 0] [--classes 10] [--max-side 2500]
"""

from __future__ import annotations

import argparse
import functools
import io
import time
from pathlib import Path

import numpy as np
from PIL import Image

# Aspect ratios (width / height) and their shares: ImageNet is mostly 4:3 landscape (Flickr),
# with some portrait, square and wide images.
ASPECTS = {
    4 / 3: 0.55, 3 / 2: 0.12, 16 / 9: 0.05, 2.0: 0.03,  # landscape
    3 / 4: 0.15, 2 / 3: 0.02,  # portrait
    1.0: 0.08,  # square
}
SPECIALS_PER_1000 = 3  # per kind (gray, CMYK, progressive); plus exactly one PNG named .jpg


@functools.lru_cache(maxsize=None)
def _photos() -> tuple[tuple[str, Image.Image], ...]:
    """The ten colour photographs bundled in the wheels (all load without a download)."""
    import skimage.data as sk
    from sklearn.datasets import load_sample_images

    arrays = {
        "astronaut": sk.astronaut(), "chelsea": sk.chelsea(), "coffee": sk.coffee(),
        "rocket": sk.rocket(), "motorcycle": sk.stereo_motorcycle()[0],
        "hubble": sk.hubble_deep_field(), "ihc": sk.immunohistochemistry(), "retina": sk.retina(),
    }
    sample = load_sample_images()
    for path, array in zip(sample.filenames, sample.images):
        arrays[Path(path).stem] = array  # china, flower
    return tuple((name, Image.fromarray(a[..., :3])) for name, a in arrays.items())


@functools.lru_cache(maxsize=None)
def _source(cls: int) -> tuple[str, Image.Image]:
    """Class ``cls``'s source photo. Beyond the ten photos they repeat, each repeat rotated by
    90 degrees and with its colour channels rolled, so that repeats are still distinct classes."""
    photos = _photos()
    name, img = photos[cls % len(photos)]
    turn = cls // len(photos)
    if turn:
        a = np.rot90(np.asarray(img), turn % 4)
        img = Image.fromarray(np.ascontiguousarray(np.roll(a, turn, axis=2)))
        name = f"{name}_r{turn}"
    return f"{cls:02d}_{name}", img


def _sample_size(rng: np.random.Generator, min_side: int, max_side: int) -> tuple[int, int]:
    """(width, height) following ImageNet: about 60% have a longer side of exactly 500 px (Flickr's
    size), the rest are log-normal around 600 px with a heavy tail (~4% above 1500 px)."""
    aspects = list(ASPECTS)
    aspect = aspects[rng.choice(len(aspects), p=list(ASPECTS.values()))]
    longer = 500.0 if rng.random() < 0.6 else 600.0 * np.exp(0.7 * rng.standard_normal())
    longer = int(round(min(max(longer, min_side), max_side)))
    shorter = max(1, int(round(longer / max(aspect, 1 / aspect))))
    return (longer, shorter) if aspect >= 1 else (shorter, longer)


def _colour_lut(rng: np.random.Generator) -> list[int]:
    """A 3 x 256 lookup table for ``Image.point``: per-channel gain, gamma and brightness,
    applied by PIL in C (no per-pixel Python)."""
    v = np.arange(256) / 255.0
    gamma, brightness = np.exp(rng.uniform(-0.35, 0.35)), rng.uniform(0.8, 1.2)
    gains = rng.uniform(0.85, 1.15, size=3)
    lut = np.concatenate([255.0 * brightness * g * v**gamma for g in gains])
    return np.clip(np.round(lut), 0, 255).astype(np.uint8).tolist()


def _render(cls: int, width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """A ``width`` x ``height`` RGB image: a random crop (30-100% of the largest crop of that
    aspect ratio) of class ``cls``'s photo, resized by PIL, maybe flipped, colour-shifted."""
    _, src = _source(cls)
    sw, sh = src.size
    aspect = width / height
    cw, ch = (sh * aspect, sh) if sw / sh > aspect else (sw, sw / aspect)
    scale = rng.uniform(0.3, 1.0)
    cw, ch = cw * scale, ch * scale
    x0, y0 = rng.uniform(0, sw - cw), rng.uniform(0, sh - ch)
    img = src.resize((width, height), Image.BILINEAR, box=(x0, y0, x0 + cw, y0 + ch))
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return img.point(_colour_lut(rng))


def _encode(img: Image.Image, mode: str = "RGB", progressive: bool = False, quality: int = 90,
            png: bool = False) -> bytes:
    """JPEG bytes in ``mode`` (RGB, L or CMYK; baseline unless ``progressive``), or PNG bytes."""
    buf = io.BytesIO()
    if png:
        img.save(buf, format="PNG")
    else:
        img.convert(mode).save(buf, format="JPEG", quality=quality, progressive=progressive)
    return buf.getvalue()


# write_folder's special kinds, as _encode arguments.
KINDS = {"rgb": {}, "gray": {"mode": "L"}, "cmyk": {"mode": "CMYK"},
         "progressive": {"progressive": True}, "png": {"png": True}}


def write_folder(root: str | Path, n: int, *, seed: int = 0, classes: int = 10, min_side: int = 200,
                 max_side: int = 2500, quality: int = 90, specials: bool = True) -> list[Path]:
    """Write ``n`` images as ``root/CLASSNAME/NNNNNN.jpg`` (torchvision ImageFolder layout), the
    classes taking turns. With ``specials`` (and ``n >= 8``) a few per thousand, at least one
    each, are grayscale, CMYK or progressive JPEGs, and exactly one is a PNG named ``.jpg``.
    Image ``i`` is the same whatever ``n`` is, apart from which images are special."""
    root = Path(root)
    kinds = ["rgb"] * n
    if specials and n >= 8:
        k = max(1, round(n * SPECIALS_PER_1000 / 1000))
        picked = iter(np.random.default_rng([seed, 1]).permutation(n).tolist())
        for kind in ("gray", "cmyk", "progressive"):
            for _ in range(k):
                kinds[next(picked)] = kind
        kinds[next(picked)] = "png"
    paths = []
    for i in range(n):
        rng = np.random.default_rng([seed, 0, i])
        cls = i % classes
        img = _render(cls, *_sample_size(rng, min_side, max_side), rng)
        path = root / _source(cls)[0] / f"{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_encode(img, quality=quality, **KINDS[kinds[i]]))
        paths.append(path)
    return paths


def jpeg_bytes(width: int, height: int, seed: int = 0, mode: str = "RGB", progressive: bool = False,
               quality: int = 90) -> bytes:
    """One photo-derived JPEG of exactly ``width`` x ``height`` in ``mode`` (RGB, L or CMYK), for
    tests that need a real, non-square image of a given size."""
    rng = np.random.default_rng([seed, 2, width, height])
    img = _render(seed % len(_photos()), width, height, rng)
    return _encode(img, mode, progressive, quality)


def write_specials(folder: str | Path) -> dict[str, Path]:
    """Tiny (24-96 px, non-square) files of every kind the pipeline must handle, for unit tests:
    ``rgb`` (baseline JPEG, landscape), ``portrait``, ``gray``, ``cmyk``, ``progressive``,
    ``png_as_jpg`` (PNG bytes), ``truncated`` (a JPEG cut at half its bytes), ``zero`` (empty)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    truncated = jpeg_bytes(88, 56, seed=6)
    data = {
        "rgb": jpeg_bytes(80, 60, seed=0),
        "portrait": jpeg_bytes(48, 64, seed=1),
        "gray": jpeg_bytes(72, 54, seed=2, mode="L"),
        "cmyk": jpeg_bytes(64, 40, seed=3, mode="CMYK"),
        "progressive": jpeg_bytes(96, 54, seed=4, progressive=True),
        "png_as_jpg": _encode(_render(5, 60, 45, np.random.default_rng(5)), png=True),
        "truncated": truncated[: len(truncated) // 2],
        "zero": b"",
    }
    paths = {}
    for key, blob in data.items():
        paths[key] = folder / f"{key}.jpg"
        paths[key].write_bytes(blob)
    return paths


def summarize(paths: list[Path]) -> str:
    """One line on what was written, read back from the files' headers (PIL opens lazily)."""
    sizes, special, nbytes = [], 0, 0
    for p in paths:
        nbytes += p.stat().st_size
        with Image.open(p) as im:
            sizes.append(im.size)
            special += im.format != "JPEG" or im.mode != "RGB" or bool(im.info.get("progressive"))
    w, h = np.array(sizes).T
    return (f"{len(paths)} images, median {int(np.median(w))}x{int(np.median(h))}, "
            f"landscape {np.mean(w > h):.0%} portrait {np.mean(w < h):.0%} "
            f"square {np.mean(w == h):.0%}, "
            f"sides {min(w.min(), h.min())}-{max(w.max(), h.max())} px, "
            f"{nbytes / 1e6:.1f} MB, {special} specials")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="output folder (ImageFolder layout)")
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--max-side", type=int, default=2500)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    paths = write_folder(args.out, args.images, seed=args.seed, classes=args.classes,
                         max_side=args.max_side)
    print(f"{args.out}: {summarize(paths)}, {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
