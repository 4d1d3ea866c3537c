"""Plots of PPO training for the lessons (04, 05, 08): the curves to read after, or while, a run trains.

    from lessons_lib.plots import plot_stats, LivePlot, compare_runs
    history = [trainer.step(...) for ...]          # a list of step() stats dicts
    plot_stats(history)                            # reward, KL, entropy, clipfrac, value loss, beta over steps
    live = LivePlot(every=5)                       # in a notebook: one figure, redrawn in place while training
    live.update(stats)
    compare_runs({"fixed KL": h1, "adaptive KL": h2}, "objective/kl")

Figures are built with matplotlib's object API (no global pyplot state), so they show once and can be saved.
"""

from __future__ import annotations

# (panel title, stats keys drawn in it)
PANELS = [
    ("reward", ("objective/scores", "objective/rlhf_reward")),
    ("KL to the reference (nats / response)", ("objective/kl",)),
    ("entropy (nats / token)", ("objective/entropy_per_token",)),
    ("policy clip fraction", ("ppo/policy/clipfrac",)),
    ("value loss", ("ppo/loss/value",)),
    ("KL coefficient beta", ("objective/kl_coef",)),
]


def _notebook_display() -> None:
    """In IPython, show matplotlib Figures returned by a cell as PNG (what `%matplotlib inline` does for pyplot
    figures; ours are built without pyplot). Registered once, on the first plot."""
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    if shell is None:
        return
    from IPython.core.pylabtools import print_figure
    from matplotlib.figure import Figure

    shell.display_formatter.formatters["image/png"].for_type(Figure, lambda fig: print_figure(fig, "png"))


def _smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average over `window` points (window 1: unchanged)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _series(history: list[dict], key: str) -> tuple[list[int], list[float]]:
    steps = [i + 1 for i, s in enumerate(history) if key in s]
    return steps, [float(s[key]) for s in history if key in s]


def plot_stats(history: list[dict], panels=PANELS, smooth: int = 1, fig=None, title: str | None = None):
    """One small panel per quantity over PPO steps; returns the matplotlib Figure."""
    from matplotlib.figure import Figure

    if not history:
        raise ValueError("plot_stats: the history is empty; pass the list of stats dicts returned by step()")
    _notebook_display()
    cols = 3
    rows = -(-len(panels) // cols)
    fig = fig or Figure(figsize=(4 * cols, 2.6 * rows), layout="constrained")
    fig.clear()
    axes = fig.subplots(rows, cols, squeeze=False).flatten()
    for ax, (name, keys) in zip(axes, panels):
        for key in keys:
            steps, values = _series(history, key)
            if values:
                ax.plot(steps, _smooth(values, smooth), label=key.split("/")[-1])
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("PPO step", fontsize=8)
        ax.tick_params(labelsize=8)
        if len(keys) > 1:
            ax.legend(fontsize=7)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    return fig


def compare_runs(runs: dict[str, list[dict]], key: str, smooth: int = 1, ax=None, title: str | None = None):
    """One stat from several runs on one axis (lesson 08's experiments); returns the Figure."""
    from matplotlib.figure import Figure

    _notebook_display()
    fig = None
    if ax is None:
        fig = Figure(figsize=(5.5, 3.2), layout="constrained")
        ax = fig.subplots()
    for name, history in runs.items():
        steps, values = _series(history, key)
        ax.plot(steps, _smooth(values, smooth), label=name)
    ax.set_xlabel("PPO step")
    ax.set_ylabel(key)
    ax.set_title(title or key)
    ax.legend(fontsize=8)
    return fig if fig is not None else ax.figure


class LivePlot:
    """A `plot_stats` figure that redraws in place every `every` updates (in Jupyter; elsewhere it only records)."""

    def __init__(self, every: int = 5, panels=PANELS, smooth: int = 1, title: str | None = None):
        from matplotlib.figure import Figure

        self.every, self.panels, self.smooth, self.title = every, panels, smooth, title
        self.history: list[dict] = []
        self.figure = Figure(figsize=(12, 5.2), layout="constrained")
        self._handle = None

    def update(self, stats: dict) -> None:
        self.history.append(dict(stats))
        if len(self.history) % self.every == 0:
            self.draw()

    def draw(self):
        plot_stats(self.history, self.panels, self.smooth, fig=self.figure, title=self.title)
        try:
            from IPython import get_ipython
            from IPython.display import display
        except ImportError:
            return self.figure
        if get_ipython() is None:
            return self.figure
        if self._handle is None:
            self._handle = display(self.figure, display_id=True)
        else:
            self._handle.update(self.figure)
        return self.figure
