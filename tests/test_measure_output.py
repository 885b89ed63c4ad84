"""What measure-transference prints and plots (issue #25 items 8, 9, 6 and 14): both models in every
table with --baseline, one significance rule (2 standard errors), short summary lines, heatmaps
that can be read, a progress bar on a TTY, and the data report said once."""

from __future__ import annotations

import re
from contextlib import contextmanager

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from cogradctl import transference as tr
from cogradctl.cli import measure as measure_cli
from cogradctl.cli.measure_view import print_measurement, transference_summary
from cogradctl.cli.output import stdout

TASKS = ["click", "like", "share"]
BATCHES = 4
SIGN = np.array([-1.0, 1.0, -1.0, 1.0])  # per-batch deviations: mean 0, standard error 1/sqrt(3) ≈ 0.577


def _symmetric(rng, low, high, diagonal):
    m = rng.uniform(low, high, (3, 3))
    m = (m + m.T) / 2
    np.fill_diagonal(m, diagonal)
    return m


def _batches(seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(BATCHES):
        cos = _symmetric(rng, -0.5, 0.5, 1.0)
        z = rng.normal(0, 0.01, (3, 3)) + np.eye(3) * 0.2
        out.append(
            {
                "transference": z,
                "transference_rel": z.copy(),
                "cosine": cos,
                "conflict_rate": (cos < 0).astype(float),
                "gms": _symmetric(rng, 0.6, 0.99, 1.0),
            }
        )
    return out


def synthetic_result() -> dict:
    """A checkpoint measured against a baseline on 4 batches. The change of Z_rel click → like is
    0.9 ± 0.577 (1.56 standard errors: 'improved' under a 1-SE rule, not under 2 SE); like → click
    1.5 ± 0.577 (2.6 standard errors: improved under both)."""
    before = _batches(1)
    after = [{k: v.copy() for k, v in b.items()} for b in before]
    for n, b in enumerate(after):
        b["transference_rel"][0, 1] += 0.9 + SIGN[n]
        b["transference_rel"][1, 0] += 1.5 + SIGN[n]
        b["cosine"] += 0.1 * _symmetric(np.random.default_rng(n), -1, 1, 0.0)
    result = {
        "tasks": TASKS,
        "lookahead": "sgd",
        "lookahead_lr": 0.1,
        "holdout": False,
        "batches": BATCHES,
        "batches_requested": BATCHES,
        "batch_size": 100,
        **tr.summarise(after),
        "checkpoint": "runs/after.safetensors",
    }
    result["baseline"] = {"checkpoint": "runs/before.safetensors", **tr.summarise(before)}
    result["delta"] = tr.compare(after, before)
    return result


def printed(capsys, result) -> list[str]:
    print_measurement(result)
    return capsys.readouterr().out.splitlines()


def table_after(lines: list[str], title: str) -> list[str]:
    start = next(n for n, line in enumerate(lines) if line.startswith(title))
    end = next(n for n in range(start + 1, len(lines)) if lines[n].startswith("└"))
    return lines[start : end + 1]


# ---------------------------------------------------------------------------- item 8: text output


@pytest.mark.parametrize(
    "key,title",
    [
        ("cosine", "gradient cosine: baseline → checkpoint"),
        ("conflict_rate", "conflict rate (share of batches with cosine < 0): baseline → checkpoint"),
        ("gms", "GMS (gradient magnitude similarity): baseline → checkpoint"),
    ],
)
def test_with_a_baseline_every_pair_quantity_shows_baseline_checkpoint_and_change(capsys, key, title):
    result = synthetic_result()
    table = table_after(printed(capsys, result), title)
    assert re.search(r"pair\s+┃\s+baseline\s+┃\s+checkpoint\s+┃\s+change", "\n".join(table))
    row = next(line for line in table if "click ↔ share" in line)
    before, after, change = result["baseline"][key][0][2], result[key][0][2], result["delta"][key][0][2]
    cells = [c.strip() for c in row.split("│")[2:5]]
    assert float(cells[0].split()[0]) == pytest.approx(before, abs=5e-5)
    assert float(cells[1].split()[0]) == pytest.approx(after, abs=5e-5)
    assert float(cells[2].split()[0]) == pytest.approx(change, abs=5e-5)
    assert all("±" in c for c in cells)


def test_one_significance_rule_two_standard_errors_for_marks_verdict_and_summary(capsys):
    result = synthetic_result()
    verdict = result["delta"]["verdict"]
    assert verdict[0][1] == "unchanged" and verdict[1][0] == "improved"  # 1.56 SE vs 2.6 SE
    lines = printed(capsys, result)
    change = "\n".join(table_after(lines, "change of Z_rel"))
    assert change.count("▲") == 1 and "▼" not in change
    summary = {"→".join(line.split()[0:3:2]): line for line in lines if re.match(r"  \w+ → \w+ ", line)}
    assert "no clear change +0.9000" in summary["click→like"] and "improved        +1.5000" in summary["like→click"]
    text = "\n".join(lines)
    assert "more than 2 standard errors" in text and "within 2 standard errors of 0" in text


def test_summary_is_short_lines_within_the_terminal_with_the_tables_number_format(capsys):
    result = synthetic_result()
    lines = printed(capsys, result)
    assert max(map(len, lines)) <= stdout.width  # nothing for the terminal to break mid-word
    summary = transference_summary(result).splitlines()
    assert len(summary) >= 2 + 6  # a header, a line per ordered pair (6), the conflict line, the key
    # the change of like → click as the change table prints it, and the same string in the summary
    change_row = next(line for line in table_after(lines, "change of Z_rel") if line.startswith("│ like "))
    shown = change_row.split("│")[2].split()[0]
    assert shown == "+1.5000" and any(line.startswith("  like → click") and shown in line for line in lines)


def test_without_a_baseline_the_pair_table_has_one_column_per_quantity(capsys):
    result = synthetic_result()
    for key in ("baseline", "delta"):
        result.pop(key)
    lines = printed(capsys, result)
    table = "\n".join(table_after(lines, "gradients per task pair"))
    assert re.search(r"pair\s+┃\s+cosine\s+┃\s+conflict rate\s+┃\s+GMS", table)
    assert "baseline" not in "\n".join(lines) and "▲" not in "\n".join(lines)


# ---------------------------------------------------------------------------- item 9: heatmaps


def _luminance(rgb) -> float:
    c = np.asarray(rgb[:3], dtype=float)
    c = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    return float(0.2126 * c[0] + 0.7152 * c[1] + 0.0722 * c[2])


def test_heatmaps_share_one_symmetric_scale_readable_text_marks_and_a_title():
    pytest.importorskip("matplotlib")
    import matplotlib.colors as mcolors
    import matplotlib.pyplot as plt

    from cogradctl.cli.measure_plot import heatmap_figure

    result = synthetic_result()
    fig = heatmap_figure(result)
    try:
        axes = [ax for ax in fig.axes if ax.get_title()]  # the panels (colour bars have no title)
        panels = {ax.get_title().split(" (")[0]: ax for ax in axes}
        for quantity in ("Z_rel", "gradient cosine"):
            norms = [panels[f"{who}: {quantity}"].images[1].norm for who in ("baseline", "checkpoint")]
            assert norms[0].vmin == norms[1].vmin == -norms[0].vmax == -norms[1].vmax > -np.inf
        cosine_change = panels["change: gradient cosine"]
        diagonal = [t.get_text() for t in cosine_change.texts if t.get_position()[0] == t.get_position()[1]]
        assert diagonal == ["—"] * 3  # no float noise on the diagonal
        assert "▲" in " ".join(t.get_text() for t in panels["change: Z_rel"].texts)
        for ax in axes:
            colours = ax.images[0].get_array()
            for t in ax.texts:
                if t.get_text() == "—":
                    continue
                j, i = (int(round(v)) for v in t.get_position())
                assert "±" in t.get_text()
                cell = _luminance(colours[i, j] / (255 if colours.dtype == np.uint8 else 1))
                text = _luminance(mcolors.to_rgb(t.get_color()))
                contrast = (max(cell, text) + 0.05) / (min(cell, text) + 0.05)
                assert contrast >= 4.5, (ax.get_title(), t.get_text(), contrast)
        title = fig._suptitle.get_text()
        assert "runs/after.safetensors" in title and "runs/before.safetensors" in title
        assert "4 batches" in title and "sgd lookahead" in title and "α=0.1" in title
    finally:
        plt.close(fig)


# ---------------------------------------------------------------------------- items 6 and 14: the CLI


@pytest.fixture(scope="module")
def unseen(tmp_path_factory, sample_dir):
    """600 rows whose device values were never seen at init (all mapped to the OOV bucket)."""
    table = pq.read_table(sample_dir / "train.parquet").slice(0, 600)
    table = table.set_column(
        table.schema.get_field_index("device"), "device", pc.binary_join_element_wise(table["device"], "-new", "")
    )
    path = tmp_path_factory.mktemp("measure_output") / "unseen.parquet"
    pq.write_table(table, path)
    return path


def _oov_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "device" in line and ("OOV" in line or "seen" in line)]


