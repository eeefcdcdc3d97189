"""WebDataset shards: the writer (``selfsup-shards``) and the shard-specification resolver.

Shards are the one data format every selfsup tool reads (docs/formats.md): plain tar files in the
public WebDataset layout plus an index json with per-shard sample counts. The counts matter: they
give every rank the same, known epoch length without scanning terabytes of tars first.

Writer choices worth knowing:

* Image folders: ``--image-format jpg`` copies JPEG files (grayscale or RGB) byte for byte, so
  ImageNet-style data suffers no second lossy encoding (``--jpeg-quality`` applies to the others);
  everything else is decoded and re-encoded. Each sample also gets ``KEY.json`` =
  ``{"path": "CLASS/FILE"}`` (relative to SOURCE), so a key can be traced back to its file.
* ``.npz``: ``labels`` may be left out for unlabelled data (then ``class_names`` is null and
  samples have no ``.cls``); without ``class_names`` classes are named ``"0"``, ``"1"``, ...
* ``torchvision:NAME:ROOT``: ``--split train`` reads the train set, ``test``/``val`` the test set;
  other split names need ``--torchvision-split``. For the MNIST family the raw idx files are read
  directly (``.gz`` or not), either in ROOT itself (the Debian package dataset-fashion-mnist puts
  them in /usr/share/datasets/fashion-mnist) or in torchvision's ``ROOT/NAME/raw``.
* Every file is written as ``*.tmp`` and renamed; the index is removed first and written last, so
  an interrupted run never leaves an index that describes half-written shards. Shards of the same
  split left over from an earlier, longer run are removed. Tars are byte-reproducible (mtime 0).
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from braceexpand import braceexpand
from PIL import Image
from tqdm import tqdm

INDEX_FORMAT = "selfsup-shards/1"
TORCHVISION_SETS = ("MNIST", "FashionMNIST", "KMNIST", "CIFAR10", "CIFAR100")
MNIST_FAMILY = ("MNIST", "FashionMNIST", "KMNIST")
REMOTE_PREFIXES = ("pipe:", "http://", "https://", "gs://", "s3://")
SHARD_NAME = re.compile(r"(.+)-(\d+)\.tar")


class ShardSpecError(ValueError):
    """A shard specification that resolves to nothing usable (one-line message)."""


@dataclass(frozen=True)
class ShardSet:
    """What a shard specification resolved to; counts and class names only when an index says."""

    urls: list[str]
    num_samples: int | None
    shard_sizes: list[int] | None
    class_names: list[str] | None
    spec: str


# ------------------------------------------------------------------------------ resolving ----
def _load_index(path: Path) -> dict:
    """Parse and check an index, so that a bad one fails here and not deep inside a loader."""
    try:
        index = json.loads(path.read_text())
        shards = index["shards"]
        sizes = [int(s["num_samples"]) for s in shards]
        names = [str(s["name"]) for s in shards]
    except (OSError, ValueError, KeyError, TypeError):
        raise ShardSpecError(f"{path} is not a selfsup shard index (json with a 'shards' list of "
                             "name/num_samples); write shards with selfsup-shards") from None
    if index.get("format", INDEX_FORMAT) != INDEX_FORMAT:
        raise ShardSpecError(f"{path}: unsupported index format {index['format']!r} (this "
                             f"selfsup reads {INDEX_FORMAT!r})")
    if not shards:
        raise ShardSpecError(f"{path} lists no shards (empty shard set)")
    if index.get("num_samples", sum(sizes)) != sum(sizes):
        raise ShardSpecError(f"{path}: num_samples {index['num_samples']} is not the sum of the "
                             f"shard counts ({sum(sizes)}); rewrite the shards with selfsup-shards")
    return {"names": names, "sizes": sizes, "by_name": dict(zip(names, sizes)), "class_names": index.get("class_names")}


def _is_index(path: Path) -> bool:
    try:
        return isinstance(json.loads(path.read_text()).get("shards"), list)
    except (OSError, ValueError, AttributeError):
        return False


def _from_index(path: Path, spec: str) -> ShardSet:
    index = _load_index(path)
    urls = [str(path.parent / name) for name in index["names"]]
    missing = [u for u in urls if not os.path.exists(u)]
    if missing:
        raise ShardSpecError(f"{path} lists {len(missing)} shard(s) that do not exist, e.g. "
                             f"{missing[0]}; copy the whole folder or rewrite it with selfsup-shards")
    return ShardSet(urls, sum(index["sizes"]), index["sizes"], index["class_names"], spec)


def _sibling_index(url: str) -> str | None:
    match = SHARD_NAME.fullmatch(os.path.basename(url))
    return os.path.join(os.path.dirname(url), match.group(1) + ".json") if match else None


def _local_tars(urls: list[str], spec: str) -> ShardSet:
    """Local tar files; counts come from the index next to them (``DIR/NAME.json`` for
    ``DIR/NAME-000042.tar``) when it lists every one of them, else they stay unknown."""
    indexes = {}
    for path in {_sibling_index(u) for u in urls}:
        try:
            indexes[path] = _load_index(Path(path)) if path and os.path.isfile(path) else None
        except ShardSpecError:
            indexes[path] = None  # a broken sibling index only costs the counts
    found = [(indexes[_sibling_index(u)], os.path.basename(u)) for u in urls]
    if any(ix is None or name not in ix["by_name"] for ix, name in found):
        return ShardSet(urls, None, None, None, spec)
    sizes = [ix["by_name"][name] for ix, name in found]
    names = [ix["class_names"] for ix, _ in found]
    return ShardSet(urls, sum(sizes), sizes, names[0] if all(n == names[0] for n in names) else None, spec)


def _resolve_dir(path: Path, spec: str, prefer: tuple) -> ShardSet:
    indexes = [p for p in sorted(path.glob("*.json")) if _is_index(p)]
    if len(indexes) == 1:
        return _from_index(indexes[0], spec)
    if len(indexes) > 1:
        preferred = [path / f"{name}.json" for name in prefer if path / f"{name}.json" in indexes]
        if preferred:  # e.g. data.train=DIR with DIR/{train,test}.json
            return _from_index(preferred[0], spec)
        names = ", ".join(p.name for p in indexes)
        raise ShardSpecError(f"{spec} holds several shard indexes ({names}): pass {spec}/NAME.json")
    tars = sorted(path.glob("*.tar"))
    if tars:
        first, last = SHARD_NAME.fullmatch(tars[0].name), SHARD_NAME.fullmatch(tars[-1].name)
        pattern = f"{first.group(1)}-{{{first.group(2)}..{last.group(2)}}}.tar" if first and last \
            and first.group(1) == last.group(1) else "NAME-{000000..000009}.tar"
        raise ShardSpecError(f"{spec} has {len(tars)} .tar file(s) but no shard index .json: pass a "
                             f"brace pattern such as {path / pattern} (sample counts then unknown)")
    raise ShardSpecError(f"{spec} is an empty shard set: no index .json and no .tar files "
                         "(write shards with selfsup-shards)")


def _resolve_one(spec: str, prefer: tuple) -> ShardSet:
    if spec.startswith(REMOTE_PREFIXES):
        return ShardSet(list(braceexpand(spec)), None, None, None, spec)
    local = os.path.expanduser(spec)
    if "{" in local:
        urls = list(braceexpand(local))
        missing = [u for u in urls if not os.path.exists(u)]
        if len(missing) == len(urls):
            raise ShardSpecError(f"{spec}: the brace pattern matches no file (e.g. {missing[0]}); "
                                 "check the folder and the range")
        if missing:
            raise ShardSpecError(f"{spec}: {len(missing)} of {len(urls)} shards do not exist, e.g. "
                                 f"{missing[0]}; check the range against the index json")
        return _local_tars(urls, spec)
    path = Path(local)
    if path.is_dir():
        return _resolve_dir(path, spec, prefer)
    if path.is_file() and path.suffix == ".json":
        return _from_index(path, spec)
    if path.is_file():
        return _local_tars([local], spec)
    raise ShardSpecError(f"{spec}: no such file or directory (expected a shard directory, an index "
                         ".json, a brace pattern, or a pipe:/http(s) URL)")


def resolve_shards(spec: str, prefer: tuple = ()) -> ShardSet:
    """Shard specification (docs/formats.md) → urls, plus counts and class names from the index.

    Several specifications can be joined with ``::``; counts are known only if known for every
    part, class names only if every part has the same. ``prefer`` names splits to pick when a
    directory holds several indexes (``("train",)`` for training data), so that ``DIR`` works
    for a folder with ``train.json`` and ``test.json``. Raises :class:`ShardSpecError`.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ShardSpecError(f"empty shard specification {spec!r}: pass a shard directory, an "
                             "index .json, a brace pattern or URLs")
    parts = [s.strip() for s in spec.split("::")]
    if not all(parts):
        raise ShardSpecError(f"{spec}: empty part between '::' separators")
    sets = [_resolve_one(s, tuple(prefer)) for s in parts]
    if len(sets) == 1:
        return sets[0]
    known = all(s.shard_sizes is not None for s in sets)
    names = sets[0].class_names if all(s.class_names == sets[0].class_names for s in sets) else None
    return ShardSet(sum((s.urls for s in sets), []),
                    sum(s.num_samples for s in sets) if known else None,
                    sum((s.shard_sizes for s in sets), []) if known else None, names, spec)


