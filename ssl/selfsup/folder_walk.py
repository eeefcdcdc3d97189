"""Walking an image folder (one sub-folder per class) for ``selfsup-shards``, safely.

torchvision's ``make_dataset`` follows links to directories with ``os.walk(followlinks=True)``
and nothing else: a link back up (``dog/loop -> ..``) made 8 images 328 samples and labelled the
cat images dog. Here links are still followed (data sets assembled from links are common), but
never into a real folder already read or queued.
"""

from __future__ import annotations

import os
from pathlib import Path


def class_files(root: Path, class_to_idx: dict) -> tuple[list[tuple[str, int]], list[str]]:
    """(file, label) of the image files under each class folder, in torchvision's
    ``make_dataset`` order, and the directory links skipped. Links to directories are followed,
    but never into a real folder already read or queued (a class folder, the root, an ancestor):
    ``dog/loop -> ..`` once made 8 images 328 samples and labelled the cat images dog."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

    tops = {c: os.path.join(root, c) for c in class_to_idx}
    seen = {os.path.realpath(root)} | {os.path.realpath(d) for d in tops.values()}
    samples, skipped = [], []
    for c in sorted(class_to_idx):
        found = []
        for folder, dirs, files in os.walk(tops[c], followlinks=True):
            keep = []
            for d in sorted(dirs):
                real = os.path.realpath(os.path.join(folder, d))
                if real in seen:
                    skipped.append(os.path.relpath(os.path.join(folder, d), root))
                else:
                    seen.add(real)
                    keep.append(d)
            dirs[:] = keep
            found.append((folder, files))
        for folder, files in sorted(found):
            samples += [(os.path.join(folder, f), class_to_idx[c]) for f in sorted(files)
                        if has_file_allowed_extension(f, IMG_EXTENSIONS)]
    empty = sorted(set(class_to_idx) - {os.path.relpath(f, root).split(os.sep)[0] for f, _ in samples})
    if empty:
        raise FileNotFoundError(f"Found no valid file for the classes {', '.join(empty)}")
    return samples, skipped
