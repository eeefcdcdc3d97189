"""``selfsup-shards SOURCE OUT_DIR --split NAME``: the shard writer (docs/formats.md).

Writer choices worth knowing:

* Image folders, ``--image-format keep`` (the default): every file is stored byte for byte under
  the member extension of its real format, as PIL sniffs it from the header (the name's extension
  does not count, and no pixels are decoded): JPEG → ``KEY.jpg``, PNG → ``KEY.png``, WebP →
  ``KEY.webp``. Other formats (BMP, TIFF, GIF, PPM, ...) are decoded and re-encoded as PNG, since
  readers only promise jpg/jpeg/png/webp. So ImageNet-style data suffers no second lossy encoding
  and writing runs at file-copy speed. A file PIL cannot open (or, when it has to be re-encoded,
  decode) is skipped and counted; the count and one example are printed at the end, and only a
  folder with no readable image at all is an error. ``--image-format jpg`` copies JPEG files in
  mode L/RGB and re-encodes the others at ``--jpeg-quality``; ``png`` re-encodes everything as
  PNG. Each sample also gets ``KEY.json`` = ``{"path": "CLASS/FILE"}`` (relative to SOURCE), so a
  key can be traced back to its file.
* ``--max-side N`` (any source): an image whose longer side exceeds N is downscaled (antialiased;
  JPEGs are first reduced in the DCT domain with ``draft``, which makes this cheap) so that its
  longer side is N, and re-encoded in the format it would have been stored in (JPEG and WebP at
  ``--jpeg-quality``, PNG losslessly). Images within N are stored as without the option.
* Array sources (``.npz``, ``torchvision:``) are encoded as PNG (lossless) under ``keep`` and
  ``png``, as JPEG under ``jpg``.
* ``.npz``: ``labels`` may be left out for unlabelled data (then ``class_names`` is null and
  samples have no ``.cls``); without ``class_names`` classes are named ``"0"``, ``"1"``, ...
* ``torchvision:NAME:ROOT``: ``--split train`` reads the train set, ``test``/``val`` the test set;
  other split names need ``--torchvision-split``. SVHN, DTD, Flowers102, OxfordIIITPet, PCAM and
  CLEVRClassification (count) are read with the splits VTAB uses (:data:`SPLIT_SETS`). For the MNIST family the raw idx files are read
  directly (``.gz`` or not), either in ROOT itself (the Debian package dataset-fashion-mnist puts
  them in /usr/share/datasets/fashion-mnist) or in torchvision's ``ROOT/NAME/raw``.
* Every file is written as ``*.tmp`` and renamed; the index is removed first and written last, so
  an interrupted run never leaves an index that describes half-written shards. Shards of the same
  split left over from an earlier, longer run are removed. Tars are byte-reproducible (mtime 0).
  The index records the options that shaped the members: ``image_format`` (``keep``, ``png`` or
  ``jpg``) and ``max_side`` (null or N). A run holds ``OUT/.SPLIT.lock`` (``flock``, as
  ``run.dir`` is locked): a second writer of the same folder and split exits 2 naming the first.
  Only regular files are read: a FIFO or device named ``x.jpg`` is skipped and named, not opened
  to wait forever.
"""

from __future__ import annotations

import argparse
import gzip
import io
import itertools
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
from PIL import Image

from selfsup_io.progress import Progress
from selfsup_io.images import check_pixels, to_8bit
from selfsup_io.jpeg_check import check_jpeg
from selfsup_io.shards import INDEX_FORMAT, SHARD_NAME
from selfsup.folder_walk import class_files, read_regular
from selfsup.rundir import RunDirLock

# data sets torchvision reads with a split argument: the torchvision splits that --split train and
# --split test/val write, VTAB's choice of them (docs/transfer-suite.md): DTD and Flowers102 train on
# train + val; CLEVR's test split has no labels, so its val split is the test split
SPLIT_SETS = {"SVHN": (("train",), ("test",)), "DTD": (("train", "val"), ("test",)),
              "Flowers102": (("train", "val"), ("test",)), "OxfordIIITPet": (("trainval",), ("test",)),
              "PCAM": (("train",), ("test",)), "CLEVRClassification": (("train",), ("val",))}
