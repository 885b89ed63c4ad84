"""What ``measure-transference`` prints: matrix and per-pair tables, a legend, a plain-language summary.

One significance rule everywhere (tables, summary, heatmaps): an effect or a change counts when it is
more than ``SIGNIFICANT_SE`` (2) standard errors from zero. Text lines stay within the terminal's width
(at most ``WIDTH`` columns, 80 when piped), wrapped between words, so a terminal never breaks a word.
"""

from __future__ import annotations

import textwrap

from rich.table import Table

from cogradctl.cli.output import stdout
from cogradctl.transference.summary import SIGNIFICANT_SE

WIDTH = 100
RISE, FALL = "▲", "▼"
# Symmetric per-pair quantities: (key, title, signed)
PAIR_QUANTITIES = [
    ("cosine", "gradient cosine", True),
    ("conflict_rate", "conflict rate (share of batches with cosine < 0)", False),
    ("gms", "GMS (gradient magnitude similarity)", False),
]


def print_measurement(result: dict) -> None:
    tasks = result["tasks"]
    base, delta = result.get("baseline"), result.get("delta")
    if base is not None:
        _lines(f"checkpoint: {result['checkpoint']}")
        _lines(f"baseline:   {base['checkpoint']} (measured on the same batches)")
    key = "transference_rel_normalized" if "transference_rel_normalized" in result else "transference_rel"
    title = "relative transference Z_rel" + (" ÷ own progress (row diagonal)" if key != "transference_rel" else "")
    rel = f"{title} (row → column, {how_text(result)})"
    if base is not None:
        _show(_matrix_table(f"baseline: {rel}", tasks, base[key], base["stderr"][key]))
    _show(_matrix_table(("checkpoint: " if base else "") + rel, tasks, result[key], result["stderr"][key]))
    if delta is not None:
        d = delta["transference_rel"]
        _show(
            _matrix_table(
                "change of Z_rel (checkpoint − baseline, ± paired standard error)",
                tasks,
                d,
                delta["stderr"]["transference_rel"],
                marks=True,
            )
        )
    if base is None:
        _show(_pairs_table(result))
    else:
        for quantity in PAIR_QUANTITIES:
            _show(_pairs_change_table(result, *quantity))
    for name, m in result.get("modules", {}).items():
        who = "checkpoint: " if base is not None else ""
        _show(
            _matrix_table(
                f"{who}module {name} ({m['size']} parameters): Z_rel of a lookahead that moves only this module",
                tasks,
                m["transference_rel"],
                m["stderr"]["transference_rel"],
            )
        )
        _show(_pairs_table(m, f"{who}module {name}: gradients per task pair", tasks))
    _lines(legend(result))
    _lines(transference_summary(result))
    if untrained_note(result):
        _lines(f"note: {untrained_note(result)}")


def _show(table: Table) -> None:
    """A table under its title, the title wrapped like any text line (rich would not wrap it)."""
    title, table.title = str(table.title), None
    _lines(title)
    stdout.print(table)


def _lines(text: str) -> None:
    """Print ``text`` wrapped between words at WIDTH columns (existing line breaks kept)."""
    for line in text.split("\n"):
        indent = line[: len(line) - len(line.lstrip())]
        width = max(min(stdout.width, WIDTH), 40)
        wrapped = textwrap.wrap(line, width, subsequent_indent=indent, break_long_words=False) or [""]
        stdout.print("\n".join(wrapped), markup=False)


def how_text(result: dict) -> str:
    """How the numbers were measured: "sgd lookahead, α=0.1, 4 batches of 1024 rows[, holdout]"."""
    text = f"{result['lookahead']} lookahead, α={result['lookahead_lr']:g}, {batches_text(result)}"
    text += f" of {result['batch_size']} rows" if "batch_size" in result else ""
    return text + (", holdout" if result.get("holdout") else "")


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


def legend(result: dict) -> str:
    n = result["batches"]
    text = f"± : standard error of the mean over the {n} batches"
    if "delta" in result:
        text += " (of the paired per-batch differences for a change)"
    if "batches_used" in result:
        fewest = min(min(row) for row in result["batches_used"]["transference"])
        text += (
            f"; a pair with a task not observed in some batches (a null label) over the batches where it was, "
            f"at least {fewest} (batches_used in --json)"
        )
    text += "; GMS: gradient magnitude similarity 2‖g_i‖‖g_j‖ / (‖g_i‖² + ‖g_j‖²)."
    if "delta" in result:
        text += f"\n{RISE} / {FALL} : the change is above / below 0 by more than {SIGNIFICANT_SE} standard errors"
        text += " (the summary's improved / worsened, and its 'no clear effect', use the same rule)."
    return text