# -------------------------------------------------------------------------------- sources ----
# A source is (items, count, class_names): items yields (image, label | None, extra json | None),
# the image as a PIL image, a uint8 array, or b"jpeg bytes" to store unchanged.
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


def _folder_source(path: Path, image_format: str):
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    classes, class_to_idx = find_classes(str(path))
    samples = make_dataset(str(path), class_to_idx, extensions=IMG_EXTENSIONS)

    def items():
        for file, label in samples:
            data = Path(file).read_bytes()
            extra = {"path": os.path.relpath(file, path)}
            with Image.open(io.BytesIO(data)) as img:
                if image_format == "jpg" and img.format == "JPEG" and img.mode in ("L", "RGB"):
                    yield data, label, extra  # no second lossy encoding
                    continue
                mode = "L" if img.mode in ("1", "L", "LA") else "RGB"
                yield img.convert(mode), label, extra

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
    try:
        ds = getattr(tvd, name)(root, train=subset == "train", download=False)
    except RuntimeError as e:
        reason = str(e).split(". You can use download")[0]  # selfsup never downloads
        raise ValueError(f"{spec}: {reason} in {root} (torchvision's layout; for "
                         f"{', '.join(MNIST_FAMILY)} a folder with the raw idx files also works)") from None
    return ((img, int(label), None) for img, label in ds), len(ds), list(ds.classes)


