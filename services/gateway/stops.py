"""Stop sequences over streamed text (pure): the text before the first stop string is emitted, and
only the text that cannot be the start of a stop string is emitted early."""

from __future__ import annotations


class StopMatcher:
    """``push(piece) -> (text to emit now, stopped)``; ``flush()`` returns what was held back."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self._pending = ""
        self.stopped = False

    def push(self, piece: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        self._pending += piece
        if not self.stops:
            out, self._pending = self._pending, ""
            return out, False
        hits = [i for i in (self._pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            out, self._pending = self._pending[: min(hits)], ""
            return out, True
        # keep back the longest tail that is a prefix of a stop string (at most hold characters)
        keep = 0
        for n in range(min(self.hold, len(self._pending)), 0, -1):
            tail = self._pending[-n:]
            if any(s.startswith(tail) for s in self.stops):
                keep = n
                break
        cut = len(self._pending) - keep
        out, self._pending = self._pending[:cut], self._pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self._pending = ("" if self.stopped else self._pending), ""
        return out
