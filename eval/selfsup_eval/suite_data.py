"""The VTAB-1k draws of a suite: which ``n_train`` examples of a task's train split each subset uses.

Draw ``i`` of task ``T`` is the first ``n_train`` positions of a permutation of the train split
(positions in shard order) seeded from ``sha256("T|i")``: nothing depends on the checkpoint, the
order the checkpoints are given in or the run, so every checkpoint and every rerun is scored on
the same images. As in VTAB the draw is uniform, not class-balanced; its first
``n_train - n_val`` examples are the train part (VTAB's 800) and the last ``n_val`` the part that
chooses hyper-parameters (VTAB's 200). The keys of a draw, in that order, go to
``OUT/keys/TASK-subsetI.txt`` (one per line), so anyone can audit or redo a number.

The drawn samples are copied byte for byte (every member, in draw order) into a one-shard set
``OUT/subsets/TASK-subsetI/train.{json,tar}``: extraction and its cache then see a 1,000-sample
split instead of, say, CIFAR-100's 50,000, and the finetune protocol reads its images from it. A
later run that draws the same positions from unchanged shards keeps the existing copy untouched
(same mtime), so the feature cache serves it again.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from selfsup_eval.checkpoint import EvalError
from selfsup_eval.suite_file import Task


@dataclass(frozen=True)
class Draw:
    task: str
    index: int
    shards: object  # ShardSet of the copied samples, in draw order
    keys: list[str]  # draw order: train part, then the hyper-parameter part
    n_val: int
    keys_file: Path

    @property
    def val_keys(self) -> set[str]:
        return set(self.keys[len(self.keys) - self.n_val:])


def draw_seed(task: str, index: int) -> int:
    h = hashlib.sha256(f"{task}|{index}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def draw_positions(task: str, index: int, n_available: int, n_train: int) -> list[int]:
    """Positions (in shard order) of draw ``index`` of ``task``, in draw order."""
    perm = torch.randperm(n_available, generator=torch.Generator().manual_seed(draw_seed(task, index)))
    return perm[:n_train].tolist()


def _fingerprint(urls: list[str]) -> list:
    out = []
    for u in urls:
        try:
            st = os.stat(u)
            out.append([u, st.st_size, st.st_mtime_ns])
        except OSError:
            out.append([u, None, None])
    return out


def _count(urls: list[str]) -> int:
    from selfsup_eval.data import shard_samples

    return sum(1 for u in urls for _ in shard_samples(u))


def _collect(task: Task, wanted: set[int]) -> dict[int, dict]:
    """The raw samples at ``wanted`` positions of the train split (no decoding). With the index's
    shard sizes, shards holding no drawn position are not read at all, and reading stops once
    every drawn sample is in hand: 1,000 samples of PCam's 262,144 cost a few shards' reading."""
    from contextlib import closing

    from selfsup_eval.data import _to_sample, shard_samples

    sizes = task.train.shard_sizes
    found, start = {}, 0
    for si, url in enumerate(task.train.urls):
        if len(found) == len(wanted):
            break
        if sizes is not None and not any(start <= p < start + sizes[si] for p in wanted):
            start += sizes[si]
            continue
        pos = start - 1
        try:
            with closing(shard_samples(url)) as samples:
                for raw in samples:
                    pos += 1
                    if pos in wanted:
                        s = _to_sample(raw, (0, pos))
                        if s.label is None and not s.bad_label:
                            raise EvalError(f"task {task.name}: train sample {s.key} has no label")
                        found[pos] = {k: v for k, v in raw.items() if k != "__url__"}
        except EvalError:
            raise
        except Exception as e:
            raise EvalError(f"task {task.name}: cannot read {url} ({' '.join(str(e).split())[:200]})") from None
        start = pos + 1 if sizes is None else start + sizes[si]
    missing = len(wanted) - len(found)
    if missing:
        raise EvalError(f"task {task.name}: {missing} drawn sample(s) are missing from the train shards "
                        "(fewer samples than the index says?)")
    return found


def _write_set(folder: Path, samples: list[dict], source: dict) -> None:
    """One tar + index (formats.md), both written to temporary names and renamed."""
    import webdataset as wds
    from selfsup_io.shards import INDEX_FORMAT

    folder.mkdir(parents=True, exist_ok=True)
    index_path, tar = folder / "train.json", folder / "train-000000.tar"
    index_path.unlink(missing_ok=True)
    tmp = tar.with_name(tar.name + ".tmp")
    with open(tmp, "wb") as f:
        writer = wds.TarWriter(f, encoder=False, mtime=0)
        for s in samples:
            writer.write(s)
        writer.close()
    os.replace(tmp, tar)
    index = {"format": INDEX_FORMAT, "split": "train", "num_samples": len(samples), "class_names": None,
             "shards": [{"name": tar.name, "num_samples": len(samples)}], "suite_draw": source}
    tmp_index = folder / ".train.json.tmp"
    tmp_index.write_text(json.dumps(index, indent=1) + "\n")
    os.replace(tmp_index, index_path)


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def prepare_draws(task: Task, subsets: int, out: Path) -> list[Draw]:
    """Draw, copy and record ``subsets`` VTAB-1k subsets of ``task`` under ``out``."""
    from selfsup_io.shards import resolve_shards

    n = task.train.num_samples if task.train.num_samples is not None else _count(task.train.urls)
    if n < task.n_train:
        raise EvalError(f"task {task.name}: the train split has {n} samples, fewer than n_train {task.n_train}")
    positions = [draw_positions(task.name, i, n, task.n_train) for i in range(subsets)]
    fp = _fingerprint(task.train.urls)
    draws, raws = [], None
    for i, pos in enumerate(positions):
        folder = out / "subsets" / f"{task.name}-subset{i}"
        source = {"task": task.name, "subset": i, "train": fp, "positions": hashlib.sha256(
            json.dumps(pos).encode()).hexdigest()}
        index = folder / "train.json"
        old = None
        try:
            old = json.loads(index.read_text()).get("suite_draw") if index.is_file() else None
        except (OSError, ValueError, AttributeError):
            pass
        if old != source:
            if raws is None:
                raws = _collect(task, {p for ps in positions for p in ps})
            _write_set(folder, [raws[p] for p in pos], source)
        shards = resolve_shards(str(index))
        keys = _keys_of(shards.urls[0])
        keys_file = out / "keys" / f"{task.name}-subset{i}.txt"
        _write_text(keys_file, "".join(k + "\n" for k in keys))
        draws.append(Draw(task.name, i, shards, keys, task.n_val, keys_file))
    return draws


def _keys_of(url: str) -> list[str]:
    from selfsup_eval.data import shard_samples

    return [raw["__key__"] for raw in shard_samples(url)]


def hold_indices(keys: list[str], draw: Draw) -> torch.Tensor:
    """Rows (of features extracted from the draw's set, in ``keys`` order) that choose the
    hyper-parameters; robust to a corrupt image that extraction skipped."""
    val = draw.val_keys
    return torch.tensor([i for i, k in enumerate(keys) if k in val], dtype=torch.long)
