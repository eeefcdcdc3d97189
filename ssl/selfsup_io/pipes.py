"""``pipe:`` shard commands that end when their reader does, whichever way it ends.

webdataset runs a ``pipe:CMD`` shard as ``sh -c CMD`` in the reader's own process group and, when
the stream is closed, waits up to 7,200 s for the command to exit. A command that stalls (a hung
mount, a network copy that never delivers) therefore kept a stopped trainer alive for two hours
with ``data.num_workers=0`` ("exit 75" printed, the process still there), and with workers the
trainer exited but the commands lived on as orphans, since torch ends a worker with ``_exit``.

The same holds for http(s) shards, which webdataset reads through a ``curl`` command. Here each
command gets a process group of its own, and the group is killed:

* when the stream is closed before the command has exited by itself within
  :data:`GRACE_SECONDS` (a stop signal, an error, a reader that read what it needed), and after a
  normal exit too, for anything the command left running in the background;
* when this process exits normally (``atexit``);
* when the process that started it dies in any other way (``SIGKILL``, the OOM killer, torch
  ending a DataLoader worker): the command runs under a small ``sh`` supervisor that the kernel
  sends ``SIGTERM`` when its parent dies (Linux ``PR_SET_PDEATHSIG``, set when the command is
  started from the main thread), and whose trap kills the group.

A command that exits by itself with a non-zero status still raises ``IOError`` as webdataset's
does (141, SIGPIPE after the reader stopped, is not an error). Shared by the trainer's loader and
the evaluator (:func:`open_url`, :func:`tar_samples`).
"""

from __future__ import annotations

import atexit
import ctypes
import os
import shlex
import signal
import subprocess
import sys
import threading
import weakref

from webdataset.gopen import Pipe, gopen, gopen_curl, gopen_schemes, rewrite_url
from webdataset.handlers import reraise_exception

GRACE_SECONDS = 2.0
# runs CMD ("$1") in the background so that a signal interrupts ``wait``; the trap kills the group
SUPERVISOR = 'trap "kill -KILL 0" TERM HUP INT; sh -c "$1" <&0 & wait $!'
PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
_LIVE: "weakref.WeakSet[GroupPipe]" = weakref.WeakSet()


def _die_with_parent(parent: int):
    """preexec_fn: SIGTERM to the supervisor when its parent dies (only the libc call: no
    import, no lock, in the forked child). The kernel ties this to the *thread* that forks, so
    it is set only from a process's main thread (the trainer's, a loader worker's, the
    evaluator's); a command opened from another thread still dies on close and at exit."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def set_signal():
        if _LIBC is not None:
            _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
            if os.getppid() != parent:  # the parent died before the call took effect
                os.kill(os.getpid(), signal.SIGKILL)
    return set_signal


class GroupPipe(Pipe):
    """webdataset's reading :class:`~webdataset.gopen.Pipe`, its command in a process group of
    its own that :meth:`close` (or :func:`kill_all`) kills (see the module docstring)."""

    def __init__(self, cmd: str, bufsize: int = 8192, ignore_status: tuple = (141,)):
        super().__init__(["sh", "-c", SUPERVISOR, "selfsup-pipe", cmd], mode="rb", bufsize=bufsize,
                         ignore_status=list(ignore_status), start_new_session=True,
                         preexec_fn=_die_with_parent(os.getpid()))
        self.args = ((cmd,), {})  # what webdataset's messages show
        _LIVE.add(self)

    def kill(self) -> None:
        """SIGKILL to the command's whole process group (gone already: nothing to do)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def close(self) -> None:
        if self.stream.closed:
            return
        _LIVE.discard(self)
        self.stream.close()  # a command still writing gets SIGPIPE
        try:
            self.proc.wait(GRACE_SECONDS)
        except subprocess.TimeoutExpired:  # stalled: its status would say nothing
            self.kill()
            self.proc.wait()
            return
        self.kill()  # what it left running in its group
        self.wait_for_child()  # a non-zero exit of its own raises, as webdataset's does


def kill_all() -> None:
    """Kill every command still running (at exit)."""
    for pipe in list(_LIVE):
        pipe.kill()


atexit.register(kill_all)


def open_url(url: str):
    """A shard's byte stream: ``pipe:CMD`` as a :class:`GroupPipe`, http(s) as one running
    webdataset's own curl command (where webdataset would use curl: a stalled download is the
    same hang), anything else by webdataset's ``gopen`` (local files, ...)."""
    url = rewrite_url(url)  # GOPEN_REWRITE, as gopen applies it
    if url.startswith("pipe:"):
        return GroupPipe(url[5:])
    scheme = url.split(":", 1)[0]
    if scheme in ("http", "https") and gopen_schemes.get(scheme) is gopen_curl:
        return GroupPipe(shlex.join(["curl", "--connect-timeout", "30", "--retry", "30", "--retry-delay",
                                     "2", "-f", "-s", "-L", url]), ignore_status=(141, 23))
    return gopen(url)


def tar_samples(url: str, handler=reraise_exception):
    """webdataset's ``tarfile_samples`` for one shard, opened with :func:`open_url`, the stream
    closed when the samples end, fail or are abandoned. Errors go to ``handler`` as there (an
    error closing a fully read stream too: the command's non-zero exit)."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    try:
        stream = open_url(url)
    except Exception as e:
        e.args = e.args + (url,)
        if handler(e):
            return
        raise
    finished = False
    try:
        yield from group_by_keys(tar_file_expander([{"url": url, "stream": stream}], handler=handler),
                                 handler=handler)
        finished = True
    finally:
        try:
            stream.close()
        except Exception as e:
            if finished and not handler(e):
                raise
