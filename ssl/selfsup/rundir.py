"""Who may write a run directory, and which recipe changes a resume accepts.

**The lock.** Two trainers on one ``run.dir`` interleave their checkpoints, metrics and exports
(seen: both exit 0 and leave an export mixed from two runs). The main process therefore holds an
exclusive ``flock`` on ``RUN_DIR/.lock`` for the whole run; a second trainer refuses to start
with one line naming the holder (host, pid, start time, written into the file). ``flock`` rather
than a "pid file": the kernel drops the lock when its process dies, however it dies (SIGKILL,
OOM killer, preemption), so a crashed owner never leaves the directory stuck and a requeued job
simply takes the lock again; nothing has to guess whether a recorded pid is still alive.

Shared file systems (multi-node runs write ``run.dir`` on one): only global rank 0 locks, so
the lock only has to work between machines, which it does where the file system implements
``flock`` across clients: NFSv4 (the Linux client maps ``flock`` onto NFS byte-range locks),
Lustre mounted with ``-o flock``, GPFS, BeeGFS. When the machine that held the lock dies (not
just its process), the server keeps the lock until the client's lease expires (NFSv4: about
90 s), so a job requeued onto another node could find it still held: ``SELFSUP_LOCK_WAIT=SECONDS``
makes the trainer retry that long before refusing, and ``launch/slurm.sbatch`` sets 180. Where
``flock`` is not supported at all (Lustre without ``-o flock``: ENOSYS/EOPNOTSUPP/ENOLCK), the run
goes on unlocked with one warning line: refusing to train there would make selfsup unusable on
that cluster, and the lock only guards against a user mistake.

**Recipe changes on resume.** A checkpoint carries the recipe it was written with
(``checkpoints/step-N/recipe.yaml``). Resuming with a recipe that differs in anything that
changes the numbers computed (batch size, augmentation, seed, loss, lr, step budget, ...) would
silently turn an exact resume into a different run, and a changed model, objective or optimizer
cannot be loaded at all (a state-dict traceback, ``KeyError: 'step'``). So:

Each key's class is declared with the key (:func:`selfsup.schema.key`'s ``resume``):

* keys that change nothing that is computed (``FREE``: logging, checkpointing, the monitor, where
  to resume from) may always differ;
* any other difference is refused with one line listing the keys, unless the user passes
  ``--accept-changes`` (e.g. a lower ``optim.lr`` after a divergence, a longer
  ``train.max_steps``): then the run goes on from the checkpoint with the new values;
* ``STRUCTURAL`` differences (what the checkpoint's tensors are) are refused even then.
"""

from __future__ import annotations

import errno
import os
import socket
import time
from pathlib import Path

from omegaconf import OmegaConf

from selfsup.errors import RunDirError  # noqa: F401  (raised here; also imported from here)

