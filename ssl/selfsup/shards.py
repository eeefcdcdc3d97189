"""WebDataset shards: the writer (``selfsup-shards``) and the shard-specification resolver.

Shards are the one data format every selfsup tool reads (docs/formats.md): plain tar files in the
public WebDataset layout plus an index json with per-shard sample counts. The counts matter: they
give every rank the same, known epoch length without scanning terabytes of tars first.
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from braceexpand import braceexpand
from PIL import Image
from tqdm import tqdm

INDEX_FORMAT = "selfsup-shards/1"
TORCHVISION_SETS = ("MNIST", "FashionMNIST", "KMNIST", "CIFAR10", "CIFAR100")


class ShardSpecError(ValueError):
    """A shard specification that resolves to nothing usable (one-line message)."""


@dataclass(frozen=True)
class ShardSet:
    urls: list
    num_samples: int | None
    shard_sizes: list | None
    class_names: list | None
    spec: str


# ------------------------------------------------------------------------------ resolving ----
def _from_index(path: Path, spec: str) -> ShardSet:
    try:
        index = json.loads(path.read_text())
        shards = index["shards"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ShardSpecError(f"{path} is not a selfsup shard index (json with a 'shards' list)") from None
    urls = [str(path.parent / s["name"]) for s in shards]
    missing = [u for u in urls if not os.path.exists(u)]
    if missing:
        raise ShardSpecError(f"{path} lists {len(missing)} shard(s) that do not exist, e.g. {missing[0]}")
    if not urls:
        raise ShardSpecError(f"{path} lists no shards (empty shard set)")
    sizes = [int(s["num_samples"]) for s in shards]
    return ShardSet(urls, sum(sizes), sizes, index.get("class_names"), spec)


def _resolve_one(spec: str, prefer: tuple = ()) -> ShardSet:
    if spec.startswith(("pipe:", "http://", "https://", "gs://", "s3://")):
        return ShardSet(list(braceexpand(spec)), None, None, None, spec)
    path = Path(spec)
    if "{" in spec:
        urls = list(braceexpand(spec))
        missing = [u for u in urls if not os.path.exists(u)]
        if missing:
            raise ShardSpecError(f"{spec}: {len(missing)} of {len(urls)} shards do not exist, e.g. {missing[0]}")
        prefix = spec.split("{")[0].rstrip("-_.")
        index = Path(prefix + ".json")
        if index.is_file():
            known = _from_index(index, spec)
            sizes = dict(zip(map(os.path.abspath, known.urls), known.shard_sizes))
            if all(os.path.abspath(u) in sizes for u in urls):
                counts = [sizes[os.path.abspath(u)] for u in urls]
                return ShardSet(urls, sum(counts), counts, known.class_names, spec)
        return ShardSet(urls, None, None, None, spec)
    if path.is_file() and path.suffix == ".json":
        return _from_index(path, spec)
    if path.is_file() and path.suffix == ".tar":
        return ShardSet([str(path)], None, None, None, spec)
    if path.is_dir():
        indexes = sorted(path.glob("*.json"))
        preferred = [path / f"{name}.json" for name in prefer if (path / f"{name}.json").is_file()]
        if len(indexes) > 1 and preferred:  # e.g. data.train=DIR with DIR/{train,test}.json
            return _from_index(preferred[0], spec)
        if len(indexes) == 1:
            return _from_index(indexes[0], spec)
        if len(indexes) > 1:
            names = ", ".join(p.name for p in indexes)
            raise ShardSpecError(f"{spec} holds several shard indexes ({names}): pass {spec}/NAME.json")
        tars = sorted(glob.glob(str(path / "*.tar")))
        if tars:
            return ShardSet(tars, None, None, None, spec)
        raise ShardSpecError(f"{spec} is an empty shard set: no index .json and no .tar files "
                             "(write shards with selfsup-shards)")
    raise ShardSpecError(f"{spec}: no such file or directory (expected a shard directory, an index "
                         ".json, a brace pattern, or a pipe:/http(s) URL)")


def resolve_shards(spec: str, prefer: tuple = ()) -> ShardSet:
    """Shard specification → urls (+ counts and class names when an index is known).

    Several specifications can be joined with ``::``; counts are known only if known for all.
    ``prefer`` names splits to pick when a directory holds several indexes (``("train",)`` for
    training data), so that ``DIR`` works for a folder with ``train.json`` and ``test.json``.
    """
    if not spec:
        raise ShardSpecError("empty shard specification")
    parts = [_resolve_one(s, tuple(prefer)) for s in str(spec).split("::")]
    if len(parts) == 1:
        return parts[0]
    known = all(p.shard_sizes is not None for p in parts)
    return ShardSet(sum((p.urls for p in parts), []),
                    sum(p.num_samples for p in parts) if known else None,
                    sum((p.shard_sizes for p in parts), []) if known else None,
                    parts[0].class_names, spec)


# -------------------------------------------------------------------------------- sources ----
def _npz_source(path: Path):
    data = np.load(path, allow_pickle=False)
    if "images" not in data:
        raise ValueError(f"{path} has no 'images' array (expected images (N,H,W[,C]) uint8 and labels)")
    images = data["images"]
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise ValueError(f"{path}: 'images' must be uint8 (N,H,W) or (N,H,W,C), got {images.dtype} {images.shape}")
    labels = data["labels"] if "labels" in data else None
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"{path}: {len(labels)} labels for {len(images)} images")
    names = [str(n) for n in data["class_names"]] if "class_names" in data else (
        [str(c) for c in range(int(labels.max()) + 1)] if labels is not None else None)
    items = ((images[i], None if labels is None else int(labels[i])) for i in range(len(images)))
    return items, len(images), names


def _folder_source(path: Path):
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    classes, class_to_idx = find_classes(str(path))
    samples = make_dataset(str(path), class_to_idx, extensions=IMG_EXTENSIONS)
    if not samples:
        raise ValueError(f"{path} has class folders but no images")

    def items():
        for file, label in samples:
            with Image.open(file) as img:
                yield img.convert("RGB") if img.mode not in ("L", "RGB") else img.copy(), label

    return items(), len(samples), classes


def _torchvision_source(spec: str, split: str):
    """``torchvision:NAME:ROOT``: read with torchvision's own classes (download=False). For the
    MNIST family, ROOT may also be a folder holding the raw idx files directly (the Debian
    package dataset-fashion-mnist installs them in /usr/share/datasets/fashion-mnist)."""
    import torchvision.datasets as tvd

    try:
        _, name, root = spec.split(":", 2)
    except ValueError:
        raise ValueError(f"{spec}: expected torchvision:NAME:ROOT") from None
    if name not in TORCHVISION_SETS:
        raise ValueError(f"{spec}: unsupported torchvision data set {name!r} (one of {', '.join(TORCHVISION_SETS)})")
    train = split == "train"
    if name in ("MNIST", "FashionMNIST", "KMNIST") and glob.glob(os.path.join(root, "*idx3-ubyte*")):
        from torchvision.datasets.mnist import read_image_file, read_label_file
        import gzip
        import tempfile

        prefix = "train" if train else "t10k"

        def read(kind, reader):
            raw = sorted(glob.glob(os.path.join(root, f"{prefix}-{kind}-idx*-ubyte*")))
            if not raw:
                raise ValueError(f"{root} has no {prefix}-{kind} idx file")
            with (gzip.open if raw[0].endswith(".gz") else open)(raw[0], "rb") as f, \
                    tempfile.NamedTemporaryFile() as tmp:
                tmp.write(f.read())
                tmp.flush()
                return reader(tmp.name).numpy()

        images, labels = read("images", read_image_file), read("labels", read_label_file)
        classes = getattr(tvd, name).classes
        return ((images[i], int(labels[i])) for i in range(len(images))), len(images), list(classes)
    try:
        ds = getattr(tvd, name)(root, train=train, download=False)
    except RuntimeError as e:
        raise ValueError(f"{spec}: {str(e).splitlines()[0]} (selfsup never downloads)") from None
    return ((img, int(label)) for img, label in ds), len(ds), list(ds.classes)


def open_source(source: str, split: str):
    if source.startswith("torchvision:"):
        return _torchvision_source(source, split)
    path = Path(source)
    if not path.exists():
        raise ValueError(f"SOURCE {source} does not exist")
    if path.suffix == ".npz":
        return _npz_source(path)
    if path.is_dir():
        return _folder_source(path)
    raise ValueError(f"SOURCE {source}: expected an image folder, an .npz or torchvision:NAME:ROOT")


# -------------------------------------------------------------------------------- writing ----
def _encode(image, fmt: str, quality: int) -> bytes:
    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    buf = io.BytesIO()
    if fmt == "png":
        img.save(buf, format="PNG")
    else:
        img.convert("RGB" if img.mode not in ("L", "RGB") else img.mode).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_shards(source: str, out_dir: str, split: str, shard_size: int = 5000,
                 image_format: str = "png", quality: int = 95) -> Path:
    """Write ``OUT/SPLIT-%06d.tar`` + ``OUT/SPLIT.json``; each file atomically (tmp + rename)."""
    import webdataset as wds

    items, total, class_names = open_source(source, split)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards, writer, count, tmp = [], None, 0, None

    def close():
        writer.close()
        os.replace(tmp, out / shards[-1]["name"])

    for i, (image, label) in enumerate(tqdm(items, total=total, desc=f"shards {split}", unit="img")):
        if i % shard_size == 0:
            if writer is not None:
                close()
            shards.append({"name": f"{split}-{len(shards):06d}.tar", "num_samples": 0})
            tmp = out / (shards[-1]["name"] + ".tmp")
            writer = wds.TarWriter(str(tmp))
        sample = {"__key__": f"{split}-{i:08d}", image_format: _encode(image, image_format, quality)}
        if label is not None:
            sample["cls"] = str(label)
        writer.write(sample)
        shards[-1]["num_samples"] += 1
        count += 1
    if writer is not None:
        close()
    index = {"format": INDEX_FORMAT, "split": split, "num_samples": count,
             "class_names": class_names, "image_format": image_format, "shards": shards}
    tmp_index = out / f".{split}.json.tmp"
    tmp_index.write_text(json.dumps(index, indent=1))
    os.replace(tmp_index, out / f"{split}.json")
    return out / f"{split}.json"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="selfsup-shards", description="Write WebDataset shards + index.")
    p.add_argument("source", help="image folder (one sub-folder per class), .npz with images/labels, "
                                  "or torchvision:NAME:ROOT (a data set already on disk)")
    p.add_argument("out_dir")
    p.add_argument("--split", required=True, help="split name: train, val, test, ... "
                   "(for torchvision sources, 'train' reads the train split, anything else the test split)")
    p.add_argument("--shard-size", type=int, default=5000)
    p.add_argument("--image-format", choices=("png", "jpg"), default="png")
    p.add_argument("--jpeg-quality", type=int, default=95)
    args = p.parse_args(argv)
    if args.shard_size < 1:
        p.error("--shard-size must be at least 1")
    try:
        index = write_shards(args.source, args.out_dir, args.split, args.shard_size,
                             args.image_format, args.jpeg_quality)
    except (ValueError, OSError) as e:
        p.error(str(e))
    meta = json.loads(index.read_text())
    print(f"wrote {meta['num_samples']} samples in {len(meta['shards'])} shard(s): {index}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
