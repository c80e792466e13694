"""PlotextChart: a line chart rendered by plotext into a string, sized to the widget.

textual-plotext is not a dependency: plotext's `figure.build()` gives an ANSI string that
`Text.from_ansi` turns into a renderable. plotext keeps global state, so charts are only built on
the UI thread (inside `render`).
"""

from __future__ import annotations

from collections.abc import Sequence

import plotext as plt
from rich.text import Text
from textual.widget import Widget

Series = tuple[str, Sequence[float], Sequence[float], str]  # (label, xs, ys, colour)
YLim = tuple[float, float | None]  # (low, high); high None: fit the data


def build_chart(series: Sequence[Series], width: int, height: int, ylim: YLim | None = None) -> str:
    plt.terminal.limit(False, False)  # size from the widget, never from $COLUMNS / the tty
    fig = plt.figure
    fig.clear()
    fig.plot_size(width, height)
    fig.theme("simple")
    for _label, xs, ys, color in series:
        if len(xs) >= 1:
            marker = plt.marker("braille", plt.pixel(foreground=color))
            sig = fig.signal(list(xs), list(ys), marker=marker)
            sig.lines()
            fig.draw(sig)
    if ylim is not None:
        low, high = ylim
        if high is None:  # open top: fit the data, with headroom
            high = max((max(ys) for _l, _x, ys, _c in series if len(ys)), default=1.0) * 1.2
        fig.ruler("y").lim(low, high or 1.0)
    return fig.build().string()


class PlotextChart(Widget):
    def __init__(self, title: str, *, ylim: YLim | None = None, id: str | None = None) -> None:
        super().__init__(id=id, classes="chart")
        self.title = title
        self.ylim = ylim
        self.series: tuple[Series, ...] = ()

    def on_mount(self) -> None:
        self.border_title = self.title

    def plot(self, series: Sequence[Series]) -> None:
        legend = "  ".join(f"[{color}]━ {label}[/]" for label, _x, _y, color in series)
        self.border_subtitle = legend
        self.series = tuple((lbl, tuple(x), tuple(y), c) for lbl, x, y, c in series)
        self.refresh()

    def render(self) -> Text:
        width, height = self.content_size
        if not any(len(xs) >= 2 for _l, xs, _y, _c in self.series):
            return Text("waiting for data…", "dim")
        if width < 20 or height < 5:
            return Text("(too small to plot)", "dim")
        return Text.from_ansi(build_chart(self.series, width, height, self.ylim))