# ---------------------------------------------------------------------------- numbers


def number_format(values, signed: bool = True):
    """→ (value formatter, error formatter) shared by every cell of one table: 4 decimals, or
    scientific notation when every |value| is below 0.01 (so small effects do not print as 0.0000)."""
    flat = [abs(v) for v in _flatten(values) if v is not None]
    small = 0 < max(flat, default=0.0) < 0.01
    sign = "+" if signed else ""
    if small:
        return (lambda v: f"{v:{sign}.2e}"), (lambda e: f"±{e:.1e}")
    return (lambda v: f"{v:{sign}.4f}"), (lambda e: f"±{e:.4f}")


def _flatten(values):
    for v in values:
        if isinstance(v, list | tuple):
            yield from _flatten(v)
        else:
            yield v


def significance_mark(value: float | None, error: float | None) -> str:
    """▲ / ▼ when ``value`` is more than SIGNIFICANT_SE standard errors above / below 0, else ""."""
    if value is None or error is None or abs(value) <= SIGNIFICANT_SE * error:
        return ""
    return RISE if value > 0 else FALL


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


def _cell(v, e, fmt, fmt_e, style: str = "", mark: bool = False) -> str:
    if v is None:
        return "n/a"
    text = fmt(v) + (f" {fmt_e(e)}" if e is not None else "")
    if mark:
        text += f" {significance_mark(v, e) or ' '}"
    return f"[{style}]{text}[/]" if style else text


# ---------------------------------------------------------------------------- tables


def _matrix_table(title: str, tasks: list[str], values, errors, marks: bool = False) -> Table:
    """K×K, rows sources, columns targets; ``marks``: ▲/▼ on off-diagonal cells beyond 2 SE."""
    table = Table(title=title)
    table.add_column("source ↓ / target →")
    for t in tasks:
        table.add_column(t, justify="right")
    k = len(tasks)
    off = [values[i][j] for i in range(k) for j in range(k) if i != j]
    scale = max((abs(v) for v in off if v is not None), default=0.0)
    fmt, fmt_e = number_format(values)
    for i, src in enumerate(tasks):
        cells = []
        for j in range(k):
            e = errors[i][j] if errors is not None else None
            style = "dim" if i == j else _diverging_style(values[i][j], scale)
            cells.append(_cell(values[i][j], e, fmt, fmt_e, style, mark=marks and i != j))
        table.add_row(src, *cells)
    return table


def _pairs(tasks: list[str]) -> list[tuple[int, int]]:
    return [(i, j) for i in range(len(tasks)) for j in range(i + 1, len(tasks))]


def _pairs_table(result: dict, title: str = "gradients per task pair (symmetric)", tasks=None) -> Table:
    """One row per unordered pair: cosine, conflict rate and GMS, each ± its standard error."""
    tasks = tasks or result["tasks"]
    table = Table(title=title)
    table.add_column("pair")
    for _, name, _ in PAIR_QUANTITIES:
        table.add_column(name.split(" (")[0].replace("gradient ", ""), justify="right")
    pairs = _pairs(tasks)
    columns = []
    for key, _, signed in PAIR_QUANTITIES:
        values = [result[key][i][j] for i, j in pairs]
        errors = [result["stderr"][key][i][j] for i, j in pairs] if key in result.get("stderr", {}) else None
        fmt, fmt_e = number_format(values, signed)
        scale = max((abs(v) for v in values if v is not None), default=0.0)
        columns.append(
            [
                _cell(
                    v, None if errors is None else errors[n], fmt, fmt_e, _diverging_style(v, scale) if signed else ""
                )
                for n, v in enumerate(values)
            ]
        )
    for n, (i, j) in enumerate(pairs):
        table.add_row(f"{tasks[i]} ↔ {tasks[j]}", *(col[n] for col in columns))
    return table