TORCHVISION_SETS = ("MNIST", "FashionMNIST", "KMNIST", "CIFAR10", "CIFAR100", *SPLIT_SETS)
MNIST_FAMILY = ("MNIST", "FashionMNIST", "KMNIST")
IMAGE_FORMATS = ("keep", "png", "jpg")
MIN_MAX_SIDE = 16
# PIL format → member extension of the formats that readers promise to decode (MPO: the
# multi-picture JPEG that many cameras write; any JPEG decoder reads its first picture).
KEPT_FORMATS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}


# -------------------------------------------------------------------------------- sources ----
# A source is (items, count, class_names): items yields (image, label | None, extra json | None),
# the image as a PIL image or a uint8 array (encoded by the writer), a finished member
# (EXT, bytes) to store as it is, or None for a file that could not be read (then extra has
# "file" and "error" and nothing is written for it).
def _npz_source(path: Path):
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in ("images", "labels", "class_names") if k in data.files}
    except Exception as e:  # zipfile.BadZipFile, pickled object arrays, ...
        raise ValueError(f"{path} is not a readable .npz ({type(e).__name__}: {e})") from None
    images, labels = arrays.get("images"), arrays.get("labels")
    if images is None:
        raise ValueError(f"{path} has no 'images' array (expected images (N,H,W[,C]) uint8 and labels (N,))")
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if images.dtype != np.uint8 or not (images.ndim == 3 or (images.ndim == 4 and images.shape[-1] in (3, 4))):
        raise ValueError(f"{path}: 'images' must be uint8 (N,H,W) or (N,H,W,C) with C in 1/3/4, "
                         f"got {images.dtype} {images.shape}")
    if len(images) == 0:
        raise ValueError(f"{path}: 'images' is empty")
    names = [str(n) for n in arrays["class_names"]] if "class_names" in arrays else None
    if labels is not None:
        if labels.ndim != 1 or len(labels) != len(images):
            raise ValueError(f"{path}: 'labels' must have shape ({len(images)},), got {labels.shape}")
        if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
            raise ValueError(f"{path}: 'labels' must be non-negative integers, got {labels.dtype}")
        names = names or [str(c) for c in range(int(labels.max()) + 1)]
        if labels.max() >= len(names):
            raise ValueError(f"{path}: label {labels.max()} but only {len(names)} class_names")
    elif names is not None:
        raise ValueError(f"{path} has 'class_names' but no 'labels'")
    items = ((images[i], None if labels is None else int(labels[i]), None) for i in range(len(images)))
    return items, len(images), names


def _plain_mode(img: Image.Image) -> Image.Image:
    """1 or 3 channels, which is what readers want (1, LA → L; RGBA, palette, CMYK, ... → RGB;
    16-bit grayscale → L by its high byte, selfsup_io.images.to_8bit, not clipped at 255)."""
    img = to_8bit(img)
    return img if img.mode in ("L", "RGB") else img.convert("L" if img.mode in ("1", "LA") else "RGB")


