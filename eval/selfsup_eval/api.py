"""The Python API for notebooks: :func:`evaluate` and :func:`embed`.

Both build the same argument namespace the CLI parses and run the CLI's own code
(:func:`selfsup_eval.cli.run`, :func:`selfsup_eval.embeddings.embed_to`) under the same checks, so a
notebook and ``selfsup-eval`` cannot drift apart. Bad input raises
:class:`selfsup_io.errors.UsageError` whose message is exactly the line the CLI prints
(``selfsup-eval: error: ...``). Options are the CLI's long options with ``_`` for ``-``
(``batch_size=64``, ``cache_dir=...``, ``no_cache=True``, ``k=[20]``, ``baseline=["raw-pixels"]``).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from selfsup_io.errors import UsageError

PROTOCOLS = {("knn",): "knn", ("linear",): "linear", ("knn", "knn_linear", "linear"): "all"}


def _raise(message: str):
    raise UsageError(f"selfsup-eval: error: {message}")


def _namespace(parser, argv: list[str], options: dict, fixed: tuple):
    parser.error = _raise  # argparse's own errors: the same words, raised instead of exiting
    args = parser.parse_args(argv)
    for key, value in options.items():
        if key in fixed or key.startswith("_") or not hasattr(args, key):
            _raise(f"unknown option {key!r}")
        setattr(args, key, value)
    return args


def evaluate(checkpoints, *, train: str, val: str, protocols=("knn", "linear", "knn_linear"),
             **options) -> list[dict]:
    """Probe ``checkpoints`` (paths, run directories or ``"raw-pixels"``) on labelled ``train`` /
    ``val`` shards; returns the records ``results.json`` holds (and writes it when ``out=DIR``).

    ``protocols``: ``["knn"]`` (k-NN and retrieval), ``["linear"]``, or all three
    (``knn``, ``linear``, ``knn_linear``: the CLI's ``all``, with the pictures when ``out`` is set).
    """
    from selfsup_eval import cli
    from selfsup_eval.common import guarded

    if isinstance(checkpoints, (str, Path)):
        checkpoints = [checkpoints]
    mode = PROTOCOLS.get(tuple(sorted(set(protocols))))
    if mode is None:
        _raise(f"protocols must be ['knn'], ['linear'] or ['knn', 'linear', 'knn_linear'], got {list(protocols)}")
    p = cli.build_parser()
    args = _namespace(p, [mode, *map(str, checkpoints), "--train", str(train), "--val", str(val)], options,
                      ("mode", "checkpoints", "train", "val"))
    args = cli.check(args, p.error)
    return guarded(args, lambda: cli.run(args))


def embed(checkpoint, data: str, out: str | None = None, **options):
    """Every sample's feature under the evaluation protocol: ``(embeddings, index)``.

    ``embeddings``: an (N, D) numpy array (memory-mapped from ``out/embeddings.npy`` when ``out``
    is given, else read into memory from a temporary folder); ``index``: a list of rows
    ``{"row", "key", "label" (None when unlabelled), "shard"}`` in the same order.
    """
    import numpy as np

    from selfsup_eval.common import guarded
    from selfsup_eval.embeddings import build_parser, check_args, embed_to, read_index

    with tempfile.TemporaryDirectory(prefix="selfsup-embed-") as tmp:
        where = str(out) if out is not None else tmp
        p = build_parser()
        args = _namespace(p, [str(checkpoint), "--data", str(data), "--out", where], options,
                          ("checkpoint", "data", "out"))
        check_args(args, p.error)
        info = guarded(args, lambda: embed_to(args))
        if info is None:  # a torchrun process other than rank 0
            return None, None
        arr = np.load(Path(where) / "embeddings.npy", mmap_mode="r" if out is not None else None)
        return arr, read_index(Path(where) / "index.csv")