def _pairs_change_table(result: dict, key: str, title: str, signed: bool) -> Table:
    """One row per unordered pair: baseline, checkpoint and the change (± paired standard error, ▲/▼)."""
    tasks, base, delta = result["tasks"], result["baseline"], result["delta"]
    table = Table(title=f"{title}: baseline → checkpoint")
    for name in ("pair", "baseline", "checkpoint", "change"):
        table.add_column(name, justify="left" if name == "pair" else "right")
    pairs = _pairs(tasks)
    both = [m[key][i][j] for m in (base, result) for i, j in pairs]
    fmt, fmt_e = number_format(both, signed)
    changes = [delta[key][i][j] for i, j in pairs]
    dfmt, dfmt_e = number_format(changes)
    scale = max((abs(v) for v in changes if v is not None), default=0.0)
    for i, j in pairs:
        d = delta[key][i][j]
        table.add_row(
            f"{tasks[i]} ↔ {tasks[j]}",
            _cell(base[key][i][j], base["stderr"][key][i][j], fmt, fmt_e),
            _cell(result[key][i][j], result["stderr"][key][i][j], fmt, fmt_e),
            _cell(d, delta["stderr"][key][i][j], dfmt, dfmt_e, _diverging_style(d, scale), mark=True),
        )
    return table


# ---------------------------------------------------------------------------- summary


def _strength(v: float, e: float, own: float | None) -> str:
    if abs(v) <= SIGNIFICANT_SE * e:
        return "no clear effect"
    strong = "strong " if own and abs(v) >= 0.5 * abs(own) else ("weak " if own and abs(v) < 0.1 * abs(own) else "")
    return f"{strong}{'positive' if v > 0 else 'negative'}"


def transference_summary(result: dict) -> str:
    """Short lines: every ordered pair, strongest effect first, with its Z_rel and, when a baseline
    was measured, its change; then the most conflicting pair and what the words mean."""
    tasks, z, err = result["tasks"], result["transference_rel"], result["stderr"]["transference_rel"]
    k = len(tasks)
    pairs = sorted(
        [(i, j) for i in range(k) for j in range(k) if i != j and z[i][j] is not None],
        key=lambda p: -abs(z[p[0]][p[1]]),
    )
    if not pairs:
        if k > 1:  # partial labels: no batch observed both tasks of any pair (transference.summarise)
            return "transference summary: no pair of tasks was observed together in a measured batch."
        return "transference summary: only one task, nothing to compare."
    delta = result.get("delta")
    fmt, fmt_e = number_format([z[i][j] for i, j in pairs])
    columns = [
        ["pair", *(f"{tasks[i]} → {tasks[j]}" for i, j in pairs)],
        ["Z_rel ± SE", *(f"{fmt(z[i][j])} {fmt_e(err[i][j])}" for i, j in pairs)],
        ["effect", *(_strength(z[i][j], err[i][j], z[i][i]) for i, j in pairs)],
    ]
    if delta is not None:
        d, verdict = delta["transference_rel"], delta["verdict"]
        dfmt, _ = number_format([d[i][j] for i, j in pairs])
        words = {"improved": "improved", "worsened": "worsened", "unchanged": "no clear change"}
        columns.append(["since baseline", *(f"{words[verdict[i][j]]:<15} {dfmt(d[i][j])}" for i, j in pairs)])
    who = "the checkpoint's " if delta is not None else ""
    lines = [
        f"transference summary ({who}Z_rel, strongest first; a step on the source task changes the target's loss):"
    ]
    widths = [max(map(len, col)) for col in columns]
    for row in zip(*columns):
        lines.append("  " + "  ".join(f"{cell:<{w}}" for cell, w in zip(row, widths)).rstrip())
    lines.append(_conflict_line(result))
    lines.append(
        f"(strong: at least half of the source's own progress, the row's diagonal; weak: below a tenth of it; "
        f"no clear effect: within {SIGNIFICANT_SE} standard errors of 0"
        + (f"; improved / worsened: the change is beyond {SIGNIFICANT_SE} standard errors)" if delta else ")")
    )
    return "\n".join(lines)


def _conflict_line(result: dict) -> str:
    tasks, conflict = result["tasks"], result["conflict_rate"]
    pairs = ((conflict[i][j], i, j) for i, j in _pairs(tasks) if conflict[i][j] is not None)
    worst = max(pairs, default=None)
    if worst is None or worst[0] <= 0:
        return "No pair's gradients conflicted on any measured batch."
    rate, i, j = worst
    # partial labels: the batches where both tasks were observed (transference.summarise)
    n = result["batches_used"]["cosine"][i][j] if "batches_used" in result else result["batches"]
    return (
        f"Gradients conflict most between {tasks[i]} and {tasks[j]}: "
        f"{round(rate * n)} of {n} batches ({rate:.0%}) have a negative cosine."
    )
