"""A small dependency-free progress bar for long runs (directions done, rate, running figures)."""

from __future__ import annotations

import sys
import time


class ProgressBar:
    """Prints ``label [#####.....] done/total  rate  key=value ...`` to stderr, at most a few times a second."""

    def __init__(self, total: int, label: str = "directions", enabled: bool = True, stream=None, width: int = 24):
        self.total, self.label, self.enabled, self.width = total, label, enabled, width
        self.stream = stream if stream is not None else sys.stderr
        self.done = 0
        self.start = time.perf_counter()
        self._last_draw = 0.0
        self._fields: dict[str, str] = {}
        self._interactive = getattr(self.stream, "isatty", lambda: False)()

    def update(self, n: int = 1, **fields) -> None:
        self.done += n
        self._fields.update({k: (f"{v:.4g}" if isinstance(v, float) else str(v)) for k, v in fields.items()})
        now = time.perf_counter()
        # Redraw at most 5 times a second on a terminal, every 10% in a log file.
        if self._interactive and now - self._last_draw < 0.2 and self.done < self.total:
            return
        if not self._interactive and self.done < self.total and (self.done * 10 // max(self.total, 1)) == (
            (self.done - n) * 10 // max(self.total, 1)
        ):
            return
        self._last_draw = now
        self._draw(final=self.done >= self.total)

    def _draw(self, final: bool) -> None:
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.start
        filled = int(self.width * self.done / max(self.total, 1))
        bar = "#" * filled + "." * (self.width - filled)
        rate = self.done / elapsed if elapsed > 0 else 0.0
        extra = "  ".join(f"{k}={v}" for k, v in self._fields.items())
        line = f"{self.label} [{bar}] {self.done}/{self.total}  {rate:.3g}/s  {elapsed:.1f}s  {extra}"
        end = "\n" if (final or not self._interactive) else ""
        self.stream.write(("\r" if self._interactive else "") + line + end)
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self._interactive and self.done < self.total:
            self.stream.write("\n")