def test_unseen_values_are_reported_once_with_a_baseline_and_the_same_count(cli, base_checkpoint, unseen):
    args = ["measure-transference", "--checkpoint", base_checkpoint, "--data", unseen, "--batches", 2]
    alone = cli(*args, "--batch-size", 200)
    assert alone.exit_code == 0, alone.output
    (line,) = _oov_lines(alone.stderr)
    assert re.search(r"\b400\b", line)  # two batches of 200 rows, every device value unseen
    both = cli(*args, "--batch-size", 200, "--baseline", base_checkpoint)
    assert both.exit_code == 0, both.output
    assert _oov_lines(both.stderr) == [line]
    assert "gradient cosine: baseline → checkpoint" in both.stdout


def test_a_progress_bar_per_measured_checkpoint(cli, base_checkpoint, sample_dir, monkeypatch):
    bars = []

    @contextmanager
    def progress(self, description, total):
        bars.append([description, total, 0])

        def advance(n=1, **fields):
            bars[-1][2] += n

        yield advance

    monkeypatch.setattr(measure_cli.Log, "progress", progress)
    args = ["--data", sample_dir / "valid.parquet", "--batches", 3, "--batch-size", 100, "--json"]
    result = cli("measure-transference", "--checkpoint", base_checkpoint, "--baseline", base_checkpoint, *args)
    assert result.exit_code == 0, result.output
    assert bars == [["measuring the checkpoint", 3, 3], ["measuring the baseline", 3, 3]]


