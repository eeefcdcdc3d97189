"""selfsup: self-supervised pretraining of image backbones on WebDataset shards.

The source root is ``ssl/`` but the package is ``selfsup``: ``ssl`` itself must never become a
package, since it would shadow Python's standard ``ssl`` module (and break HTTPS).
"""

__version__ = "0.2.0"