def open_source(source: str, split: str, image_format: str = "png", torchvision_split: str | None = None):
    """SOURCE → (items, count, class_names); ValueError/OSError with a one-line message if bad."""
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
        return _folder_source(path, image_format)
    raise ValueError(f"SOURCE {source}: expected an image folder, an .npz or torchvision:NAME:ROOT")


# -------------------------------------------------------------------------------- writing ----
def _encode(image, fmt: str, quality: int) -> bytes:
    if isinstance(image, bytes):
        return image
    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    if img.mode not in ("L", "RGB"):
        img = img.convert("RGB")  # RGBA, palette, ...: readers want 1 or 3 channels
    buf = io.BytesIO()
    if fmt == "png":
        img.save(buf, format="PNG")
    else:
        img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_shards(source: str, out_dir: str, split: str, shard_size: int = 5000,
                 image_format: str = "png", quality: int = 95,
                 torchvision_split: str | None = None) -> Path:
    """Write ``OUT/SPLIT-%06d.tar`` + ``OUT/SPLIT.json`` (see the module docstring)."""
    import webdataset as wds

    items, total, class_names = open_source(source, split, image_format, torchvision_split)
    if total == 0:
        raise ValueError(f"SOURCE {source} has no images")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
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
        with tqdm(total=total, desc=f"shards {split}", unit="img") as bar:  # closed on errors too
            for i, (image, label, extra) in enumerate(items):
                if i % shard_size == 0:
                    if writer is not None:
                        finish()
                    shards.append({"name": f"{split}-{len(shards):06d}.tar", "num_samples": 0})
                    tmp = out / (shards[-1]["name"] + ".tmp")
                    file = open(tmp, "wb")
                    writer = wds.TarWriter(file, encoder=False, mtime=0)  # mtime 0: reproducible
                sample = {"__key__": f"{split}-{i:08d}", image_format: _encode(image, image_format, quality)}
                if label is not None:
                    sample["cls"] = str(label).encode()
                if extra is not None:
                    sample["json"] = json.dumps(extra).encode()
                writer.write(sample)
                shards[-1]["num_samples"] += 1
                bar.update()
        if writer is not None:
            finish()
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
             "class_names": class_names, "image_format": image_format, "shards": shards}
    tmp_index = out / f".{split}.json.tmp"
    tmp_index.write_text(json.dumps(index, indent=1) + "\n")
    os.replace(tmp_index, index_path)
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
    p.add_argument("--image-format", choices=("png", "jpg"), default="png")
    p.add_argument("--jpeg-quality", type=int, default=95, help="for re-encoded jpg (default 95)")
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
    try:
        index = write_shards(args.source, args.out_dir, args.split, args.shard_size,
                             args.image_format, args.jpeg_quality, args.torchvision_split)
    except (ValueError, OSError) as e:  # bad input, not bad usage: one line, no usage text
        p.exit(2, f"{p.prog}: error: {' '.join(str(e).split())}\n")
    meta = json.loads(index.read_text())
    print(f"wrote {meta['num_samples']} samples in {len(meta['shards'])} shard(s): {index}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
