"""What ``measure-transference`` prints and plots: matrix tables, a plain-language summary, heatmaps."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from cogradctl.cli.output import stdout
from cogradctl.errors import UsageError


def print_measurement(result: dict) -> None:
    tasks, alpha = result["tasks"], result["lookahead_lr"]
    how = f"{result['lookahead']} lookahead, α={alpha:g}, {batches_text(result)}"
    how += ", holdout" if result["holdout"] else ""
    key = "transference_rel_normalized" if "transference_rel_normalized" in result else "transference_rel"
    title = "relative transference Z_rel" + (" ÷ own progress (row diagonal)" if key != "transference_rel" else "")
    rel = f"{title} (row → column, {how})"

    def show(title: str, values, errors, diverging: bool = True, **kwargs) -> None:
        stdout.print(_matrix_table(title, tasks, values, errors, diverging=diverging, **kwargs))

    if "baseline" in result:
        base = result["baseline"]
        show(f"before: {rel}", base[key], base["stderr"][key])
    show(("after: " if "baseline" in result else "") + rel, result[key], result["stderr"][key])
    if "delta" in result:
        d = result["delta"]
        show(
            "change of Z_rel (after − before; ▲ improved / ▼ worsened beyond its standard error)",
            d["transference_rel"],
            d["stderr"]["transference_rel"],
            marks=d["verdict"],
        )
    show("gradient cosine", result["cosine"], result["stderr"]["cosine"])
    show("conflict rate (share of batches with cosine < 0)", result["conflict_rate"], None, diverging=False)
    show("gradient magnitude similarity", result["gms"], None, diverging=False)
    for name, m in result.get("modules", {}).items():
        show(
            f"module {name} ({m['size']} parameters): Z_rel of a lookahead that moves only this module",
            m["transference_rel"],
            m["stderr"]["transference_rel"],
        )
        show(f"module {name}: gradient cosine (conflict rate in brackets)", m["cosine"], None, extra=m["conflict_rate"])
    stdout.print(transference_summary(result))
    if untrained_note(result):
        stdout.print(f"note: {untrained_note(result)}")


def batches_text(result: dict) -> str:
    """ "4 batches", or "4 of 8 requested batches" when the data held fewer."""
    requested = result.get("batches_requested", result["batches"])
    if requested > result["batches"]:
        return f"{result['batches']} of {requested} requested batches"
    return f"{result['batches']} batches"


def capped_note(result: dict) -> str | None:
    """Why fewer batches than requested were measured, or None."""
    requested = result.get("batches_requested", result["batches"])
    if requested <= result["batches"]:
        return None
    extra = " (one more is needed for --holdout's evaluation batches)" if result.get("holdout") else ""
    return (
        f"measured {result['batches']} of the {requested} requested batches: the data holds only "
        f"{result['batches'] + (1 if result.get('holdout') else 0)} non-overlapping batches of "
        f"{result['batch_size']} rows{extra}; lower --batch-size or give more data for more"
    )


def untrained_note(result: dict) -> str | None:
    """The optimizer lookahead's entries that training never updated (v = 0) but the measured data
    moved, or None."""
    state = result.get("lookahead_state") or {}
    if not state.get("untrained_entries_moved"):
        return None
    return (
        f"optimizer lookahead: {state['untrained_entries_moved']} shared entries that training never updated "
        f"(second moment v = 0; {state['untrained_entries']} of {state['shared_entries']} in all) got a gradient "
        "on the measured data, e.g. embedding rows of values unseen in training; their step is Adam's next step "
        "with the gradient folded into v, at most α/sqrt(1−β2) per entry (docs/transference.md)"
    )


def _diverging_style(v: float | None, scale: float) -> str:
    """Positive blue, negative red, intensity by |v| / scale (the table's largest off-diagonal |v|)."""
    if v is None or v == 0 or scale <= 0:
        return ""
    t = min(abs(v) / scale, 1.0)
    grey = 150
    if v > 0:
        r, g, b = (round(grey * (1 - t) + c * t) for c in (40, 120, 255))
    else:
        r, g, b = (round(grey * (1 - t) + c * t) for c in (255, 50, 50))
    return f"{'bold ' if t > 0.5 else ''}rgb({r},{g},{b})"


def _matrix_table(title: str, tasks: list[str], values, errors, diverging: bool, marks=None, extra=None) -> Table:
    table = Table(title=title)
    table.add_column("source ↓ / target →")
    for t in tasks:
        table.add_column(t, justify="right")
    k = len(tasks)
    off = [abs(values[i][j]) for i in range(k) for j in range(k) if i != j and values[i][j] is not None]
    scale = max(off, default=0.0)
    # Small effects (|v| < 0.01 everywhere) in scientific notation, so they do not print as +0.0000.
    small = diverging and 0 < max((abs(v) for row in values for v in row if v is not None), default=0.0) < 0.01
    for i, src in enumerate(tasks):
        cells = []
        for j in range(k):
            v = values[i][j]
            if v is None:
                cells.append("n/a")
                continue
            text = (f"{v:+.2e}" if small else f"{v:+.4f}") if diverging else f"{v:.2f}"
            if errors is not None and errors[i][j] is not None:
                text += f" ±{errors[i][j]:.1e}" if small else f" ±{errors[i][j]:.4f}"
            if extra is not None:
                text += f" ({extra[i][j]:.2f})"
            if marks is not None and i != j:
                text += {"improved": " ▲", "worsened": " ▼"}.get(marks[i][j], "  ")
            style = "dim" if i == j else (_diverging_style(v, scale) if diverging else "")
            cells.append(f"[{style}]{text}[/]" if style else text)
        table.add_row(src, *cells)
    return table


def _strength(v: float, e: float, own: float | None) -> str:
    if abs(v) <= 2 * e:
        return "no clear effect"
    strong = "strong " if own and abs(v) >= 0.5 * abs(own) else ("weak " if own and abs(v) < 0.1 * abs(own) else "")
    return f"{strong}{'positive' if v > 0 else 'negative'}"


def transference_summary(result: dict) -> str:
    """One plain-language paragraph: every ordered pair, strongest effect first, with its change
    after fine-tuning when a baseline was measured, then the most conflicting pair."""
    tasks, z, err = result["tasks"], result["transference_rel"], result["stderr"]["transference_rel"]
    k = len(tasks)
    pairs = [(i, j) for i in range(k) for j in range(k) if i != j and z[i][j] is not None]
    delta = result.get("delta")
    parts = []
    for i, j in sorted(pairs, key=lambda p: -abs(z[p[0]][p[1]])):
        text = f"{tasks[i]} → {tasks[j]}: {_strength(z[i][j], err[i][j], z[i][i])}"
        if delta is not None:
            verdict, d = delta["verdict"][i][j], delta["transference_rel"][i][j]
            if verdict != "unchanged":
                text += f", {verdict} by {abs(d):.3g} after fine-tuning"
        parts.append(text)
    if not parts:
        return "transference summary: only one task, nothing to compare."
    head = (
        "transference summary: a step on the first task of each pair changes the second task's loss "
        "(relative transference Z_rel, 'strong' when at least half of the source's own progress, "
        "'no clear effect' within two standard errors): "
    )
    text = head + "; ".join(parts) + "."
    conflict = result["conflict_rate"]
    worst = max(((conflict[i][j], i, j) for i in range(k) for j in range(i + 1, k)), default=None)
    if worst is not None and worst[0] > 0:
        text += (
            f" Gradients conflict most between {tasks[worst[1]]} and {tasks[worst[2]]} "
            f"({worst[0]:.0%} of batches have a negative cosine)."
        )
    elif worst is not None:
        text += " No pair's gradients conflicted on any measured batch."
    return text


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError('--plot needs matplotlib: pip install "cogradctl[plot]"') from None


def plot_heatmaps(result: dict, path: Path) -> None:
    """Heatmaps of Z_rel and cosine (before | after | change when a baseline was measured), diverging
    colour map centred on zero, written atomically."""
    import io as _io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from cogradctl.checkpoint import atomic_write_bytes

    tasks = result["tasks"]
    rows = [("Z_rel", "transference_rel"), ("cosine", "cosine")]
    columns = [("after" if "baseline" in result else "", result)]
    if "baseline" in result:
        columns = [("before", result["baseline"]), ("after", result), ("change", result["delta"])]
    k = len(tasks)
    size = (1.2 + 1.0 * k * len(columns) + 1.5 * len(columns), 0.9 * k * len(rows) + 1.5 * len(rows))
    fig, axes = plt.subplots(len(rows), len(columns), figsize=size, squeeze=False)
    for r, (label, key) in enumerate(rows):
        mats = [
            np.array([[np.nan if v is None else v for v in row] for row in src[key]], dtype=float) for _, src in columns
        ]
        for c, ((name, _), m) in enumerate(zip(columns, mats)):
            ax = axes[r][c]
            off = np.abs(m[~np.eye(k, dtype=bool)]) if k > 1 else np.abs(m)
            lim = float(np.nanmax(off)) if off.size and np.isfinite(off).any() and np.nanmax(off) > 0 else 1.0
            im = ax.imshow(m, cmap="RdBu", vmin=-lim, vmax=lim)
            ax.set_xticks(range(k), tasks, rotation=45, ha="right")
            ax.set_yticks(range(k), tasks)
            ax.set_xlabel("target")
            ax.set_ylabel("source")
            ax.set_title(f"{name} {label}".strip())
            for i in range(k):
                for j in range(k):
                    if np.isfinite(m[i, j]):
                        color = "black" if i != j else "grey"
                        ax.text(j, i, f"{m[i, j]:+.3g}", ha="center", va="center", fontsize=8, color=color)
            fig.colorbar(im, ax=ax, shrink=0.8)
    fig.tight_layout()
    buffer = _io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(Path(path), buffer.getvalue())
