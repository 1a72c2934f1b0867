"""Progress of a running pipeline, for the person watching it.

Interactive use (a terminal or a notebook) gets one tqdm bar per stage: rows done (of
rows expected, where known), rows/s, batches in flight and queued, actors alive. Logs and
other non-interactive output get one summary line every ``progress_interval_s`` and one
at the end, rather than a bar redrawn many times a second. ``DataContext.enable_progress_bars
= False`` or ``DASKINFER_PROGRESS=0`` turns both off.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

from daskinfer.context import DataContext
from daskinfer.metrics import RunStats

ENV_VAR = "DASKINFER_PROGRESS"
_OFF = {"0", "off", "false", "no", "none"}


def _in_notebook() -> bool:
    shell = sys.modules.get("IPython")
    if shell is None:
        return False
    ip = shell.get_ipython()  # type: ignore[attr-defined]
    return ip is not None and "IPKernelApp" in getattr(ip, "config", {})


def resolve_mode(ctx: DataContext, stream: TextIO | None = None) -> str:
    """``"bars"``, ``"lines"`` or ``"off"``, from the environment, the context and the stream."""
    env = os.environ.get(ENV_VAR, "").strip().lower()
    if env in _OFF:
        return "off"
    if env in ("bars", "lines"):
        return env
    if not ctx.enable_progress_bars:
        return "off"
    stream = stream or sys.stderr
    interactive = _in_notebook() or bool(getattr(stream, "isatty", lambda: False)())
    return "bars" if interactive else "lines"


class ProgressReporter:
    """Draws the bars (or writes the summary lines) from the executor's loop thread."""

    def __init__(
        self, stats: RunStats, mode: str, interval_s: float, stream: TextIO | None = None
    ) -> None:
        self.stats = stats
        self.mode = mode
        self.interval_s = interval_s
        self.stream = stream or sys.stderr
        self._bars: dict[str, Any] = {}
        self._next_line = time.monotonic() + interval_s
        self._next_draw = 0.0
        self._lines_written = 0

    def update(self, live: Mapping[str, Mapping[str, Any]], *, final: bool = False) -> None:
        """Refresh from the run's figures; cheap to call often (it rate-limits itself)."""
        now = time.monotonic()
        if self.mode == "bars" and (final or now >= self._next_draw):
            self._next_draw = now + 0.2
            self._draw_bars(live)
        elif self.mode == "lines" and (now >= self._next_line or (final and self._lines_written)):
            # a run shorter than one interval stays quiet; a longer one also gets its end
            self._next_line = now + self.interval_s
            self._lines_written += 1
            print(self.summary_line(live), file=self.stream, flush=True)

    def summary_line(self, live: Mapping[str, Mapping[str, Any]]) -> str:
        wall = self.stats.elapsed_s()
        parts = []
        for op in self.stats.operators:
            state = live.get(op.name, {})
            text = f"{op.name} {op.rows_out} rows ({op.rows_per_s(wall):.0f}/s"
            if state.get("in_flight") or state.get("queued"):
                text += f", {state.get('in_flight', 0)} in flight, {state.get('queued', 0)} queued"
            if state.get("actors_alive"):
                text += f", {state['actors_alive']} actors"
            parts.append(text + ")")
        return f"daskinfer {self.stats.run_id} [{self.stats.state} {wall:.1f} s] " + "; ".join(
            parts
        )

    def _draw_bars(self, live: Mapping[str, Mapping[str, Any]]) -> None:
        from tqdm.auto import tqdm

        for position, op in enumerate(self.stats.operators):
            state = live.get(op.name, {})
            bar = self._bars.get(op.name)
            if bar is None:
                bar = self._bars[op.name] = tqdm(
                    desc=op.name,
                    total=state.get("rows_expected"),
                    unit=" rows",
                    position=position,
                    leave=True,
                    dynamic_ncols=True,
                    file=self.stream,
                )
            bar.update(op.rows_out - bar.n)
            postfix = {"in flight": state.get("in_flight", 0), "queued": state.get("queued", 0)}
            if state.get("actors_alive"):
                postfix["actors"] = state["actors_alive"]
            bar.set_postfix(postfix, refresh=True)

    def close(self, live: Mapping[str, Mapping[str, Any]]) -> None:
        """Draw the final state and release the bars."""
        if self.mode == "off":
            return
        self.update(live, final=True)
        for bar in self._bars.values():
            bar.close()
        self._bars.clear()
