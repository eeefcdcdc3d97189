"""The guard of continued pretraining: is the run still better than where it started?

Continued self-supervised training can make good starting weights *worse* (users of DINOv2
report k-NN falling from 80 % to 10 % within 20k images) with nothing in the run to notice it.
With the online monitor on (:mod:`selfsup.monitor`), the guard

* measures the **starting weights** once, at step 0 of a fresh run (when ``model.init`` is not
  ``random``, or ``checkpoint.keep_best`` / ``monitor.min_vs_init`` is set), and logs every
  later evaluation's ``monitor/knn_vs_init``: its k-NN top-1 minus the start's, in points (%);
* **keeps the best** (``checkpoint.keep_best: true``): whenever the monitor's k-NN beats every
  earlier evaluation of the run (the start's included), the backbone is exported as
  ``export/backbone-best.safetensors``, its metadata carrying ``monitor: {knn_top1, step}``.
  Checkpoint pruning never touches it, and a resume goes on comparing with it (its score is in
  ``trainer.json`` and in the file itself, whichever is higher: a best written after the last
  checkpoint still counts);
* **stops a run that got worse** (``monitor.min_vs_init: -X``): after two evaluations in a row
  more than X points below the start, one line and exit status 3 (the divergence code: the
  run is not requeued, the recipe was not wrong), every checkpoint and the best export intact.

Its state (start score, best score and step, evaluations below in a row) lives in the
trainer's state, so it is checkpointed and resumed with everything else.
"""

from __future__ import annotations

import json
from pathlib import Path

from selfsup.errors import RecipeError
from selfsup_io import export_format as fmt

KNN = "monitor/knn_top1"


def initial_state() -> dict:
    return {"init_knn": None, "best_knn": None, "best_step": None, "below": 0}


class Guard:
    def __init__(self, cfg, run_dir: str | Path, monitor_enabled: bool):
        self.keep_best = bool(cfg.checkpoint.keep_best)
        self.min_vs_init = cfg.monitor.min_vs_init
        if (self.keep_best or self.min_vs_init is not None) and not monitor_enabled:
            raise RecipeError("checkpoint.keep_best and monitor.min_vs_init read the online monitor: set "
                              "monitor.every_steps > 0 and labelled data.val (or monitor.val)")
        self.measure_start = cfg.model.init != "random" or self.keep_best or self.min_vs_init is not None
        self.best_path = Path(run_dir) / fmt.EXPORT_DIR / fmt.BEST_EXPORT

    def sync_best(self, state: dict) -> None:
        """After a resume: the best export on disk may be newer than the checkpoint's state."""
        if not self.keep_best or not self.best_path.is_file():
            return
        try:
            from safetensors import safe_open

            with safe_open(str(self.best_path), "pt") as f:
                mon = json.loads((f.metadata() or {})["selfsup"]).get("monitor") or {}
        except Exception:
            return  # unreadable: the next better evaluation replaces it
        if isinstance(mon.get("knn_top1"), (int, float)) and (
                state["best_knn"] is None or mon["knn_top1"] > state["best_knn"]):
            state["best_knn"], state["best_step"] = float(mon["knn_top1"]), mon.get("step")

    def observe(self, state: dict, step: int, record: dict) -> tuple[bool, str | None]:
        """One monitor evaluation at ``step``: adds ``monitor/knn_vs_init`` to ``record``;
        returns (write the best export now, the stop message or None)."""
        knn = record.get(KNN)
        if knn is None:
            return False, None
        if step == 0 and state["init_knn"] is None:
            state["init_knn"] = float(knn)
        best = self.keep_best and (state["best_knn"] is None or knn > state["best_knn"])
        if best:
            state["best_knn"], state["best_step"] = float(knn), step
        if state["init_knn"] is None or step == 0:
            return best, None
        vs = 100.0 * (knn - state["init_knn"])
        record["monitor/knn_vs_init"] = vs
        if self.min_vs_init is None:
            return best, None
        state["below"] = state["below"] + 1 if vs < self.min_vs_init else 0
        if state["below"] < 2:
            return best, None
        kept = (f"the best export is {self.best_path} (step {state['best_step']}, k-NN "
                f"{100 * state['best_knn']:.2f}%)" if self.keep_best and state["best_knn"] is not None
                else "checkpoint.keep_best was off: no best export was kept")
        return best, (f"the online monitor's k-NN fell more than {-self.min_vs_init:g} points below the "
                      f"starting weights' ({100 * state['init_knn']:.2f}%) for two evaluations in a row "
                      f"(now {100 * knn:.2f}%, {vs:+.2f} at step {step}; monitor.min_vs_init); {kept}; "
                      "a lower optim.lr or optim.layer_decay usually keeps what the start knew")
