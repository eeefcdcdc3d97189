"""Walking an image folder (one sub-folder per class) for ``selfsup-shards``, safely.

torchvision's ``make_dataset`` follows links to directories with ``os.walk(followlinks=True)``
and nothing else: a link back up (``dog/loop -> ..``) made 8 images 328 samples and labelled the
cat images dog. Here links are still followed (data sets assembled from links are common), but
never into a real folder already read or queued; a *file* link into another class's folder
(``c1/stolen.jpg -> ../c0/0.jpg``, one image under two labels), or to a file already listed, is
skipped and named the same way. Image files are those with torchvision's extensions plus
``.gif`` (re-encoded as PNG by the writer, as docs/formats.md says); every other file is named
as not written, never dropped silently.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


IMAGE_EXTENSIONS = (".gif",)  # besides torchvision's IMG_EXTENSIONS (which lack it)


def class_files(root: Path, class_to_idx: dict,
                ignored: list | None = None) -> tuple[list[tuple[str, int]], list[str]]:
    """(file, label) of the image files under each class folder, in torchvision's
    ``make_dataset`` order, and the links skipped. Links to directories are followed,
    but never into a real folder already read or queued (a class folder, the root, an ancestor):
    ``dog/loop -> ..`` once made 8 images 328 samples and labelled the cat images dog. File
    links into another class's folder or to a file already listed are skipped too. Files that
    are not images by their extension are appended to ``ignored`` (relative paths)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

    tops = {c: os.path.join(root, c) for c in class_to_idx}
    seen = {os.path.realpath(root)} | {os.path.realpath(d) for d in tops.values()}
    real_tops = {c: os.path.realpath(d) + os.sep for c, d in tops.items()}
    files_seen: set[str] = set()
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
            for f in sorted(files):
                path = os.path.join(folder, f)
                if not has_file_allowed_extension(f, IMG_EXTENSIONS + IMAGE_EXTENSIONS):
                    if ignored is not None:
                        ignored.append(os.path.relpath(path, root))
                    continue
                real = os.path.realpath(path)
                other = next((o for o, t in real_tops.items() if o != c and real.startswith(t)), None)
                if os.path.islink(path) and (other is not None or real in files_seen):
                    skipped.append(os.path.relpath(path, root))  # one image, one label
                    continue
                files_seen.add(real)
                samples.append((path, class_to_idx[c]))
    empty = sorted(set(class_to_idx) - {os.path.relpath(f, root).split(os.sep)[0] for f, _ in samples})
    if empty:
        raise FileNotFoundError(f"Found no valid file for the classes {', '.join(empty)}")
    return samples, skipped


def read_regular(path: str) -> bytes:
    """The bytes of a regular file (through links); anything else is refused without blocking:
    ``open`` on a FIFO named ``x.jpg`` waited forever for a writer. Opened non-blocking, then
    checked with ``fstat`` on the descriptor, so a file swapped after the walk is caught too."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else \
                "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a file"
            raise ValueError(f"not a regular file ({kind})")
        with os.fdopen(fd, "rb", closefd=True) as f:
            fd = None
            return f.read()
    finally:
        if fd is not None:
            os.close(fd)
