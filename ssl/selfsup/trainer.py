"""The training loop: one code path for 1 CPU, 8 GPUs or many nodes (Hugging Face Accelerate).

The trainer owns what all objectives share — optimizer, schedules, EMA, mixed precision, gradient
accumulation and clipping, checkpoints and exact resume, preemption, logging, export — and calls
the objective only through :class:`selfsup.objectives.Objective`. It never looks at the
objective's name.

Exact resume: N steps, then resume, then N steps gives the weights of 2N uninterrupted steps. The
schedules are functions of the step, accelerate restores model/optimizer/RNG, and the checkpoint
carries the augmentation RNG and the data stream's position (see :mod:`selfsup.data`).
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from accelerate.utils import set_seed
from omegaconf import OmegaConf

from selfsup import checkpoint as ckpt
from selfsup import elastic
from selfsup import resume as resuming
from selfsup import rundir
from selfsup.build import build_model, make_accelerator
from selfsup.collective import any_rank
from selfsup.config import RecipeError
from selfsup.data import ShardLoader, check_corrupt
from selfsup.errors import warn
from selfsup.export_meta import export_metadata, export_record
from selfsup.hf_export import export_hf
from selfsup.integrity import damage
from selfsup.guard import KNN, Guard, initial_state
from selfsup.init_weights import start_from_init
from selfsup.logs import MetricsLog
from selfsup.monitor import Monitor
from selfsup.optim import create_optimizer, reapply_hyperparameters, recipe_hyperparameters
from selfsup.recipe_checks import schedule_problems, warmup_notes
from selfsup.schedules import EMA, lr_scheduler, scaled_lr, set_weight_decay
from selfsup.stopping import REQUEUE_EXIT_CODE, Preempted, StopSignals
from selfsup_io.progress import Progress
from selfsup_io.tracking import TrackerError, check_trackers


class Diverged(RuntimeError):
    """The loss or the weights became NaN/inf. The run stops instead of spending the rest of its
    budget on NaNs (as DINO does) and writes nothing for that step, so the newest checkpoint and
    export stay the last good ones. Every rank raises it at the same step: the loss it checks is
    reduced over the ranks and the weights are the same on every rank."""


class Trainer:
    def __init__(self, cfg, accept_changes: bool = False):
        self.accept_changes = accept_changes  # resume with a changed recipe (selfsup.rundir)
        try:  # before anything is built: a missing tracker package is a one-line error at once
            check_trackers(cfg.log.trackers)
        except TrackerError as e:
            raise RecipeError(str(e)) from None
        self.cfg = cfg
        self.acc = make_accelerator(cfg)
        acc = self.acc
        self.run_dir = Path(cfg.run.dir)
        set_seed(cfg.run.seed)  # identical initial weights on every process
        objective = build_model(cfg, acc)
        # model.init: the file's weights in the online backbone and every momentum target. Not
        # when a checkpoint will replace them: a resume needs no starting file (it may be gone),
        # and its provenance comes back with the checkpoint's trainer.json
        init = None if ckpt.resolve_resume(cfg.resume, cfg.run.dir) else start_from_init(objective, cfg)
        if init is not None:
            acc.print(init.pop("note"))  # "model.init PATH: N tensors from ..., prefix ..."

        if not cfg.data.train:
            raise RecipeError("data.train is not set: pass data.train=SHARDS (see docs/formats.md)")
        # a resume on another number of processes keeps the global batch: selfsup.elastic
        self.batch_size, self.accum, note = elastic.batch_layout(cfg, acc.num_processes, self.run_dir,
                                                                 accept_changes)
        if note:
            acc.print(note)
        self.loader = ShardLoader(cfg.data.train, batch_size=self.batch_size,
                                  rank=acc.process_index, world_size=acc.num_processes,
                                  num_workers=cfg.data.num_workers, seed=cfg.run.seed,
                                  views=objective.views(), decode=cfg.data.decode,
                                  shuffle_buffer=cfg.data.shuffle_buffer,
                                  samples_per_epoch=cfg.data.samples_per_epoch, grad_accum=self.accum)
        if self.loader.exact and self.loader.dropped and acc.is_main_process:
            acc.print(f"data: {self.loader.samples_per_epoch} samples an epoch; the last "
                      f"{self.loader.dropped} of each epoch's order (fewer than one global batch, "
                      "different ones every epoch) are left out")
        accum = self.accum
        self.global_batch = self.batch_size * acc.num_processes * accum
        steps_per_epoch = self.loader.batches_per_epoch / accum
        self.total_steps = cfg.train.max_steps or max(1, math.floor(cfg.train.epochs * steps_per_epoch))
        oc = cfg.optim
        lr = scaled_lr(oc.lr, self.global_batch, oc.lr_scaling)
        for problem in schedule_problems(oc, self.global_batch):  # the same on every rank
            raise RecipeError(f"bad recipe value: {problem}")
        for note in warmup_notes(oc, self.global_batch) if acc.is_main_process else []:
            warn(note)
        optimizer = create_optimizer(objective, oc, lr, acc.device,  # fused/foreach updates
                                     backbone=objective.online_backbone())
        self.optim_hyper = recipe_hyperparameters(optimizer)  # what a resume must not undo
        warmup = round(oc.warmup_epochs * steps_per_epoch)
        if warmup >= self.total_steps and acc.is_main_process:
            warn(f"optim.warmup_epochs={oc.warmup_epochs:g} ({warmup} steps) covers the whole run "
                 f"of {self.total_steps} steps: the peak lr {lr:.3g} is never reached")
        self.scheduler = lr_scheduler(optimizer, self.total_steps, warmup, oc.warmup_lr, oc.min_lr)
        self.model, self.optimizer = acc.prepare(objective, optimizer)
        self.objective = acc.unwrap_model(self.model)
        self.ema = EMA(self.objective.momentum_pairs())  # on the device: gathered once
        self.generator = torch.Generator().manual_seed(cfg.run.seed * 7919 + acc.process_index)
        self.state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "images_seen": 0,
                      "corrupt_samples": 0, "segment": None,  # segment: exact epochs' plan
                      "guard": initial_state(), "init": init}
        self.positions: dict = {}
        self.seen = elastic.SeenKeys(self.run_dir, acc.process_index) if cfg.data.record_keys else None
        self.stops = StopSignals(self._where_stopped)  # SIGTERM/SIGUSR1: selfsup.stopping
        self.monitor = Monitor(cfg, acc.device)
        self.guard = Guard(cfg, self.run_dir, self.monitor.enabled)  # knn_vs_init, keep_best, min_vs_init

    # ----------------------------------------------------------------------------- resume ----
    def resume(self) -> None:
        """Newest loadable checkpoint (damaged ones named and skipped), recipe compared with
        the checkpoint's first: :mod:`selfsup.resume`."""
        if resuming.resume(self) is not None:  # the groups' settings are the recipe's, not the checkpoint's
            reapply_hyperparameters(self.optimizer, self.optim_hyper)
        elif self.seen is not None and self.acc.is_main_process:
            self.seen.clear()  # a new run in an old run.dir: its key records start empty

    def save(self) -> Path:
        self._check_weights()
        state = {**self.state, "world_size": self.acc.num_processes,
                 "total_steps": self.total_steps, "batch_size": self.batch_size,
                 "grad_accum": self.accum, "export": export_record(self.objective)}
        rank_state = {"generator": self.generator.get_state(), "positions": self.positions,
                      "num_workers": self.cfg.data.num_workers}
        if self.seen is not None:
            rank_state["seen"] = self.seen.mark(self.state["epoch"])
        path = ckpt.save_checkpoint(self.acc, self.run_dir, self.state["step"], state, rank_state,
                                    self.cfg.checkpoint.keep, recipe=OmegaConf.to_yaml(self.cfg))
        self.export()
        return path

    def export(self, best: dict | None = None) -> Path | None:
        """The step's export (and export/hf); ``best`` (the monitor's record): only
        ``export/backbone-best.safetensors``, with that record in its metadata."""
        if not self.acc.is_main_process:
            return None
        meta = export_metadata(self.cfg, self.objective, self.state, self.epochs_done(), self.run_dir)
        if best is not None:
            meta["monitor"] = best
            return ckpt.export_backbone(self.objective.backbone, self.run_dir, meta, names=(self.guard.best_path.name,))
        path = ckpt.export_backbone(self.objective.backbone, self.run_dir, meta)
        export_hf(self.objective.backbone, self.run_dir, meta)  # timm's HF layout, export/hf
        return path

    def _check_weights(self) -> None:
        """One device sync per checkpoint: a NaN update a log window has not yet shown must not
        replace the last good checkpoint and export."""
        if torch.stack([torch.isfinite(p).all() for p in self.objective.parameters()]).all().item():
            return
        name = next(n for n, p in self.objective.named_parameters() if not torch.isfinite(p).all())
        raise Diverged(self._diverged(f"weight {name} is NaN/inf at step {self.state['step']}"))

    def _diverged(self, what: str) -> str:
        # the newest checkpoint whose files still match their checksums: a damaged one is no
        # place to resume from, and resume=auto would pass over it too (selfsup.integrity)
        last = next((p for p in reversed(ckpt.list_checkpoints(self.run_dir)) if damage(p) is None), None)
        where = (f"the newest checkpoint that passes its checksums is {last}, where the same command "
                 "resumes (resume=auto)" if last else "no intact checkpoint was written before it")
        return (f"training diverged: {what}; nothing was written for this step and {where}; "
                "to resume with a lower optim.lr, optim.clip_grad (e.g. 1.0) or "
                "train.precision=fp32, add those overrides and --accept-changes")

    def epochs_done(self) -> float:
        return self.state["epoch"] + self.state["batch_in_epoch"] / self.loader.batches_per_epoch

    # ------------------------------------------------------------------------------- data ----
    def batches(self):
        """Endless stream of this rank's batches; keeps the data position up to date."""
        while True:
            if self.state["segment"] is None:  # exact epochs: the epoch's plan, kept in checkpoints
                self.state["segment"] = self.loader.first_segment()
            for batch in self.loader.epoch(self.state["epoch"], self.state["batch_in_epoch"],
                                           self.positions, self.state["segment"]):
                self.state["batch_in_epoch"] += 1
                self.positions[batch["role"]] = batch["drawn"]
                if self.seen is not None:
                    self.seen.record(self.state["epoch"], batch["key"])
                # epochs completed before this batch (fractional): for objectives with warm-ups
                batch["epoch"] = (self.state["epoch"] + (self.state["batch_in_epoch"] - 1)
                                  / self.loader.batches_per_epoch)
                yield batch
            self.state["epoch"] += 1
            self.state["batch_in_epoch"] = 0
            self.state["segment"] = None
            self.positions = {}

    def _where_stopped(self) -> str:
        last = ckpt.resolve_resume("auto", self.run_dir)
        return f"step {self.state['step']}; no checkpoint written (the last is {last})"

    # ------------------------------------------------------------------------------- loop ----
    def train(self) -> dict:
        """Train to ``total_steps``; raises :class:`Preempted` or :class:`Diverged` on every rank
        at the same step. The caller ends with :func:`end_distributed` either way, which keeps
        every rank until rank 0's export is written."""
        cfg, acc = self.cfg, self.acc
        self._lock = rundir.acquire(acc, self.run_dir)  # a second trainer on run.dir stops here
        try:  # the lock is released on every way out, a tracker that does not start included
            self.resume()  # refuses a changed recipe before recipe.yaml is replaced
            self.guard.sync_best(self.state["guard"])
            if acc.is_main_process:
                OmegaConf.save(cfg, self.run_dir / "recipe.yaml")
            self.stops.install()
            log = self._open_log()
        except BaseException:
            self._lock.release()
            raise
        # a bar on a terminal, a plain line a minute in a batch job's log (selfsup_io.progress)
        bar = Progress(self.total_steps, f"{self.objective.name} {cfg.run.dir}", unit="steps",
                       initial=self.state["step"], enabled=acc.is_main_process,
                       rate_unit="img/s", rate_scale=self.global_batch)
        try:
            last = self._loop(log, bar)
            bar.close()  # "done" only once the run has got to its end
            return last
        finally:  # also on Preempted / Diverged: the JSONL and TensorBoard files are flushed
            bar.close(done=False)
            log.close()
            if self.seen is not None:
                self.seen.close()
            self._lock.release()
            self.stops.disarm()

    def _open_log(self) -> MetricsLog:
        """JSONL + the recipe's trackers, opened on the main process. A tracker that does not
        start (no API key, server unreachable) fails every rank together: the others would
        otherwise wait at their next collective for a rank that has gone."""
        cfg, acc = self.cfg, self.acc
        log, error = None, None
        try:
            log = MetricsLog(self.run_dir, enabled=acc.is_main_process, trackers=cfg.log.trackers,
                             project=cfg.log.project, config=OmegaConf.to_container(cfg, resolve=True),
                             step=self.state["step"])  # a resume's steps are logged once
        except TrackerError as e:
            error = e
        if any_rank(acc, error is not None):
            if error is None:
                if log is not None:
                    log.close()
                raise TrackerError("log.trackers: a tracker did not start on the main process "
                                   "(its message is in rank 0's log)")
        if error is not None:
            raise error
        return log

    def _loop(self, log: MetricsLog, bar: Progress) -> dict:
        cfg, acc = self.cfg, self.acc
        accum, device = self.accum, acc.device
        data = self.batches()
        window = {"t0": time.perf_counter(), "wait": 0.0, "steps": 0, "loss": 0.0, "corrupt": 0}
        last = {}
        if self.state["step"] == 0 and self.monitor.enabled and self.guard.measure_start:
            self._monitor(log, 0)  # the starting weights: what monitor/knn_vs_init compares with
        while self.state["step"] < self.total_steps:
            step = self.state["step"]
            progress = step / self.total_steps
            self.scheduler.step_update(step)
            set_weight_decay(self.optimizer, cfg.optim.weight_decay, cfg.optim.weight_decay_end, progress)
            for micro in range(accum):
                t = time.perf_counter()
                with self.stops.waiting_for_data():  # a stop now may end the run here
                    batch = next(data)
                for event in batch.pop("events", ()):  # e.g. a shard shorter than its index says
                    warn(event)
                batch = self.loader.to_device(batch, device)  # data.decode=device: decodes there
                window["wait"] += time.perf_counter() - t  # waiting for data, device decoding included
                window["corrupt"] += batch.pop("corrupt")
                sync = micro == accum - 1
                with nullcontext() if sync else acc.no_sync(self.model):
                    loss, metrics = self.model(batch, self.generator)
                    acc.backward(loss / accum)
                window["loss"] += loss.detach().float() / accum
            if cfg.optim.clip_grad:
                acc.clip_grad_norm_(self.model.parameters(), cfg.optim.clip_grad)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            # EMA at the step's progress (as lr and weight decay): the first update uses exactly
            # the start momentum, as the official schedulers' first value (I-JEPA, BYOL's cosine)
            momentum = self.objective.momentum(progress)
            self.ema.update(momentum)  # no pairs (most objectives): nothing to do
            self.state["step"] += 1
            self.state["images_seen"] += self.global_batch
            window["steps"] += 1
            bar.update(1)
            step = self.state["step"]
            if step % cfg.train.log_every == 0 or step == self.total_steps:
                last = self._log(log, bar, window, metrics, momentum)
            if self.monitor.due(step):
                self._monitor(log, step)
            saved = cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0 and step < self.total_steps
            if saved:
                self.save()
            if self.stops.requested(acc):
                if not saved:  # a second write of the same step would only eat the grace period
                    self.save()
                acc.print(f"stopped by signal at step {step}; checkpoint written, exit "
                          f"{REQUEUE_EXIT_CODE} (requeue)")
                raise Preempted()
        self.save()
        return last

    def _monitor(self, log: MetricsLog, step: int) -> None:
        """The online monitor on the main process, then the guard (selfsup.guard): the best
        export, and a stop every rank takes together (exit 3, as a divergence)."""
        acc, stop = self.acc, None
        if acc.is_main_process:
            record = self.monitor.run(self.objective.backbone)
            best, stop = self.guard.observe(self.state["guard"], step, record)
            log.log(step, record)
            if best:
                self.export(best={"knn_top1": record[KNN], "step": step})
        if any_rank(acc, stop is not None):  # every rank stops at this step, or none
            raise Diverged(stop or "the online monitor's guard stopped the run (monitor.min_vs_init; "
                           "rank 0 says why)")

    def _log(self, log, bar, window, metrics, momentum) -> dict:
        acc = self.acc
        elapsed = time.perf_counter() - window["t0"]
        n = window["steps"]
        loss = acc.reduce(torch.as_tensor(window["loss"], device=acc.device).float(), "mean").item() / n
        if not math.isfinite(loss):  # the same value on every rank: all stop here together
            first = self.state["step"] - n + 1
            steps = f"step {first}" if n == 1 else f"steps {first}-{self.state['step']}"
            raise Diverged(self._diverged(f"the loss of {steps} is {loss}"))
        corrupt = int(acc.reduce(torch.tensor([window["corrupt"]], device=acc.device), "sum").item())
        self.state["corrupt_samples"] += corrupt
        check_corrupt(self.state["corrupt_samples"], self.state["images_seen"],
                      self.cfg.data.max_corrupt_fraction, self.loader.samples_per_epoch)
        record = {"loss": loss, "lr": max(g["lr"] for g in self.optimizer.param_groups),  # layer decay: the top
                  "epoch": round(self.epochs_done(), 4),
                  "img_per_s": n * self.global_batch / elapsed,
                  "data_wait": window["wait"] / elapsed,
                  "corrupt_samples": self.state["corrupt_samples"],
                  **{k: float(v) for k, v in metrics.items()}}
        if momentum is not None:
            record["momentum"] = momentum
        log.log(self.state["step"], record)
        bar.set(epoch=f"{record['epoch']:.2f}", loss=f"{loss:.4f}", lr=f"{record['lr']:.2e}",
                data_wait=f"{record['data_wait']:.0%}")
        window.update(t0=time.perf_counter(), wait=0.0, steps=0, loss=0.0, corrupt=0)
        return record