LOCK_FILE = ".lock"
LOCK_WAIT_ENV = "SELFSUP_LOCK_WAIT"
UNSUPPORTED = (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK, errno.EINVAL)
class RunDirLock:
    """Exclusive ``flock`` on ``RUN_DIR/.lock`` (see the module docstring); ``release()`` or the
    end of the process frees it. ``selfsup-shards`` locks its output folder and split the same
    way (``name=".SPLIT.lock"``, ``what``/``prog``/``fix`` for its messages), and with
    ``remove=True`` leaves no lock file behind."""

    def __init__(self, run_dir: str | Path, name: str = LOCK_FILE, what: str = "",
                 prog: str = "selfsup-train", fix: str = "use another run.dir", remove: bool = False):
        import fcntl

        self.path, self.remove = Path(run_dir) / name, remove
        what = what or f"run.dir {self.path.parent}"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        deadline = time.monotonic() + float(os.environ.get(LOCK_WAIT_ENV) or 0)
        waited = False
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if not remove or self._linked():
                    break
                os.close(self.fd)  # locked a file its last holder had removed: lock the new one
                self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
                continue
            except OSError as e:
                if e.errno in UNSUPPORTED:
                    print(f"{prog}: warning: cannot lock {self.path} ({os.strerror(e.errno)}: "
                          f"the file system has no flock); make sure no other {prog} uses {what}",
                          flush=True)
                    return
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    os.close(self.fd)
                    self.fd = None
                    raise
                if time.monotonic() >= deadline:
                    holder = self._holder()
                    os.close(self.fd)
                    self.fd = None
                    raise RunDirError(
                        f"{what} is in use by another {'trainer' if prog == 'selfsup-train' else prog} "
                        f"({holder}); wait for it to finish or {fix}") from None
                if not waited:
                    print(f"{prog}: waiting up to {os.environ.get(LOCK_WAIT_ENV)} s "
                          f"({LOCK_WAIT_ENV}) for the lock on {self.path} ({self._holder()})",
                          flush=True)
                    waited = True
                time.sleep(1.0)
        # a forked child (a DataLoader worker, a compile worker) shares the locked file
        # description: killed with SIGKILL, the trainer's lock would live on in its orphaned
        # workers for seconds. Each child drops its copy at once; the parent's lock is unaffected
        os.register_at_fork(after_in_child=self._drop_in_child)
        os.ftruncate(self.fd, 0)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        os.pwrite(self.fd, f"host {socket.gethostname()} pid {os.getpid()} since {stamp}\n".encode(), 0)

    def _holder(self) -> str:
        try:
            text = os.pread(self.fd, 200, 0).decode(errors="replace").strip()
        except OSError:
            text = ""
        return text or "holder unknown"

    def _drop_in_child(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # this process's reference only: the parent still holds the flock
            self.fd = None

    def _linked(self) -> bool:
        """Whether the locked descriptor is still the file at ``path`` (``remove=True``: a
        holder unlinks the file before it unlocks, and a waiter that then gets the lock on the
        unlinked file must not count it)."""
        try:
            return os.stat(self.path).st_ino == os.fstat(self.fd).st_ino
        except FileNotFoundError:
            return False

    def release(self) -> None:
        if self.fd is not None:
            if self.remove:  # (removed while still locked: see _linked)
                self.path.unlink(missing_ok=True)
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None


def _flat(cfg) -> dict:
    out: dict = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            out[prefix] = value

    walk("", OmegaConf.to_container(cfg, resolve=True) if not isinstance(cfg, dict) else cfg)
    return out


def _matches(key: str, prefixes: tuple) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def resume_classes(objective_name: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(free keys, structural keys) of the recipe schema for this objective (module docstring)."""
    from selfsup.config import schema_fields
    from selfsup.schema import FREE, STRUCTURAL

    keys = schema_fields(objective_name)
    return (tuple(k for k, f in keys if f.metadata.get("resume") == FREE),
            tuple(k for k, f in keys if f.metadata.get("resume") == STRUCTURAL))


def recipe_changes(saved, current) -> list[str]:
    """Keys whose value differs between the checkpoint's recipe and the current one, free keys
    left out, as ``key: old -> new``. A key only one side has is a key a newer (or older)
    selfsup added (or removed) with its default: it is not a change the user made, so it is
    left out too (a run must resume after an upgrade)."""
    old, new = _flat(saved), _flat(current)
    free, structural = resume_classes(_objective_name(current))
    out = []
    for key in sorted(set(old) & set(new)):
        if _matches(key, free) or _matches(key, structural) or old[key] == new[key]:
            continue
        out.append(f"{key}: {old[key]} -> {new[key]}")
    for key in structural:  # whole values: model.kwargs {} -> {img_size: 64} is one change
        a, b = _lookup(saved, key), _lookup(current, key)
        if a is not _MISSING and b is not _MISSING and a != b:
            out.append(f"{key}: {a} -> {b}")
    return out


_MISSING = object()


def _objective_name(cfg) -> str:
    name = _lookup(cfg, "objective.name")
    return "simclr" if name is _MISSING else str(name)  # load_recipe's default


def _lookup(cfg, key: str):
    value = OmegaConf.to_container(cfg, resolve=True) if not isinstance(cfg, dict) else cfg
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return _MISSING
        value = value[part]
    return value


def check_resume_recipe(saved, current, checkpoint: Path, accept: bool) -> list[str]:
    """Raise :class:`RunDirError` for differences resume cannot take (see the module docstring);
    return the accepted ones (empty when the recipe is unchanged)."""
    changes = recipe_changes(saved, current)
    if not changes:
        return []
    _, keys = resume_classes(_objective_name(current))
    structural = [c for c in changes if _matches(c.split(":", 1)[0], keys)]
    if structural:
        raise RunDirError(f"cannot resume from {checkpoint}: the recipe changed what its tensors are "
                          f"({'; '.join(structural)}); start a new run.dir or resume=none")
    if not accept:
        raise RunDirError(f"resuming from {checkpoint} with a changed recipe ({'; '.join(changes)}) "
                          "would not continue the same run; restore those values, or pass "
                          "--accept-changes to go on with the new ones")
    return changes


def saved_recipe(checkpoint: Path, run_dir: Path):
    """The recipe a checkpoint was written with: its own copy, else (checkpoints written before
    they carried one) the run's recipe.yaml when the checkpoint belongs to this run; else None."""
    own = checkpoint / "recipe.yaml"
    if own.is_file():
        return OmegaConf.load(own)
    shared = run_dir / "recipe.yaml"
    if shared.is_file() and checkpoint.resolve().parent.parent == run_dir.resolve():
        return OmegaConf.load(shared)
    return None


class _NoLock:
    def release(self) -> None:
        pass


def acquire(acc, run_dir: Path):
    """Collective: the main process locks ``run_dir`` (creating it); every rank raises the same
    :class:`RunDirError` when it is taken, so none is left waiting at a collective."""
    from selfsup.collective import any_rank

    lock, error = _NoLock(), None
    if acc.is_main_process:
        try:
            lock = RunDirLock(run_dir)
        except RunDirError as e:
            error = e
        except OSError as e:  # unwritable or not a directory: one line, and no rank left waiting below
            error = RunDirError(f"cannot create the lock {Path(run_dir) / LOCK_FILE} "
                                f"({e.strerror or e}); check run.dir")
    if any_rank(acc, error is not None):
        if error is None and not acc.is_main_process:
            error = RunDirError(f"run.dir {run_dir} cannot be locked by rank 0 (rank 0's message says why)")
    if error is not None:
        raise error
    return lock
