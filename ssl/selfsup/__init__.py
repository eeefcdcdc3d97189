"""selfsup: self-supervised pretraining of image backbones on WebDataset shards.

The source root is ``ssl/`` but the package is ``selfsup``: ``ssl`` itself must never become a
package, since it would shadow Python's standard ``ssl`` module (and break HTTPS).
"""

__version__ = "0.2.0"


def __getattr__(name):
    """``selfsup.train(recipe, **overrides)`` (:mod:`selfsup.api`), imported on first use."""
    if name == "train":
        from selfsup.api import train

        return train
    raise AttributeError(f"module 'selfsup' has no attribute {name!r}")