def _downscale(img: Image.Image, max_side: int) -> Image.Image:
    """``img`` with its longer side reduced to ``max_side`` (aspect ratio kept to the nearest pixel),
    in mode L or RGB. A JPEG is first reduced in the DCT domain (``draft``: 1/2, 1/4 or 1/8, never
    below twice the target), so that a large photo is not fully decoded; then antialiased LANCZOS."""
    w, h = img.size
    scale = max_side / max(w, h)
    size = (max_side, max(1, round(h * scale))) if w >= h else (max(1, round(w * scale)), max_side)
    if img.format in ("JPEG", "MPO"):
        img.draft(None, (2 * size[0], 2 * size[1]))
    return _plain_mode(img).resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def _save(img: Image.Image, ext: str, quality: int) -> bytes:
    buf = io.BytesIO()
    img = _plain_mode(img)
    if ext == "png":
        img.save(buf, format="PNG")
    elif ext == "webp":
        img.save(buf, format="WEBP", quality=quality)
    else:
        img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _folder_member(data: bytes, image_format: str, max_side: int | None, quality: int) -> tuple[str, bytes]:
    """One image file → (member extension, bytes) under ``image_format``/``max_side`` (see the
    module docstring). Only the header is parsed unless the image has to be re-encoded; raises
    (OSError, ValueError, ...) on a file PIL cannot open or, when re-encoding, decode."""
    with Image.open(io.BytesIO(data)) as img:  # lazy: header only
        fmt = img.format
        w, h = img.size  # readers decode a JPEG DCT-scaled (1/8 at most), anything else whole
        check_pixels(*((w // 8, h // 8) if fmt in ("JPEG", "MPO") else (w, h)))
        if image_format == "keep":
            ext = KEPT_FORMATS.get(fmt, "png")
            copy = fmt in KEPT_FORMATS
        elif image_format == "jpg":
            ext, copy = "jpg", fmt in ("JPEG", "MPO") and img.mode in ("L", "RGB")
        else:
            ext, copy = "png", False
        if copy and (max_side is None or max(img.size) <= max_side):
            return ext, data  # the original file, no second lossy encoding
        check_jpeg(data)  # re-encoding a JPEG that ends early would store its grey as good data
        if max_side is not None and max(img.size) > max_side:
            return ext, _save(_downscale(img, max_side), ext, quality)
        return ext, _save(img, ext, quality)


def _unreadable_reason(e: Exception) -> str:
    if isinstance(e, Image.UnidentifiedImageError):
        return "not an image PIL can open"
    return " ".join(f"{type(e).__name__}: {e}".split())


def _folder_source(path: Path, image_format: str, max_side: int | None, quality: int):
    from torchvision.datasets.folder import find_classes

    classes, class_to_idx = find_classes(str(path))
    ignored: list[str] = []
    samples, links = class_files(path, class_to_idx, ignored)
    if links:
        print(f"selfsup-shards: warning: not following {len(links)} link(s) to folders already "
              f"read, or to files of another class or already listed ({', '.join(links[:5])}"
              f"{', ...' if len(links) > 5 else ''}): every folder and image is read once, under "
              "its own class", file=sys.stderr)
    if ignored:
        print(f"selfsup-shards: warning: not writing {len(ignored)} file(s) without an image "
              f"extension: {', '.join(ignored[:5])}{', ...' if len(ignored) > 5 else ''}", file=sys.stderr)

    def items():
        for file, label in samples:
            extra = {"path": os.path.relpath(file, path)}
            try:
                member = _folder_member(read_regular(file), image_format, max_side, quality)
            except Exception as e:  # unreadable file, truncated data, decompression bomb, ...
                yield None, label, {"file": file, "error": _unreadable_reason(e)}
                continue
            yield member, label, extra

    return items(), len(samples), classes


def _read_idx(root: Path, name: str, subset: str):
    """MNIST-family idx files (gzipped or not) in ROOT or ROOT/NAME/raw, read with torchvision's
    own parser. Returns None when there are none, so torchvision's class can say what is missing."""
    from torchvision.datasets.mnist import read_image_file, read_label_file

    prefix = "train" if subset == "train" else "t10k"
    for folder in (root, root / name / "raw"):
        found = {kind: sorted(folder.glob(f"{prefix}-{kind}-idx?-ubyte*")) for kind in ("images", "labels")}
        if not found["images"] and not found["labels"]:
            continue
        if not found["images"] or not found["labels"]:
            missing = "images" if not found["images"] else "labels"
            raise ValueError(f"{folder} has no {prefix}-{missing}-idx*-ubyte[.gz] file")
        arrays = []
        with tempfile.TemporaryDirectory() as tmp:  # torchvision's parser reads plain files only
            for kind, reader in (("images", read_image_file), ("labels", read_label_file)):
                src, plain = found[kind][0], os.path.join(tmp, kind)
                with (gzip.open if src.suffix == ".gz" else open)(src, "rb") as f, open(plain, "wb") as g:
                    shutil.copyfileobj(f, g)
                try:
                    arrays.append(reader(plain).numpy())
                except (AssertionError, TypeError, ValueError, RuntimeError):
                    raise ValueError(f"{src} is not a valid idx {kind} file") from None
        if len(arrays[0]) != len(arrays[1]):
            raise ValueError(f"{folder}: {len(arrays[0])} images but {len(arrays[1])} labels")
        return arrays
    return None


def _torchvision_source(spec: str, subset: str):
    """``torchvision:NAME:ROOT``: a data set already on disk, read with torchvision (download=False)."""
    import torchvision.datasets as tvd

    _, name, root = (spec.split(":", 2) + ["", ""])[:3]
    if name not in TORCHVISION_SETS:
        raise ValueError(f"{spec}: unsupported torchvision data set {name!r} (one of "
                         f"{', '.join(TORCHVISION_SETS)}; expected torchvision:NAME:ROOT)")
    if not root or not os.path.isdir(os.path.expanduser(root)):
        raise ValueError(f"{spec}: ROOT {root!r} is not a directory")
    root = os.path.expanduser(root)
    classes = list(getattr(tvd, name).classes) if name in MNIST_FAMILY else None
    if name in MNIST_FAMILY and (raw := _read_idx(Path(root), name, subset)) is not None:
        images, labels = raw
        return ((images[i], int(labels[i]), None) for i in range(len(images))), len(images), classes
    if name in SPLIT_SETS:
        parts = SPLIT_SETS[name][0 if subset == "train" else 1]
        try:
            sets = [getattr(tvd, name)(root, split=part, download=False) for part in parts]
        except Exception as e:  # not found, a missing optional reader (h5py, scipy), a bad file
            reason = " ".join(str(e).split(". You can use download")[0].split())[:200] or type(e).__name__
            raise ValueError(f"{spec}: {reason} in {root} (torchvision's {name} layout, splits "
                             f"{'+'.join(parts)})") from None
        names = getattr(sets[0], "classes", None)
        items = ((img, int(label), None) for ds in sets for img, label in ds)
        return items, sum(len(ds) for ds in sets), list(names) if names is not None else None
    try:
        ds = getattr(tvd, name)(root, train=subset == "train", download=False)
    except RuntimeError as e:
        reason = str(e).split(". You can use download")[0]  # selfsup never downloads
        raise ValueError(f"{spec}: {reason} in {root} (torchvision's layout; for "
                         f"{', '.join(MNIST_FAMILY)} a folder with the raw idx files also works)") from None
    return ((img, int(label), None) for img, label in ds), len(ds), list(ds.classes)


def open_source(source: str, split: str, image_format: str = "keep", torchvision_split: str | None = None,
                max_side: int | None = None, quality: int = 95):
    """SOURCE → (items, count, class_names); ValueError/OSError with a one-line message if bad.
    ``count`` counts image files, unreadable ones included."""
    if source.startswith("torchvision:"):
        subset = torchvision_split or {"train": "train", "test": "test", "val": "test"}.get(split)
        if subset is None:
            raise ValueError(f"--split {split}: for torchvision sources name the split train/test/val "
                             "or pass --torchvision-split train|test")
        return _torchvision_source(source, subset)
    path = Path(source).expanduser()
    if not path.exists():
        raise ValueError(f"SOURCE {source} does not exist")
    if path.is_file() and path.suffix == ".npz":
        return _npz_source(path)
    if path.is_dir():
        return _folder_source(path, image_format, max_side, quality)
    raise ValueError(f"SOURCE {source}: expected an image folder, an .npz or torchvision:NAME:ROOT")


# -------------------------------------------------------------------------------- writing ----
def _encode(image, image_format: str, max_side: int | None, quality: int) -> tuple[str, bytes]:
    """A source item's image → (member extension, bytes)."""
    if isinstance(image, tuple):
        return image  # finished by the source (image folders)
    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    if max_side is not None and max(img.size) > max_side:
        img = _downscale(img, max_side)
    ext = "jpg" if image_format == "jpg" else "png"  # keep: arrays have no original bytes; lossless
    return ext, _save(img, ext, quality)


def write_shards(source: str, out_dir: str, split: str, shard_size: int = 5000,
                 image_format: str = "keep", quality: int = 95,
                 torchvision_split: str | None = None, max_side: int | None = None) -> Path:
    """Write ``OUT/SPLIT-%06d.tar`` + ``OUT/SPLIT.json`` (see the module docstring). Unreadable
    image files are skipped; their count and one example go to stderr at the end."""
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format {image_format!r}: expected one of {', '.join(IMAGE_FORMATS)}")
    if max_side is not None and max_side < MIN_MAX_SIDE:
        raise ValueError(f"max_side {max_side}: must be at least {MIN_MAX_SIDE}")
    items, total, class_names = open_source(source, split, image_format, torchvision_split, max_side, quality)
    if total == 0:
        raise ValueError(f"SOURCE {source} has no images")
    skipped: list[dict] = []
    items = iter(items)
    for first in items:  # find a readable image before touching OUT_DIR
        if first[0] is not None:
            items = itertools.chain([first], items)
            break
        skipped.append(first[2])
    else:
        bad = skipped[0] if skipped else None
        raise ValueError(f"SOURCE {source}: none of its {total} image file(s) could be read, e.g. "
                         f"{bad['file']} ({bad['error']})" if bad else f"SOURCE {source} has no images")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lock = RunDirLock(out, f".{split}.lock", f"split {split} of {out}", "selfsup-shards",
                      "write another folder or split", remove=True)  # two writers would mix shards
    try:
        return _write(out, split, items, skipped, total, class_names, shard_size, image_format,
                      quality, max_side)
    finally:
        lock.release()


def _write(out: Path, split: str, items, skipped: list, total: int, class_names, shard_size: int,
           image_format: str, quality: int, max_side: int | None) -> Path:
    """:func:`write_shards` once OUT/SPLIT is locked."""
    import webdataset as wds

    index_path = out / f"{split}.json"
    index_path.unlink(missing_ok=True)  # no index describing a mix of old and new shards
    shards: list[dict] = []
    file = writer = tmp = None

    def finish():
        writer.close()
        file.flush()
        os.fsync(file.fileno())
        file.close()
        os.replace(tmp, out / shards[-1]["name"])

    try:
        # a bar on a terminal, a plain line a minute in a batch job (selfsup_io.progress)
        bar = Progress(total, f"shards {split}", unit="img", initial=len(skipped))
        written = False
        try:  # closed on errors too
            i = 0  # samples written; skipped files take no key, so keys stay contiguous
            for image, label, extra in items:
                if image is None:
                    skipped.append(extra)
                    bar.update()
                    continue
                if i % shard_size == 0:
                    if writer is not None:
                        finish()
                    shards.append({"name": f"{split}-{len(shards):06d}.tar", "num_samples": 0})
                    tmp = out / (shards[-1]["name"] + ".tmp")
                    file = open(tmp, "wb")
                    writer = wds.TarWriter(file, encoder=False, mtime=0)  # mtime 0: reproducible
                ext, data = _encode(image, image_format, max_side, quality)
                sample = {"__key__": f"{split}-{i:08d}", ext: data}
                if label is not None:
                    sample["cls"] = str(label).encode()
                if extra is not None:
                    sample["json"] = json.dumps(extra).encode()
                writer.write(sample)
                shards[-1]["num_samples"] += 1
                i += 1
                bar.update()
            if writer is not None:
                finish()
            written = True
        finally:
            bar.close(done=written)  # "stopped", not "done", before an error
    except BaseException:
        if file is not None and not file.closed:
            writer.close()  # else tarfile writes its trailer into the closed file at exit
            file.close()
            Path(tmp).unlink(missing_ok=True)
        raise
    for old in out.glob(f"{split}-*.tar"):  # left over from an earlier, longer run of this split
        match = SHARD_NAME.fullmatch(old.name)
        if match and match.group(1) == split and len(match.group(2)) == 6 and int(match.group(2)) >= len(shards):
            old.unlink()
    index = {"format": INDEX_FORMAT, "split": split, "num_samples": sum(s["num_samples"] for s in shards),
             "class_names": class_names, "image_format": image_format, "max_side": max_side,
             "shards": shards}
    tmp_index = out / f".{split}.json.tmp"
    tmp_index.write_text(json.dumps(index, indent=1) + "\n")
    os.replace(tmp_index, index_path)
    if skipped:
        named = "; ".join(f"{s['file']} ({s['error']})" for s in skipped[:5])
        more = f"; and {len(skipped) - 5} more" if len(skipped) > 5 else ""
        print(f"selfsup-shards: warning: skipped {len(skipped)} unreadable file(s): {named}{more}",
              file=sys.stderr)
    return index_path


def main(argv: list[str] | None = None) -> int:
    """``selfsup-shards SOURCE OUT_DIR --split NAME``; bad input exits 2 with one stderr line."""
    p = argparse.ArgumentParser(prog="selfsup-shards", description="Write WebDataset shards + index "
                                "(docs/formats.md) from an image folder, an .npz or a torchvision data set.")
    p.add_argument("source", help="image folder (one sub-folder per class), .npz with images "
                   "(N,H,W[,C]) uint8 + labels (N,) [+ class_names], or torchvision:NAME:ROOT "
                   f"({', '.join(TORCHVISION_SETS)}, already on disk)")
    p.add_argument("out_dir")
    p.add_argument("--split", required=True, help="split name: train, val, test, ... (file names "
                   "and keys; for torchvision sources also picks the train or test set)")
    p.add_argument("--shard-size", type=int, default=5000, help="samples per tar (default 5000)")
    p.add_argument("--image-format", choices=IMAGE_FORMATS, default="keep",
                   help="keep (default): image files byte for byte under their real format's "
                   "extension (jpg/png/webp; other formats re-encoded as PNG; arrays as PNG); "
                   "png: re-encode everything as PNG; jpg: copy L/RGB JPEGs, re-encode the rest as JPEG")
    p.add_argument("--max-side", type=int, default=None, metavar="N",
                   help="downscale images whose longer side exceeds N to N (re-encoded in their "
                   "own format); smaller images are stored as without it")
    p.add_argument("--jpeg-quality", type=int, default=95,
                   help="for re-encoded jpg (and downscaled webp) (default 95)")
    p.add_argument("--torchvision-split", choices=("train", "test"), default=None,
                   help="torchvision set to read when --split is not train/test/val")
    args = p.parse_args(argv)
    if not re.fullmatch(r"[A-Za-z0-9_-]+", args.split):
        p.error(f"--split {args.split!r}: use letters, digits, '-' and '_' only (it is part of every key)")
    if args.shard_size < 1:
        p.error("--shard-size must be at least 1")
    if args.torchvision_split and not args.source.startswith("torchvision:"):
        p.error("--torchvision-split only applies to torchvision:NAME:ROOT sources")
    if not 1 <= args.jpeg_quality <= 100:
        p.error("--jpeg-quality must be in 1..100")
    if args.max_side is not None and args.max_side < MIN_MAX_SIDE:
        p.error(f"--max-side must be at least {MIN_MAX_SIDE}")
    # SIGTERM (a scheduler, `kill`) ends it as Ctrl-C does: its .tmp files removed, the lock freed
    main_thread = threading.current_thread() is threading.main_thread()
    before = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143)) if main_thread else None
    try:
        index = write_shards(args.source, args.out_dir, args.split, args.shard_size,
                             args.image_format, args.jpeg_quality, args.torchvision_split, args.max_side)
    except (ValueError, OSError) as e:  # bad input, not bad usage: one line, no usage text
        p.exit(2, f"{p.prog}: error: {' '.join(str(e).split())}\n")
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, before)
    meta = json.loads(index.read_text())
    print(f"wrote {meta['num_samples']} samples in {len(meta['shards'])} shard(s): {index}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
