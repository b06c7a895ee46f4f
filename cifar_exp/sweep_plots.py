"""The sweep's plots, drawn with matplotlib: each child's metric against what the sweep varies (a
heatmap over a two-key grid), each config's mean over its seeds with its interval, and a search's
history. matplotlib is imported as a plot is drawn (importing it costs ~0.3 s), so a single run,
whose figures reports.py draws with Pillow, never loads it. Pure functions of lists; a figure
comes back as PNG bytes (figure_png) for the caller to record."""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from cifar_exp import tables


def _pyplot() -> Any:
    """matplotlib.pyplot, drawing to files only (no display needed); imported by the sweep plots
    alone, as they are drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def close(fig: Any) -> None:
    """Frees a matplotlib figure (sweep_figure's); Pillow images need nothing."""
    _pyplot().close(fig)


def figure_png(fig: Any) -> bytes:
    """A matplotlib figure as PNG bytes; the figure is closed."""
    out = io.BytesIO()
    fig.savefig(out, format="png")
    close(fig)
    return out.getvalue()


def _axis(values: list[Any]) -> tuple[list[float], list[str] | None, bool]:
    """Where each value goes on an axis: numbers at themselves (log scale when all positive and
    spanning more than 20x), anything else at 0, 1, 2... in first-seen order with its label."""
    numbers = [tables.number(v) for v in values]
    if all(n is not None for n in numbers):
        log = min(numbers) > 0 and max(numbers) > 20 * min(numbers)
        return numbers, None, log
    labels = list(dict.fromkeys(str(v) for v in values))
    return [float(labels.index(str(v))) for v in values], labels, False


def _rank(value: str) -> tuple[bool, float, str]:
    """Values in axis order: numbers by size, then words by name."""
    return tables.number(value) is None, tables.number(value) or 0.0, value


def sweep_figure(
    rows: list[dict[str, Any]], keys: list[str], names: dict[str, str] | None = None, metric: str = "test/acc"
) -> Any:
    """`metric` of the children against what the sweep varies: a heatmap when exactly two keys
    vary over a grid, else one panel per key (every child a dot, the mean per value a line, the
    best a star). Sized to be read in MLflow's artifact preview: panels of about 480x360 px, at
    most two a row."""
    plt = _pyplot()
    names = names or {k: k for k in keys}
    done = [r for r in rows if tables.number(r.get(metric)) is not None]
    best = next((r for r in done if r.get("best")), None)
    if len(keys) == 2 and all(len({str(r[k]) for r in done}) > 1 for k in keys):
        return _heatmap(plt, done, keys, names, metric, best)
    columns = min(2, max(1, len(keys)))
    rows_n = (max(1, len(keys)) + columns - 1) // columns
    fig, axes = plt.subplots(rows_n, columns, figsize=(4.8 * columns, 3.6 * rows_n), dpi=100, squeeze=False)
    for ax in axes.flat[len(keys) :]:
        ax.set_visible(False)
    for ax, key in zip(axes.flat, keys, strict=False):
        xs, labels, log = _axis([r[key] for r in done])
        ys = [float(r[metric]) for r in done]
        ax.plot(xs, ys, "o", color="tab:blue", alpha=0.6)
        means: dict[float, list[float]] = {}
        for x, y in zip(xs, ys, strict=True):
            means.setdefault(x, []).append(y)
        if len(means) < len(xs) or len(means) <= 12:  # a grid: join the means; a search: dots only
            line = sorted((x, sum(v) / len(v)) for x, v in means.items())
            ax.plot(*zip(*line, strict=True), "-", color="tab:blue", alpha=0.8, label="mean")
        if best is not None:
            ax.plot(xs[done.index(best)], float(best[metric]), "*", color="tab:red", ms=14, label="best")
            ax.legend(loc="best", fontsize=9)
        if labels is not None:
            ax.set_xticks(range(len(labels)), labels, rotation=20 if len(labels) > 4 else 0)
        elif log:
            ax.set_xscale("log")
        elif len(set(xs)) <= 12:
            ax.set_xticks(sorted(set(xs)))
        ax.set_xlabel(names[key], fontsize=11)
        ax.set_ylabel(metric, fontsize=11)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _heatmap(
    plt: Any, rows: list[dict[str, Any]], keys: list[str], names: dict[str, str], metric: str, best: Any
) -> Any:
    """`metric` over a two-key grid: one cell per pair of values (the mean if several runs), each
    written in its cell; the best boxed."""
    x_key, y_key = keys
    order = {k: sorted({str(r[k]) for r in rows}, key=_rank) for k in keys}
    grid = np.full((len(order[y_key]), len(order[x_key])), np.nan)
    cells: dict[tuple[int, int], list[float]] = {}
    for r in rows:
        cell = (order[y_key].index(str(r[y_key])), order[x_key].index(str(r[x_key])))
        cells.setdefault(cell, []).append(float(r[metric]))
    for (i, j), values in cells.items():
        grid[i, j] = sum(values) / len(values)
    width = min(9.6, 2.4 + 1.1 * len(order[x_key]))
    fig, ax = plt.subplots(figsize=(width, min(7.2, 1.6 + 0.8 * len(order[y_key]))), dpi=100)
    image = ax.imshow(grid, cmap="viridis", aspect="auto", origin="lower")
    fig.colorbar(image, ax=ax, label=metric)
    finite = grid[np.isfinite(grid)]
    middle = (finite.min() + finite.max()) / 2 if finite.size else 0
    for (i, j), _ in cells.items():
        colour = "black" if grid[i, j] > middle else "white"
        ax.text(j, i, f"{grid[i, j]:.4f}", ha="center", va="center", color=colour, fontsize=10)
    if best is not None:
        i, j = order[y_key].index(str(best[y_key])), order[x_key].index(str(best[x_key]))
        ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2.5))
    ax.set_xticks(range(len(order[x_key])), order[x_key])
    ax.set_yticks(range(len(order[y_key])), order[y_key])
    ax.set_xlabel(names[x_key], fontsize=11)
    ax.set_ylabel(names[y_key], fontsize=11)
    ax.set_title(f"{metric} (best boxed)", fontsize=11)
    fig.tight_layout()
    return fig


