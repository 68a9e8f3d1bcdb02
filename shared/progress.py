"""Progress of the command line's long work (validating, profiling): a ``rich`` progress display at a
terminal, plain lines elsewhere (CI logs, pipes), always on standard error so that standard output
keeps only results (``--json``)."""

from __future__ import annotations

import time
from types import TracebackType

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn


def steps_line(done: int, total: int, text: str) -> str:
    """A plain progress line: ``[2/5] text``."""
    return f"[{done}/{total}] {text}" if total else text


class Steps:
    """Named tasks, each with a description and, when known, a count of steps. ``show(key, text)``
    sets a task's text (adding it the first time); ``advance(key)`` counts one step done. Off a
    terminal every change is one plain line (a repeated text is not printed again)."""

    def __init__(self, console: Console, *, live: bool | None = None):
        self.console = console
        self.live = console.is_terminal if live is None else live
        self._progress: Progress | None = None
        self._tasks: dict[str, TaskID] = {}
        self._state: dict[str, tuple[str, int, int]] = {}  # key -> (text, done, total)
        self.t0 = time.monotonic()

    def __enter__(self) -> "Steps":
        if self.live:
            self._progress = Progress(
                TextColumn("{task.fields[key]}", style="bold"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.description}"),
                TimeElapsedColumn(),
                console=self.console,
            )
            self._progress.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        if self._progress is not None:
            self._progress.stop()

    def show(self, key: str, text: str, *, total: int | None = None, done: int | None = None) -> None:
        old_text, old_done, old_total = self._state.get(key, ("", 0, 0))
        state = (text, old_done if done is None else done, old_total if total is None else total)
        if state == self._state.get(key):
            return
        self._state[key] = state
        if self._progress is not None:
            if key not in self._tasks:
                self._tasks[key] = self._progress.add_task(escape(text), key=key, total=state[2] or None)
            self._progress.update(
                self._tasks[key], description=escape(text), completed=state[1], total=state[2] or None
            )
            return
        if text != old_text or state[1] != old_done:
            elapsed = time.monotonic() - self.t0
            line = steps_line(state[1], state[2], text)
            self.console.print(f"{key}: {line} ({elapsed:.0f} s)", markup=False, highlight=False, soft_wrap=True)

    def advance(self, key: str, text: str | None = None) -> None:
        old_text, done, total = self._state.get(key, ("", 0, 0))
        self.show(key, old_text if text is None else text, done=done + 1, total=total)

    def log(self, line: str) -> None:
        """A line that stays (above a live display)."""
        self.console.print(line, markup=False, highlight=False, soft_wrap=True)
