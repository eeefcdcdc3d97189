"""WebDataset shards: resolving a shard specification (the writer, ``selfsup-shards``, is
:mod:`selfsup.shard_writer`). It lives in ``selfsup_io`` because both the trainer and the evaluator
resolve shard specifications, and neither imports the other.

Shards are the one data format every selfsup tool reads (docs/formats.md): plain tar files in the
public WebDataset layout plus an index json with per-shard sample counts. The counts matter: they
give every rank the same, known epoch length without scanning terabytes of tars first.
"""


from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from braceexpand import braceexpand

from selfsup_io.errors import ShardSpecError  # noqa: F401  (also imported from here)

INDEX_FORMAT = "selfsup-shards/1"
REMOTE_PREFIXES = ("pipe:", "http://", "https://", "gs://", "s3://")
SHARD_NAME = re.compile(r"(.+)-(\d+)\.tar")


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
