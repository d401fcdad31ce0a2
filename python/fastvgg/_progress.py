"""A small progress bar for downloads and ``predict(verbose=1)``.

tqdm draws it when installed (``pip install "fastvgg[progress]"``); otherwise a plain text
line goes to stderr, so fastvgg needs no dependency for it.

    with progress_bar(total=n_batches, unit="batch", desc="predict") as bar:
        for ...:
            bar.update(1)
"""

from __future__ import annotations

import sys
import time
from typing import IO, Optional

# A redrawn line (terminal) is refreshed at most this often, so a fast loop spends its time
# working rather than printing.
_REDRAW_SECONDS = 0.1
# Where stderr is a log file rather than a terminal, "\r" redraws would pile up into one
# huge line, so a new line is written only at every this-many percent.
_LOG_PERCENT_STEP = 10
# With no known total, a log line every this-many seconds.
_LOG_SECONDS_NO_TOTAL = 5.0


def _format_amount(amount: float, unit: str) -> str:
    if unit == "B":
        for scaled_unit, size in (("GB", 1 << 30), ("MB", 1 << 20), ("kB", 1 << 10)):
            if amount >= size:
                return f"{amount / size:.1f} {scaled_unit}"
        return f"{int(amount)} B"
    return f"{int(amount)} {unit}"


class PlainProgressBar:
    """The fallback when tqdm is missing: ``desc: 42% 221.8 MB/528.0 MB`` on stderr."""

    def __init__(self, total: Optional[int], unit: str = "it", desc: str = "", stream: Optional[IO[str]] = None):
        self.total = total if total and total > 0 else None
        self.unit = unit
        self.desc = desc
        self.n = 0
        self._stream = stream if stream is not None else sys.stderr
        self._redraw = bool(getattr(self._stream, "isatty", lambda: False)())
        self._last_time = 0.0
        self._last_step = -1
        self._started = time.monotonic()
        self._closed = False
        self._write(force=True)

    def _line(self) -> str:
        prefix = f"{self.desc}: " if self.desc else ""
        if self.total is None:
            return f"{prefix}{_format_amount(self.n, self.unit)}"
        percent = min(100, 100 * self.n // self.total)
        if self.unit == "B":
            amounts = f"{_format_amount(self.n, 'B')}/{_format_amount(self.total, 'B')}"
        else:
            amounts = f"{self.n}/{self.total} {self.unit}"
        return f"{prefix}{percent:3d}% {amounts}"

    def _write(self, force: bool = False) -> None:
        now = time.monotonic()
        if self._redraw:
            if force or now - self._last_time >= _REDRAW_SECONDS:
                self._stream.write("\r" + self._line())
                self._stream.flush()
                self._last_time = now
            return
        if self.total is not None:
            step = min(100, 100 * self.n // self.total) // _LOG_PERCENT_STEP
            due = step != self._last_step
        else:
            step = self._last_step
            due = now - self._last_time >= _LOG_SECONDS_NO_TOTAL
        if force or due:
            self._stream.write(self._line() + "\n")
            self._stream.flush()
            self._last_time, self._last_step = now, step

    def update(self, n: int = 1) -> None:
        self.n += n
        self._write()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._redraw:
            self._stream.write("\r" + self._line() + "\n")
        elif self.total is None or self._last_step != min(100, 100 * self.n // self.total) // _LOG_PERCENT_STEP:
            self._stream.write(self._line() + "\n")
        self._stream.flush()

    def __enter__(self) -> "PlainProgressBar":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class _NoProgressBar:
    """What a disabled bar is: the same methods, doing nothing."""

    n = 0

    def update(self, n: int = 1) -> None:
        self.n += n

    def close(self) -> None:
        pass

    def __enter__(self) -> "_NoProgressBar":
        return self

    def __exit__(self, *exc_info) -> None:
        pass


def progress_bar(total: Optional[int], unit: str = "it", desc: str = "", enabled: bool = True):
    """A progress bar on stderr with ``update(n)``, ``close()`` and context-manager use.

    total: the expected count (``None`` or 0 when unknown); unit: ``"B"`` shows bytes as
    kB/MB/GB; enabled=False gives an object with the same methods that prints nothing.
    """
    if not enabled:
        return _NoProgressBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return PlainProgressBar(total, unit=unit, desc=desc)
    in_bytes = unit == "B"
    return tqdm(
        total=total or None,
        unit=unit,
        desc=desc or None,
        unit_scale=in_bytes,
        unit_divisor=1024 if in_bytes else 1000,
        file=sys.stderr,
        leave=True,
        dynamic_ncols=True,
    )
