"""Progress for long work, readable both on a terminal and in a batch job's log.

On a terminal a tqdm bar is the right display. In a batch job (SLURM, Kubernetes, ``docker
logs``) stderr is a file, and a bar's carriage-return redraws pile up in it: a long run's log
grows by megabytes of them and reads as one endless line. So when stderr is not a terminal the
same progress becomes a plain line every ``SELFSUP_PROGRESS_SECONDS`` (default 60) seconds —
position, rate, the caller's fields (loss, lr...), elapsed time and ETA — plus one at the end.

Either way, one line about a minute in estimates the whole run from the rate measured after the
first update (start-up, compilation and worker spin-up excluded), so a user learns early whether
the job fits its time limit, not only from a running ETA.

``SELFSUP_PROGRESS=auto|bar|lines|off`` overrides the choice (auto: bar on a terminal, lines
otherwise). Shared by ``selfsup-train``, ``selfsup-shards`` and ``selfsup-eval``.
"""

from __future__ import annotations

import datetime as dt
import os
import sys
import time

from selfsup_io.errors import UserError

MODES = ("auto", "bar", "lines", "off")


def progress_mode(stream=None) -> str:
    """``bar``, ``lines`` or ``off`` for ``stream`` (stderr by default), per SELFSUP_PROGRESS."""
    mode = os.environ.get("SELFSUP_PROGRESS", "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise UserError(f"SELFSUP_PROGRESS={mode!r}: use one of {', '.join(MODES)}")
    if mode != "auto":
        return mode
    stream = sys.stderr if stream is None else stream
    try:
        return "bar" if stream.isatty() else "lines"
    except (AttributeError, ValueError):  # closed or replaced streams
        return "lines"


def _seconds(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise UserError(f"{name}={raw!r} is not a number of seconds") from None
    if value <= 0:
        raise UserError(f"{name}={raw!r} must be positive")
    return value


def hms(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return str(dt.timedelta(seconds=seconds))


class Progress:
    """A tqdm bar on a terminal, periodic plain lines elsewhere (see the module docstring).

    ``total`` may be None (unknown length: no percentage, no ETA). ``unit`` names what is
    counted; ``rate_unit``/``rate_scale`` let a trainer count steps but report images per
    second. ``enabled=False`` (e.g. every rank but the main one) makes every call a no-op.
    """

    def __init__(self, total: int | None, desc: str, unit: str = "it", initial: int = 0,
                 enabled: bool = True, stream=None, rate_unit: str | None = None,
                 rate_scale: float = 1.0):
        self.stream = sys.stderr if stream is None else stream
        self.mode = progress_mode(self.stream) if enabled else "off"
        self.total, self.desc, self.unit = total, desc, unit
        self.rate_unit, self.rate_scale = rate_unit or f"{unit}/s", rate_scale
        self.n = self.start_n = initial
        self.fields: dict[str, str] = {}
        self.every = _seconds("SELFSUP_PROGRESS_SECONDS", 60.0)
        self.estimate_after = _seconds("SELFSUP_ESTIMATE_SECONDS", 60.0)
        self.t_start = time.monotonic()
        self.t_first: float | None = None  # time of the first update: the rate is measured from it
        self.n_first = initial
        self.last_line = self.t_start
        self.estimated = False
        self.bar = None
        if self.mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit,
                            dynamic_ncols=True, file=self.stream)

    # ---------------------------------------------------------------------------------------
    def set(self, **fields) -> None:
        """Fields shown with the progress (a bar's postfix, or part of each line)."""
        self.fields.update({k: str(v) for k, v in fields.items()})
        if self.bar is not None:
            self.bar.set_postfix(self.fields, refresh=False)

    def update(self, n: int = 1) -> None:
        if self.mode == "off":
            return
        now = time.monotonic()
        if self.t_first is None:
            self.t_first, self.n_first = now, self.n + n
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
        elif now - self.last_line >= self.every:
            self._emit(self._line(now))
            self.last_line = now
        if not self.estimated and now - self.t_start >= self.estimate_after:
            self._estimate(now)

    def write(self, message: str) -> None:
        """A message that does not break the bar."""
        if self.mode == "off":
            return
        if self.bar is not None:
            self.bar.write(message, file=self.stream)
        else:
            self._emit(message)

    def close(self, done: bool = True) -> None:
        """The final line ends ``| done``, or ``| stopped`` with ``done=False``: callers close
        with ``done=False`` on the way out of an error, so that no "done" precedes a failure. A
        second close does nothing (``bar.close()`` on success, ``bar.close(False)`` in a
        ``finally``)."""
        if self.mode == "off":
            return
        if self.bar is not None:
            self.bar.close()
        elif self.n > self.start_n:
            self._emit(self._line(time.monotonic(), final=True, done=done))
        self.mode = "off"

    # ---------------------------------------------------------------------------------------
    def _rate(self, now: float) -> float | None:
        """Units per second since the first update (None before a second update)."""
        if self.t_first is None or now <= self.t_first or self.n <= self.n_first:
            return None
        return (self.n - self.n_first) / (now - self.t_first)

    def _line(self, now: float, final: bool = False, done: bool = True) -> str:
        parts = [f"{self.n}/{self.total} {self.unit}" if self.total else f"{self.n} {self.unit}"]
        if self.total:
            parts[0] += f" ({100 * self.n / self.total:.1f}%)"
        rate = self._rate(now)
        if rate is not None:
            parts.append(f"{rate * self.rate_scale:.1f} {self.rate_unit}")
        parts += [f"{k} {v}" for k, v in self.fields.items()]
        parts.append(f"elapsed {hms(now - self.t_start)}")
        if not final and self.total and rate:
            parts.append(f"ETA {hms((self.total - self.n) / rate)}")
        return f"{self.desc}: " + " | ".join(parts) + ((" | done" if done else " | stopped") if final else "")

    def _estimate(self, now: float) -> None:
        rate = self._rate(now)
        if rate is None:
            return  # a single slow first update: try again at the next one
        self.estimated = True
        if not self.total:
            self.write(f"{self.desc}: estimate: {rate * self.rate_scale:.1f} {self.rate_unit} "
                       "after the start-up")
            return
        left = (self.total - self.n) / rate
        end = dt.datetime.now().astimezone() + dt.timedelta(seconds=left)
        self.write(f"{self.desc}: estimate after {hms(now - self.t_start)}: "
                   f"{rate * self.rate_scale:.1f} {self.rate_unit}, {self.total - self.n} {self.unit} "
                   f"left take about {hms(left)} (done around {end:%Y-%m-%d %H:%M %Z}); "
                   f"start-up took {hms(self.t_first - self.t_start)}")

    def _emit(self, line: str) -> None:
        print(line, file=self.stream, flush=True)