def group_figure(groups: list[dict[str, Any]], keys: list[str], names: dict[str, str], metric: str) -> Any:
    """Each config's mean `metric` over its seeds with its 95% confidence interval as error bars,
    and its mean test/acc beside it (never used to choose); the best config starred. Configs in
    the order of their values, labelled by them."""
    plt = _pyplot()
    shown = sorted((g for g in groups if g["n"]), key=lambda g: [_rank(str(g[k])) for k in keys])
    labels = [",".join(str(g[k]) for k in keys) or "config" for g in shown]
    fig, ax = plt.subplots(figsize=(min(9.6, 3.2 + 0.9 * len(shown)), 3.8), dpi=100)
    xs = np.arange(len(shown))
    measured = list(dict.fromkeys([metric, "test/acc"]))
    for name, offset, colour in zip(measured, (-0.1, 0.1), ("tab:blue", "tab:orange"), strict=False):
        means = [g[f"{name}_mean"] for g in shown]
        lows, highs = [g[f"{name}_ci_low"] for g in shown], [g[f"{name}_ci_high"] for g in shown]
        below = [m - low if low != "" else 0 for m, low in zip(means, lows, strict=True)]
        above = [high - m if high != "" else 0 for m, high in zip(means, highs, strict=True)]
        errors = [below, above]  # the interval's ends as distances from the mean; none without one
        label = f"{name} (mean, 95% CI)" + (", chooses" if name == metric else ", reported")
        ax.errorbar(xs + offset, means, yerr=errors, fmt="o", capsize=4, color=colour, label=label)
    best = next((i for i, g in enumerate(shown) if g["best"]), None)
    if best is not None:
        ax.plot(xs[best] - 0.1, shown[best][f"{metric}_mean"], "*", color="tab:red", ms=14, label="best")
    ax.set_xticks(xs, labels, rotation=20 if len(labels) > 4 else 0)
    ax.set_xlabel(", ".join(names[k] for k in keys))
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    return fig


def search_history_figure(
    values: list[float | None],
    metric: str = "test/acc",
    pruned: list[bool] | None = None,
    maximize: bool = True,
) -> Any:
    """A search's `metric` per trial in the order the trials ran, with the best so far (of the
    finished trials) as a step line; a pruned trial is drawn at its last reported value as a grey
    mark, None (a failed trial) as a red cross on the x axis."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    pruned = pruned or [False] * len(values)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    trials = list(zip(range(1, len(values) + 1), values, pruned, strict=True))
    done = [(t, v) for t, v, p in trials if v is not None and not p]
    if done:
        xs, ys = zip(*done, strict=True)
        ax.plot(xs, ys, "o", label="finished")
        best = np.maximum.accumulate(ys) if maximize else np.minimum.accumulate(ys)
        ax.step(xs, best, where="post", label="best so far")
    stopped = [(t, v) for t, v, p in trials if v is not None and p]
    if stopped:
        xs, ys = zip(*stopped, strict=True)
        ax.plot(xs, ys, "v", color="grey", alpha=0.7, label="pruned (last value)")
    failed = [t for t, v, _ in trials if v is None]
    if failed:
        ax.plot(failed, [ax.get_ylim()[0]] * len(failed), "x", color="red", label="failed", clip_on=False)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # trial numbers only
    ax.set_xlabel("trial")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    if values:
        ax.legend(loc="best")
    fig.tight_layout()
    return fig
