"""selfsup_eval: k-NN and linear probes on exported selfsup backbones.

The Python API (:mod:`selfsup_eval.api`), imported on first use so that ``import selfsup_eval``
stays light: ``selfsup_eval.evaluate(checkpoints, train=..., val=...)`` returns the records of
``results.json``; ``selfsup_eval.embed(checkpoint, data)`` returns ``(embeddings, index)``; bad
input raises ``selfsup_eval.UsageError`` with the CLI's error line.
"""

__all__ = ["evaluate", "embed", "UsageError"]


def __getattr__(name):
    if name in ("evaluate", "embed"):
        from selfsup_eval import api

        return getattr(api, name)
    if name == "UsageError":
        from selfsup_io.errors import UsageError

        return UsageError
    raise AttributeError(f"module 'selfsup_eval' has no attribute {name!r}")
