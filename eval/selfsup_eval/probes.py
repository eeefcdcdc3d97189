"""What ``selfsup-eval`` computes on one checkpoint's cached features: the k-NN sweep, the linear
probe, k-NN ⊕ linear and the low-shot protocols, into the checkpoint's record.

One place decides which protocol runs in which mode, so the CLI stays about input and output:

* ``knn``: the k-NN sweep (and low-shot k-NN);
* ``linear``: the linear probe (with ``--knn-loss``, trained with the k-NN-weighted loss);
* ``all``: both, plus k-NN ⊕ linear (:mod:`selfsup_eval.knn_linear`) from the same probe fit;
* a ``--baseline`` gets the k-NN only, whatever the mode;
* wherever the k-NN runs, the retrieval metrics (:mod:`selfsup_eval.retrieval`) come with it.
"""

from __future__ import annotations

from selfsup_io.knn import knn_classify, topk_accuracy
from selfsup_eval.knn_linear import knn_linear
from selfsup_eval.linear import linear_probe
from selfsup_eval.lowshot import lowshot, protocols
from selfsup_eval.retrieval import Retrieval


def methods_for(mode: str, baseline: bool) -> tuple[str, ...]:
    if baseline or mode == "knn":
        return ("knn",)
    return ("linear",) if mode == "linear" else ("knn", "linear", "knn_linear")


def probe(args, record: dict, ftrain: dict, fval: dict, baseline: bool, extras: dict | None = None) -> None:
    """Fill ``record`` from rank 0's gathered features (computed on ``args.device``). With
    ``extras`` (a dict), k-NN ⊕ linear also leaves the linear probe's val predictions there
    (``"linear_pred"``, for the confusion matrix of :mod:`selfsup_eval.pictures`)."""
    dev = args.device
    methods = methods_for(args.mode, baseline)
    if "knn" in methods:
        retrieval = Retrieval(ftrain["label"], fval["label"])  # from the same neighbour search
        ranked = knn_classify(ftrain["features"].to(dev), ftrain["label"], fval["features"].to(dev),
                              ks=args.k, temperature=args.temperature, extra_k=retrieval.search_k,
                              on_chunk=retrieval)
        record["knn"] = {f"k={k}": topk_accuracy(r, fval["label"], 1) for k, r in ranked.items()}
        record["knn_top5"] = {f"k={k}": topk_accuracy(r, fval["label"], 5) for k, r in ranked.items()}
        record["knn_temperature"] = args.temperature
        record["retrieval"] = retrieval.result()
    knn_loss = getattr(args, "knn_loss", 0.0) or 0.0
    if "knn_linear" in methods or ("linear" in methods and knn_loss > 0):
        both = knn_linear(ftrain["features"], ftrain["label"], fval["features"], fval["label"],
                          device=dev, knn_loss=knn_loss, return_probs=extras is not None)
        record["linear"] = both["linear"]
        if extras is not None:
            extras["linear_pred"] = both["val_logits"].argmax(1)
        if "knn_linear" in methods:
            record["knn_linear"] = both["knn_linear"]
    elif "linear" in methods:
        record["linear"] = linear_probe(ftrain["features"], ftrain["label"], fval["features"],
                                        fval["label"], device=dev)
    protos = protocols(getattr(args, "shots", None), getattr(args, "fraction", None),
                       getattr(args, "subset_file", None))
    if protos:
        record["lowshot"] = lowshot(ftrain, fval, protos, args.subsets, methods=methods, ks=args.k,
                                    temperature=args.temperature, knn_loss=knn_loss, device=dev,
                                    train_urls=getattr(args, "train_urls", None))