def test_piped_stderr_gets_no_progress_bar(cli, base_checkpoint, sample_dir):
    args = ["--data", sample_dir / "valid.parquet", "--batches", 2, "--batch-size", 100, "--json"]
    result = cli("measure-transference", "--checkpoint", base_checkpoint, *args)
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines() == [f"measuring {base_checkpoint}"]


def test_plot_without_matplotlib_is_an_input_error_naming_the_option(cli, base_checkpoint, sample_dir, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)  # import matplotlib → ImportError
    args = ["--data", sample_dir / "valid.parquet", "--batches", 1, "--plot", sample_dir / "never.png"]
    result = cli("measure-transference", "--checkpoint", base_checkpoint, *args)
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert "--plot needs matplotlib" in result.stderr and 'pip install -e ".[plot]"' in result.stderr
    assert not (sample_dir / "never.png").exists()


def test_a_baseline_that_reads_the_rows_differently_reports_its_own_counts(cli, base_checkpoint, unseen, tmp_path):
    """A baseline whose vocabulary was built on the new data maps other values to OOV: said, named as its own."""
    part = tmp_path / "part.parquet"
    pq.write_table(pq.read_table(unseen).slice(0, 150), part)
    other = tmp_path / "other.safetensors"
    init = ["init", "--model", "mmoe", "--data", part, "--tasks", ",".join(TASKS), "--out", other, "--quiet"]
    assert cli(*init).exit_code == 0
    args = ["--data", unseen, "--batches", 2, "--batch-size", 200, "--json"]
    result = cli("measure-transference", "--checkpoint", base_checkpoint, "--baseline", other, *args)
    assert result.exit_code == 0, result.output
    theirs = [line for line in result.stderr.splitlines() if line.startswith(f"warning: --baseline {other}: ")]
    (mine,) = _oov_lines(result.stderr)  # the checkpoint's: device values unseen at its init
    assert len(theirs) == 1 and "device" not in theirs[0] and "user_bucket" in theirs[0]
    assert not mine.startswith("warning: --baseline")


def test_a_task_against_itself_is_exactly_one_so_a_baseline_change_there_is_exactly_zero():
    """The cosine and GMS diagonal are 1 by definition (0 for a zero gradient): rounding left them at
    1 ± 1e-16, and --json's delta showed that noise. Off the diagonal: a float64 reference."""
    import numpy as np
    import torch

    from cogradctl.transference.lookahead import _matrices

    g = torch.randn(4, 1000, generator=torch.Generator().manual_seed(0)) * torch.tensor([[1e-3], [1.0], [1e3], [0.0]])
    m = _matrices(torch.ones(4), torch.ones(4, 4) * 0.9, g)
    assert m["cosine"].diagonal().tolist() == [1.0, 1.0, 1.0, 0.0]
    assert m["gms"].diagonal().tolist() == [1.0, 1.0, 1.0, 0.0]
    ref = g.double().numpy()
    norms = np.linalg.norm(ref, axis=1)
    for i in range(3):
        for j in range(3):
            if i != j:
                assert m["cosine"][i, j] == pytest.approx(ref[i] @ ref[j] / (norms[i] * norms[j]), abs=1e-12)
