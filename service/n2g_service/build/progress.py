"""Progress bars for a build: one tqdm bar per stage, fed with the runner's BuildEvents."""

from __future__ import annotations

import sys
from typing import Any

_UNITS = {"scan": "win", "fit": "neuron", "corpus": "step", "merge": "layer"}


class ProgressBars:
    """``progress=ProgressBars()`` for ``run_build``: a bar per stage (scan in windows, fit in
    neurons) with its rate and ETA; other events are printed as lines. Call :meth:`close` at the
    end (or use it as a context manager)."""

    def __init__(self, file: Any = None, disable: bool = False) -> None:
        self.file = file or sys.stderr
        self.disable = disable
        self.bars: dict[str, Any] = {}

    def __call__(self, ev) -> None:
        from tqdm import tqdm

        if ev.stage in ("scan", "fit"):
            bar = self.bars.get(ev.stage)
            if bar is None:
                for other in self.bars.values():
                    other.close()
                bar = self.bars[ev.stage] = tqdm(total=ev.total, initial=ev.done, desc=ev.stage,
                                                 unit=_UNITS[ev.stage], file=self.file, disable=self.disable,
                                                 dynamic_ncols=True)
            bar.total = ev.total
            bar.update(ev.done - bar.n)
            if ev.message:
                bar.set_postfix_str(ev.message[-40:], refresh=True)
        elif ev.stage != "done" and not self.disable:
            print(f"[{ev.stage}] {ev.message}", file=self.file)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self.bars.clear()

    def __enter__(self) -> "ProgressBars":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
