"""The training stream: shard split, equal batch counts, exact resume, corrupt samples."""

import io
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch

from conftest import write_shards
from selfsup.data import DataError, ShardLoader, split_shards
from selfsup.views import ViewSpec

CENTER16 = [ViewSpec(16, random=False)]


@pytest.mark.parametrize("n_shards,world,workers", [(12, 2, 3), (7, 2, 2), (3, 2, 2), (1, 4, 1)])
def test_split_covers_every_shard_exactly_once(n_shards, world, workers):
    urls = [f"s{i}" for i in range(n_shards)]
    samples_per_shard = 10
    seen = Counter()
    for rank in range(world):
        for worker in range(workers):
            mine, stride, offset = split_shards(urls, rank, world, worker, workers)
            stream = [(u, k) for u in mine for k in range(samples_per_shard)]
            seen.update(s for i, s in enumerate(stream) if i % stride == offset)
    assert set(seen) == {(u, k) for u in urls for k in range(samples_per_shard)}
    assert set(seen.values()) == {1}


def keys_of(batches):
    return [list(b["key"]) for b in batches]


@pytest.mark.parametrize("workers", [0, 2])
def test_equal_batch_counts_on_every_rank(tmp_path, workers):
    index = write_shards(tmp_path, n=53, shard_size=16)  # shards of 16, 16, 16, 5 samples
    counts, all_keys, per_rank = [], Counter(), []
    for rank in range(2):
        loader = ShardLoader(str(index), batch_size=4, rank=rank, world_size=2,
                             num_workers=workers, seed=3, views=CENTER16, shuffle_buffer=8)
        batches = list(loader.epoch(0))
        counts.append(len(batches))
        per_rank.append({k for b in batches for k in b["key"]})
        for b in batches:
            assert b["image"].shape == (4, 1, 3, 16, 16) and b["image"].dtype == torch.uint8
            all_keys.update(b["key"])
    assert counts == [53 // 8, 53 // 8]
    assert sum(all_keys.values()) == 48
    # no image on both ranks (a rank short of samples starts over on its own shards instead)
    assert not per_rank[0] & per_rank[1]


def test_epochs_reshuffle_and_seed_reproduces(tmp_path):
    index = write_shards(tmp_path, n=64, shard_size=16)
    a = ShardLoader(str(index), batch_size=8, num_workers=0, seed=1, views=CENTER16, shuffle_buffer=16)
    b = ShardLoader(str(index), batch_size=8, num_workers=0, seed=1, views=CENTER16, shuffle_buffer=16)
    e0, e1 = keys_of(a.epoch(0)), keys_of(a.epoch(1))
    assert e0 == keys_of(b.epoch(0))
    assert e0 != e1
    assert sorted(sum(e0, [])) == sorted(sum(e1, []))  # 64 samples, 8 batches of 8: all used


@pytest.mark.parametrize("workers,start", [(0, 3), (2, 3), (2, 4), (3, 5)])
def test_resume_mid_epoch_gives_the_same_batches(tmp_path, workers, start):
    index = write_shards(tmp_path, n=96, shard_size=12)
    loader = ShardLoader(str(index), batch_size=6, num_workers=workers, seed=7, views=CENTER16,
                         shuffle_buffer=10)
    full, positions = [], {}
    for i, batch in enumerate(loader.epoch(2)):
        full.append(batch)
        if i < start:
            positions[batch["role"]] = batch["drawn"]
    resumed = list(loader.epoch(2, start_batch=start, positions=positions))
    assert keys_of(resumed) == keys_of(full[start:])
    for a, b in zip(resumed, full[start:]):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])


def test_labels_and_grayscale_become_three_channels(tmp_path):
    from selfsup.shard_writer import main as shards_main

    images = np.stack([np.full((10, 12), 40 * i, np.uint8) for i in range(5)])  # N,H,W gray
    np.savez(tmp_path / "g.npz", images=images, labels=np.arange(5))
    shards_main([str(tmp_path / "g.npz"), str(tmp_path / "out"), "--split", "train"])
    loader = ShardLoader(str(tmp_path / "out"), batch_size=5, num_workers=0, views=[ViewSpec(10, random=False)],
                         shuffle_buffer=1)
    (batch,) = list(loader.epoch(0))
    assert batch["image"].shape == (5, 1, 3, 10, 10)
    for img, label in zip(batch["image"], batch["label"]):
        assert torch.all(img == 40 * int(label))  # shorter side 10: centre crop 12 → 10, exact


