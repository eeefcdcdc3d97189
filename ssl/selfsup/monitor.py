"""Online monitor: k-NN accuracy and collapse indicators while training.

Every ``monitor.every_steps`` optimizer steps the main process embeds a fixed labelled subset of
``monitor.train`` and ``monitor.val`` (default ``data.train``/``data.val``) with the backbone in
eval mode and logs

* ``monitor/knn_top1``: weighted k-NN top-1 (the same code as ``selfsup-eval knn``), a cheap
  early signal of representation quality (needs labels);
* ``monitor/feature_std``: mean per-dimension std of the L2-normalised features. Collapse to a
  point drives it to 0; a spread-out representation sits near 1/sqrt(D);
* ``monitor/rankme``: effective rank of the feature matrix (Garrido et al., RankMe), exp of the
  entropy of its normalised singular values. Dimensional collapse shows as a falling rank.

The numbers are offline-protocol-like (centre crop, no augmentation) but on a subset; the full
protocol is ``selfsup-eval``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from selfsup.data import DataError, ShardLoader, sample_label
from selfsup_io.shards import resolve_shards
from selfsup.views import ViewSpec
from selfsup_io.knn import knn_classify


def collapse_metrics(features: torch.Tensor) -> dict[str, float]:
    z = F.normalize(features.float(), dim=1)
    s = torch.linalg.svdvals(z)
    p = s / s.sum() + 1e-12
    return {"feature_std": z.std(0).mean().item(),
            "rankme": torch.exp(-(p * p.log()).sum()).item()}


def _unlabelled(spec: str, key: str, bad: int, total: int, example: str) -> DataError:
    if bad == total:
        return DataError(f"{key}: {spec} has no labels (its sample {example} has no cls, json "
                         "label or txt): the online monitor's k-NN needs labelled shards; set "
                         "monitor.train/monitor.val or monitor.every_steps=0")
    # counted as misses they would lower monitor/knn_top1 without a word (issue 30)
    return DataError(f"{key}: {bad} of the {total} samples the online monitor reads from {spec} "
                     f"have no usable label (e.g. {example}): its k-NN needs every sample "
                     "labelled; point monitor.train/monitor.val at labelled shards or set "
                     "monitor.every_steps=0")


def _check_labelled(urls: list[str], spec: str, key: str, limit: int) -> None:
    """The k-NN needs labels: a split with unlabelled (or unparsable) labels fails at start, on
    every rank, not at the first monitor step hours in (where only the main process would fail,
    and the others wait for it). The labels of the samples the monitor's loader will draw are
    read (no image is decoded): the first ``limit`` in its order (the shard order of epoch 0 with
    seed 0, as :class:`selfsup.data.ShardStream` shuffles it), plus a tenth more for the corrupt
    ones it skips. :meth:`Monitor._images` checks the samples it actually used again."""
    import random

    from selfsup_io.pipes import tar_samples  # a pipe: left mid-shard is killed, not waited on

    urls = list(urls)
    random.Random(0).shuffle(urls)  # ShardStream._samples: Random(seed * 1_000_003 + epoch)
    limit += limit // 10 + 16
    seen, bad, example = 0, 0, None
    for url in urls:
        for sample in tar_samples(url, handler=lambda exc: True):
            seen += 1
            if sample_label(sample) < 0:
                bad, example = bad + 1, example or sample["__key__"]
            if seen >= limit:
                break
        if seen >= limit:
            break
    if bad:
        raise _unlabelled(spec, key, bad, seen, example)


class Monitor:
    def __init__(self, cfg, device):
        mc = cfg.monitor
        self.every = mc.every_steps
        self.train_spec = mc.train or cfg.data.train
        self.val_spec = mc.val or cfg.data.val
        self.enabled = bool(self.every) and bool(self.val_spec)
        self.cfg, self.device = cfg, device
        self._cache: dict = {}
        if self.enabled:  # fail at start, not hours into the run
            for spec, key, prefer in ((self.train_spec, "monitor.train", ("train",)),
                                      (self.val_spec, "monitor.val", ("val", "test"))):
                try:
                    shards = resolve_shards(spec, prefer)
                except ValueError as e:
                    raise DataError(f"{key}: {e}") from None
                _check_labelled(shards.urls, spec, key, mc.max_samples)

    def due(self, step: int) -> bool:
        return self.enabled and step % self.every == 0

    def _images(self, spec: str, key: str, prefer: tuple):
        """A fixed subset (first ``max_samples`` of an unshuffled pass), decoded once."""
        if (spec, prefer) not in self._cache:
            cfg = self.cfg
            try:
                known = resolve_shards(spec, prefer).num_samples
            except ValueError as e:
                raise DataError(f"{key}: {e}") from None
            n = min(cfg.monitor.max_samples, known or cfg.monitor.max_samples)
            loader = ShardLoader(spec, batch_size=min(256, n), num_workers=0, seed=0,
                                 views=[ViewSpec(cfg.augment.size, random=False)], shuffle_buffer=1,
                                 samples_per_epoch=n, key=key, prefer=prefer)
            batches = list(loader.epoch(0))
            labels = torch.cat([b["label"] for b in batches])
            if (labels < 0).any():
                keys = [k for b in batches for k in b["key"]]
                raise _unlabelled(spec, key, int((labels < 0).sum()), len(labels),
                                  keys[int((labels < 0).nonzero()[0])])
            self._cache[spec, prefer] = (torch.cat([b["image"][:, 0] for b in batches]),
                                 torch.cat([b["label"] for b in batches]))
        return self._cache[spec, prefer]

    @torch.no_grad()
    def _embed(self, backbone, images: torch.Tensor) -> torch.Tensor:
        aug = self.cfg.augment
        mean = torch.tensor(aug.mean, device=self.device).view(1, -1, 1, 1)
        std = torch.tensor(aug.std, device=self.device).view(1, -1, 1, 1)
        out = []
        for chunk in images.split(256):
            x = chunk.to(self.device).float() / 255  # centre views at augment.size
            out.append(backbone((x - mean) / std).float())
        return torch.cat(out)

    def run(self, backbone: torch.nn.Module) -> dict[str, float]:
        mc = self.cfg.monitor
        train_x, train_y = self._images(self.train_spec, "monitor.train", ("train",))
        val_x, val_y = self._images(self.val_spec, "monitor.val", ("val", "test"))
        was = backbone.training
        backbone.eval()
        try:
            ftrain, fval = self._embed(backbone, train_x), self._embed(backbone, val_x)
        finally:
            backbone.train(was)
        k = min(mc.k, len(ftrain))
        pred = knn_classify(ftrain, train_y.to(self.device), fval, ks=(k,),
                            temperature=mc.temperature)[k]
        top1 = (pred[:, 0].cpu() == val_y).float().mean().item()
        return {"monitor/knn_top1": top1, **{f"monitor/{k_}": v for k_, v in
                                             collapse_metrics(fval).items()}}
