"""``measure-transference --plot``: heatmaps of Z_rel and the gradient cosine (baseline | checkpoint |
change when a baseline was measured).

Panels that show the same quantity share one colour scale, symmetric around 0 and set by the
largest off-diagonal |value| (the diagonal, a task's own progress or a cosine of 1, would wash the
scale out: it is drawn grey, off the scale). Every cell shows its mean and standard error, in black
or white by the cell's luminance; ▲/▼ mark values more than 2 standard errors above/below 0.
"""

from __future__ import annotations

from pathlib import Path

from cogradctl.cli.measure_view import how_text, number_format, significance_mark
from cogradctl.errors import UsageError

ROWS = [("Z_rel (relative transference)", "transference_rel"), ("gradient cosine", "cosine")]
DIAGONAL_GREY = (0.88, 0.88, 0.88, 1.0)


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError('--plot needs matplotlib: pip install -e ".[plot]" (or pip install matplotlib)') from None


def text_colour(rgba) -> str:
    """Black on light cells, white on dark ones (WCAG relative luminance of the cell's colour)."""

    def linear(c: float) -> float:
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (linear(c) for c in rgba[:3])
    return "black" if 0.2126 * r + 0.7152 * g + 0.0722 * b > 0.179 else "white"


def _matrix(values):
    import numpy as np

    return np.array([[np.nan if v is None else v for v in row] for row in values], dtype=float)


def _panels(result: dict) -> list[tuple[str, dict]]:
    if "baseline" in result:
        return [("baseline", result["baseline"]), ("checkpoint", result), ("change", result["delta"])]
    return [("", result)]


def _limit(mats, k: int) -> float:
    """The largest finite off-diagonal |value| of ``mats`` (1.0 when there is none)."""
    import numpy as np

    off = np.concatenate([np.abs(m[~np.eye(k, dtype=bool)]) for m in mats]) if k > 1 else np.array([])
    off = off[np.isfinite(off)]
    return float(off.max()) if off.size and off.max() > 0 else 1.0


def title_text(result: dict) -> str:
    who = f"checkpoint {_short(result.get('checkpoint', '?'))}"
    if "baseline" in result:
        who += f" vs baseline {_short(result['baseline'].get('checkpoint', '?'))}"
    return f"{who}\n{how_text(result)}"


def _short(path: str, limit: int = 60) -> str:
    return path if len(path) <= limit else "…" + path[-(limit - 1) :]


def plot_heatmaps(result: dict, path: Path) -> None:
    """Write the heatmaps to ``path`` (PNG, atomically)."""
    import io as _io

    import matplotlib.pyplot as plt

    from cogradctl.atomic_files import atomic_write_bytes

    fig = heatmap_figure(result)
    buffer = _io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(Path(path), buffer.getvalue())


def heatmap_figure(result: dict):
    """The matplotlib figure: one row per quantity (Z_rel, cosine), one column per panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks, panels = result["tasks"], _panels(result)
    k = len(tasks)
    size = (1.6 + (1.25 * k + 1.2) * len(panels), 1.2 + (0.75 * k + 1.4) * len(ROWS))
    fig, axes = plt.subplots(len(ROWS), len(panels), figsize=size, squeeze=False, layout="constrained")
    for r, (label, key) in enumerate(ROWS):
        values = [_matrix(src[key]) for _, src in panels]
        errors = [_matrix(src["stderr"][key]) for _, src in panels]
        same = [n for n, (name, _) in enumerate(panels) if name != "change"]
        scales = {n: _limit([values[m] for m in same], k) for n in same}
        if len(panels) > 1:
            scales[len(panels) - 1] = _limit([values[-1]], k)
        images = {}
        for c, (name, _) in enumerate(panels):
            blank = name == "change" or key == "cosine"  # a change of the diagonal, or a cosine of 1: nothing to see
            images[c] = _heatmap(axes[r][c], tasks, values[c], errors[c], scales[c], blank)
            axes[r][c].set_title(f"{name}: {label}" if name else label, fontsize=9)
        fig.colorbar(images[same[0]], ax=[axes[r][n] for n in same], shrink=0.85, label=label.split(" (")[0])
        if len(panels) > 1:
            fig.colorbar(images[len(panels) - 1], ax=axes[r][-1], shrink=0.85, label="change")
    fig.suptitle(title_text(result), fontsize=10)
    fig.supxlabel(
        "cell: mean ± standard error over the batches; ▲/▼: more than 2 standard errors above/below 0\n"
        "diagonal (a task's own progress, a cosine of 1): grey, off the colour scale",
        fontsize=7.5,
    )
    return fig


def _heatmap(ax, tasks, m, e, lim: float, blank_diagonal: bool):
    """One K×K panel on the symmetric scale [−lim, lim]; diagonal grey, its value shown unless
    ``blank_diagonal`` (a cosine of 1, a change of the diagonal: "—")."""
    import matplotlib.colors as mcolors
    import numpy as np

    k = len(tasks)
    cmap, norm = matplotlib_cmap(), mcolors.Normalize(vmin=-lim, vmax=lim)
    colours = cmap(norm(np.nan_to_num(m)))
    colours[np.eye(k, dtype=bool)] = DIAGONAL_GREY
    colours[~np.isfinite(m)] = DIAGONAL_GREY
    ax.imshow(colours)
    image = ax.imshow(np.full((k, k), np.nan), cmap=cmap, norm=norm)  # carries the scale for the colour bar
    ax.set_xticks(range(k), tasks, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(k), tasks, fontsize=8)
    ax.set_xlabel("target", fontsize=8)
    ax.set_ylabel("source", fontsize=8)
    off = ~np.eye(k, dtype=bool)
    fmt, fmt_e = number_format(np.where(off & np.isfinite(m), m, 0.0).tolist())
    for i in range(k):
        for j in range(k):
            if i == j and (blank_diagonal or not np.isfinite(m[i, j])):
                ax.text(j, i, "—", ha="center", va="center", fontsize=8, color="dimgrey")
                continue
            if not np.isfinite(m[i, j]):
                ax.text(j, i, "n/a", ha="center", va="center", fontsize=8, color="black")
                continue
            err = e[i, j] if np.isfinite(e[i, j]) else None
            mark = significance_mark(float(m[i, j]), err) if i != j else ""
            text = f"{fmt(m[i, j])}{(' ' + mark) if mark else ''}" + (f"\n{fmt_e(err)}" if err is not None else "")
            ax.text(j, i, text, ha="center", va="center", fontsize=7.5, color=text_colour(colours[i, j]))
    return image


def matplotlib_cmap():
    import matplotlib

    return matplotlib.colormaps["RdBu"]