def _rewrite_member(tar_path, bad_key):
    """Replace one sample's png by garbage bytes (an undecodable image)."""
    members = []
    with tarfile.open(tar_path) as tf:
        for m in tf.getmembers():
            members.append((m, tf.extractfile(m).read()))
    with tarfile.open(tar_path, "w") as tf:
        for m, data in members:
            if m.name.startswith(bad_key) and m.name.endswith(".png"):
                data = b"not a png at all"
                m.size = len(data)
            tf.addfile(m, io.BytesIO(data))
    return [m.name for m, _ in members]


def test_corrupt_and_truncated_samples_are_skipped_and_counted(tmp_path):
    index = write_shards(tmp_path, n=32, shard_size=16)
    shards = sorted(tmp_path.glob("train-*.tar"))
    names = _rewrite_member(shards[0], "train-00000003")
    assert any(n.startswith("train-00000003") for n in names)
    data = shards[1].read_bytes()
    shards[1].write_bytes(data[: len(data) // 2 + 100])  # truncated mid-member
    loader = ShardLoader(str(index), batch_size=4, num_workers=0, views=CENTER16,
                         shuffle_buffer=1, samples_per_epoch=28)
    batches = list(loader.epoch(0))  # 28 > the ~23 readable samples: every shard is read
    keys = sum(keys_of(batches), [])
    assert len(batches) == 7 and "train-00000003" not in keys
    assert sum(b["corrupt"] for b in batches) >= 2  # the bad png and the truncated tar


def test_bad_specs_are_one_line_errors(tmp_path):
    with pytest.raises(DataError, match="data.train"):
        ShardLoader(str(tmp_path / "missing"), batch_size=4, views=CENTER16)
    index = write_shards(tmp_path / "s", n=8, shard_size=8)
    with pytest.raises(DataError, match="less than one global batch"):
        ShardLoader(str(index), batch_size=8, world_size=2, views=CENTER16)


@pytest.mark.parametrize("workers,decode", [(0, "cpu"), (2, "cpu"), (2, "device")])
def test_resume_with_random_crops_of_jpegs_redraws_the_same_views(tmp_path, workers, decode):
    """Random crop boxes come from each sample's place in the stream, so a resumed epoch cuts
    the same views from the same images, on either decode path."""
    from test_decode import imagenet_like, write_tar

    for s in range(3):
        members = {}
        for i in range(12):
            members[f"s{s}i{i}.jpg"] = imagenet_like.jpeg_bytes(40 + 7 * i, 70 - 3 * i, seed=12 * s + i)
            members[f"s{s}i{i}.cls"] = str(i % 3).encode()
        write_tar(tmp_path / f"t-{s:06d}.tar", members)
    loader = ShardLoader(str(tmp_path / "t-{000000..000002}.tar"), batch_size=4, num_workers=workers,
                         seed=7, views=[ViewSpec(16, (0.08, 1.0))] * 2, decode=decode,
                         shuffle_buffer=5, samples_per_epoch=36)
    cpu = torch.device("cpu")
    full, positions, start = [], {}, 4
    for i, batch in enumerate(loader.epoch(1)):
        full.append(loader.to_device(batch, cpu))
        if i < start:
            positions[batch["role"]] = batch["drawn"]
    resumed = [loader.to_device(b, cpu) for b in loader.epoch(1, start_batch=start, positions=positions)]
    assert len(full) == 9 and keys_of(resumed) == keys_of(full[start:])
    for a, b in zip(resumed, full[start:]):
        assert torch.equal(a["image"], b["image"])
    again = [loader.to_device(b, cpu) for b in loader.epoch(2)]
    assert not torch.equal(again[0]["image"], full[0]["image"])  # another epoch, other crops


def test_resume_after_the_stream_started_over_its_shards(tmp_path):
    """64 samples per epoch from 24 images: the stream starts a second and third pass; a resume
    past that point fast-forwards over a whole pass without decoding it, which is no evidence
    that nothing decodes."""
    index = write_shards(tmp_path, n=24, shard_size=12)
    loader = ShardLoader(str(index), batch_size=4, num_workers=0, seed=2, views=CENTER16,
                         shuffle_buffer=4, samples_per_epoch=64)
    full, positions, start = [], {}, 10
    for i, batch in enumerate(loader.epoch(0)):
        full.append(batch)
        if i < start:
            positions[batch["role"]] = batch["drawn"]
    assert positions[0] == 40 > 24
    resumed = list(loader.epoch(0, start_batch=start, positions=positions))
    assert keys_of(resumed) == keys_of(full[start:])
