"""Issue #25, items 2, 7 and the train parts of 6 and 14: what ``train`` tells its user.

Rows ``--on-invalid-rows drop`` leaves out are counted (per column, by reason) before the run and
reported (warning, start line, steps, ``--json``, ``metrics.jsonl``); unseen categorical values
are reported; a task without an AUC on --valid is named with the tasks the score averages; the
before → after table has standard errors and says which weights "after" is; a periodic progress
line when stderr is not a terminal; "1 step"; the time of every session after a resume; a stop by
SIGINT is not an error.
"""

from __future__ import annotations

import json
import math
import signal

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from rich.console import Console

from cogradctl import checkpoint as ckpt_io
from cogradctl import sample
from cogradctl.cli import train as train_cli
from cogradctl.console import Log
from cogradctl.labels import LabelOptions
from cogradctl.stream import ParquetStream
from cogradctl.train import loop, report
from cogradctl.train.report import ProgressLine, count_rows, counted

TASKS = ["click", "like", "share"]
CPU = ("--device", "cpu")
STRICT = ("--missing-labels", "error")  # a null label is an invalid row, as before --missing-labels


def with_column(table: pa.Table, name: str, values) -> pa.Table:
    return table.set_column(table.schema.get_field_index(name), name, pa.array(values, table.schema.field(name).type))


@pytest.fixture(scope="module")
def dirty(tmp_path_factory):
    """Training data of 2000 rows: 'like' null in 1200 of them, f0 NaN in 50 (10 of them also a
    null 'like') and +inf in 5; 250-row row groups. Validation data of 500 rows: 'like' null in
    100 and 0 in every other row (no AUC); user_bucket values unseen at init in 40 rows of each."""
    root = tmp_path_factory.mktemp("dirty")
    t = sample.generate(2000, seed=11)
    like = t.column("like").to_pylist()
    for i in range(1200):
        like[i] = None
    f0 = t.column("f0").to_pylist()
    for i in range(1190, 1240):
        f0[i] = float("nan")
    for i in range(1990, 1995):
        f0[i] = float("inf")
    t = with_column(with_column(t, "like", like), "f0", f0)
    ub = t.column("user_bucket").to_pylist()
    for i in range(1900, 1940):
        ub[i] = 1_000_000 + i
    t = with_column(t, "user_bucket", ub)
    pq.write_table(t, root / "train.parquet", row_group_size=250)
    pq.write_table(t.slice(1240, 750), root / "clean.parquet", row_group_size=300)  # no invalid row
    v = sample.generate(500, seed=12)
    v = with_column(v, "like", [None if i < 100 else 0 for i in range(500)])
    v = with_column(
        v, "user_bucket", [2_000_000 + i if i >= 460 else u for i, u in enumerate(v["user_bucket"].to_pylist())]
    )
    pq.write_table(v, root / "valid.parquet")
    return {
        "train": root / "train.parquet",
        "valid": root / "valid.parquet",
        "clean": root / "clean.parquet",
        "used": 2000 - 1200 - 40 - 5,
    }


def train_args(checkpoint, data, out, *extra):
    return ("train", "--checkpoint", checkpoint, "--data", data, "--out", out, *CPU, *extra)


def records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------- item 2: dropped rows, unseen values


def test_count_rows_agrees_with_the_stream_per_column_and_reason(base_checkpoint, dirty):
    schema = ckpt_io.load(base_checkpoint).schema
    masked = count_rows(ParquetStream(str(dirty["train"]), schema, on_invalid="drop"), "drop")
    assert masked["rows_dropped"] == 55 and masked["invalid"] == {"f0": {"nan": 50, "inf": 5}}  # null 'like' masked
    stream = ParquetStream(str(dirty["train"]), schema, on_invalid="drop", label_options=LabelOptions("drop"))
    counts = count_rows(stream, "drop")
    assert counts["rows"] == 2000 and counts["rows_dropped"] == 1245 and counts["rows_used"] == dirty["used"]
    assert counts["invalid"] == {"f0": {"nan": 50, "inf": 5}, "like": {"null": 1200}}
    assert sum(len(y) for _, y in stream.batches(128, shuffle=True, seed=3)) == counts["rows_used"]
    assert stream.stats["rows_dropped"] == counts["rows_dropped"]
    # --on-invalid-rows error reads nothing: every row is used, or the run stops at the first bad one
    assert count_rows(ParquetStream(str(dirty["train"]), schema), "error")["rows_used"] == 2000


def test_dropped_rows_are_warned_counted_and_used_for_the_steps(cli, base_checkpoint, dirty, tmp_path):
    out = tmp_path / "run"
    args = train_args(
        base_checkpoint, dirty["train"], out, "--valid", dirty["valid"], "--on-invalid-rows", "drop", *STRICT
    )
    r = cli(*args, "--batch-size", "256", "--epochs", "2", "--json")
    assert r.exit_code == 0, r.output
    used = dirty["used"]
    steps = 2 * math.ceil(used / 256)
    assert (
        f"warning: --data {dirty['train']}: dropped 1245 of 2000 rows (62.3%; --on-invalid-rows drop): "
        f"column 'f0' 50 NaN, 5 infinite; task column 'like' 1200 null; training on the other {used}"
    ) in r.stderr
    assert "dropped 100 of 500 rows (20.0%; --on-invalid-rows drop): task column 'like' 100 null" in r.stderr
    assert f"training mmoe on {used} rows (1245 of 2000 dropped as invalid)" in r.stderr
    assert f"; {steps} steps;" in r.stderr
    doc = json.loads(r.stdout)
    assert doc["steps"] == steps
    train = doc["data"]["train"]
    assert (train["rows"], train["rows_dropped"], train["rows_used"]) == (2000, 1245, used)
    assert train["invalid"]["like"] == {"null": 1200}
    assert doc["data"]["valid"]["rows_used"] == 400 and doc["after"]["rows"] == 400
    first = records(out)[0]
    assert first["step"] == 0 and first["data"]["train"]["rows_dropped"] == 1245
    assert first["data"]["valid"]["invalid"] == {"like": {"null": 100}}


def test_unseen_categorical_values_are_reported_for_data_and_valid(cli, base_checkpoint, dirty, tmp_path):
    out = tmp_path / "run"
    args = train_args(
        base_checkpoint, dirty["train"], out, "--valid", dirty["valid"], "--on-invalid-rows", "drop", *STRICT
    )
    r = cli(*args, "--batch-size", "256", "--json")
    assert r.exit_code == 0, r.output
    # counted over every row read, dropped ones included, and worded as evaluate words it
    assert (
        f"--data {dirty['train']}: categorical values without a row of their own (not in the vocabulary, or outside "
        "the encoding's range) were mapped to their column's out-of-vocabulary row: user_bucket: 40 rows, 40 distinct values (of 2000 rows read in epoch 1)"
    ) in r.stderr
    assert (
        f"--valid {dirty['valid']}: categorical values without a row of their own (not in the vocabulary, or outside "
        "the encoding's range) were mapped to their column's out-of-vocabulary row: user_bucket: 40 rows, 40 distinct values (of 500 rows read)"
    ) in r.stderr
    doc = json.loads(r.stdout)
    unseen = {"columns": {"user_bucket": 40}, "distinct": {"user_bucket": 40}, "distinct_at_least": []}
    assert doc["data"]["train"]["oov"] == {"rows_read": 2000, "epoch": 1, **unseen}
    assert doc["data"]["valid"]["oov"] == {"rows_read": 500, **unseen}
    data = [rec["data"] for rec in records(out) if "data" in rec]
    assert {"user_bucket": 40} in [d.get("train", {}).get("oov", {}).get("columns") for d in data]
    assert {"user_bucket": 40} in [d.get("valid", {}).get("oov", {}).get("columns") for d in data]


def test_a_run_shorter_than_an_epoch_reports_the_rows_it_read(cli, base_checkpoint, dirty, tmp_path):
    args = train_args(base_checkpoint, dirty["clean"], tmp_path / "run")
    r = cli(*args, "--batch-size", "64", "--max-steps", "1", "--shuffle-buffer", "0", "--json")
    assert r.exit_code == 0, r.output
    oov = json.loads(r.stdout)["data"]["train"]["oov"]
    assert oov["epoch"] is None and 0 < oov["rows_read"] < 750


def test_a_task_without_an_auc_is_named_with_the_tasks_the_score_averages(cli, base_checkpoint, dirty, tmp_path):
    out = tmp_path / "run"
    args = train_args(
        base_checkpoint, dirty["train"], out, "--valid", dirty["valid"], "--on-invalid-rows", "drop", *STRICT
    )
    r = cli(*args, "--batch-size", "1024")
    assert r.exit_code == 0, r.output
    assert (
        "task like has no AUC (the labels in its 400 rows used are all of one class); the validation score "
        "(best.safetensors, --early-stopping) is the mean AUC of tasks click, share only"
    ) in " ".join(r.stderr.split())
    assert "(the mean of click, share: like has no AUC on --valid)" in r.stdout
    doc = json.loads(cli(*args, "--batch-size", "1024", "--overwrite", "--json").stdout)
    assert doc["best"]["averaged"] == ["click", "share"] and doc["best"]["without_auc"] == ["like"]
    tasks = doc["best"]["valid"]["tasks"]
    assert doc["best"]["score"] == pytest.approx((tasks["click"]["auc"] + tasks["share"]["auc"]) / 2)


# ---------------------------------------------------------------------------- item 7: the before → after table


def test_the_table_has_standard_errors_and_says_which_weights_after_is(cli, base_checkpoint, sample_dir, tmp_path):
    args = train_args(
        base_checkpoint, sample_dir / "train.parquet", tmp_path / "run", "--valid", sample_dir / "valid.parquet"
    )
    r = cli(*args, "--batch-size", "500", "--max-steps", "2")
    assert r.exit_code == 0, r.output
    assert "± se" in r.stdout and "(last" in r.stdout and "step 2" in r.stdout
    assert "the AUC's standard error (DeLong) on 500 rows of --valid" in " ".join(r.stdout.split())
    doc = json.loads(cli(*args, "--batch-size", "500", "--max-steps", "2", "--overwrite", "--json").stdout)
    for key in ("before", "after"):
        assert all(m["auc_se"] > 0 for m in doc[key]["tasks"].values())
    assert doc["after_step"] == 2
    valid = [rec for rec in records(tmp_path / "run") if "valid" in rec]
    assert all("auc_se" in m for rec in valid for m in rec["valid"].values())


def result_doc(before: dict, last: dict, best: dict, best_step: int) -> dict:
    def evaluation(aucs):
        return {"rows": 100, "tasks": {t: {"auc": a, "logloss": 0.5, "auc_se": 0.01} for t, a in aucs.items()}}

    return {
        "method": "ew",
        "steps": 60,
        "epochs": 3,
        "seconds": 12.0,
        "seconds_session": 12.0,
        "sessions": 1,
        "resumed_at_step": None,
        "out": "runs/x",
        "skipped": 0,
        "stopped_early": False,
        "data": {"valid": {"rows_used": 100}},
        "before": evaluation(before),
        "after": evaluation(last),
        "after_step": 60,
        "best": {
            "score": sum(best.values()) / len(best),
            "auc": sum(best.values()) / len(best),
            "step": best_step,
            "valid": evaluation(best),
            "averaged": list(best),
            "without_auc": [],
        },
    }


def printed(doc: dict) -> str:
    console = Console(width=100, record=True, file=open("/dev/null", "w"))
    saved, train_cli.stdout = train_cli.stdout, console
    try:
        train_cli._print_result(doc)
    finally:
        train_cli.stdout = saved
    return " ".join(console.export_text().split(" \n"))  # the lines rich wrapped, joined


def test_when_every_auc_fell_it_says_plainly_where_best_is_from():
    doc = result_doc({"click": 0.8, "like": 0.7}, {"click": 0.7, "like": 0.6}, {"click": 0.82, "like": 0.71}, 49)
    text = printed(doc)
    assert "every task's AUC fell from step 0 to the last step (60): best.safetensors is from step 49" in text
    assert "best mean AUC 0.7650 at step 49 → runs/x/best.safetensors" in text
    # both weights in the table: the last step's and best.safetensors', each with its change
    assert "last" in text and "step 60" in text and "best" in text and "step 49" in text
    assert text.count("± se") == 3  # under each AUC, and in the caption
    doc = result_doc({"click": 0.8, "like": 0.7}, {"click": 0.7, "like": 0.6}, {"click": 0.8, "like": 0.7}, 0)
    assert "best.safetensors is from step 0 (the starting point)" in printed(doc)
    doc = result_doc({"click": 0.8, "like": 0.7}, {"click": 0.9, "like": 0.6}, {"click": 0.9, "like": 0.6}, 60)
    text = printed(doc)
    assert "fell" not in text and "(last = best)" in text


# ---------------------------------------------------------------------------- item 6: progress without a terminal


def test_a_piped_run_logs_progress_lines(cli, base_checkpoint, sample_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(report, "PROGRESS_EVERY_S", 0.0)  # a line after every step
    args = train_args(base_checkpoint, sample_dir / "train.parquet", tmp_path / "run", "--batch-size", "500")
    r = cli(*args, "--epochs", "2")
    assert r.exit_code == 0, r.output
    assert "step 1/8 (epoch 1/2), loss " in r.stderr and " rows/s, " in r.stderr and " left" in r.stderr
    assert "step 8/8 (epoch 2/2), loss " in r.stderr
    monkeypatch.setattr(report, "PROGRESS_EVERY_S", 1e9)  # only the epochs' ends
    monkeypatch.setattr(report, "PROGRESS_GAP_S", 0.0)
    r = cli(*args, "--epochs", "2", "--overwrite")
    assert r.exit_code == 0, r.output
    assert "epoch 1/2 done: step 4/8, loss " in r.stderr and "epoch 2/2 done: step 8/8, loss " in r.stderr
    assert "(epoch 1/2)" not in r.stderr
    quiet = cli(*args, "--epochs", "2", "--overwrite", "--quiet")
    assert quiet.exit_code == 0 and "rows/s" not in quiet.stderr


def test_progress_lines_are_rate_limited_and_left_to_the_bar_on_a_terminal(monkeypatch):
    lines = []
    log = Log()
    monkeypatch.setattr(log, "info", lines.append)
    line = ProgressLine(log, total=100, epochs=2, world=1)
    for step in range(1, 51):
        line.step(step, 1, 64, 1.5)
    line.epoch_end(50, 1)  # within PROGRESS_GAP_S of the start: a short epoch is not logged
    assert lines == []
    monkeypatch.setattr(report, "PROGRESS_EVERY_S", 0.0)
    line.step(51, 2, 64, 0.5)
    assert len(lines) == 1 and lines[0].startswith("step 51/100 (epoch 2/2), loss 1.4804 (task sum, mean of 51 steps)")

    class Terminal:
        def isatty(self) -> bool:
            return True

    assert ProgressLine(log, total=100, epochs=2, world=1).on
    monkeypatch.setattr(report.sys, "stderr", Terminal())
    assert not ProgressLine(log, total=100, epochs=2, world=1).on
    assert not ProgressLine(Log(quiet=True), total=100, epochs=2, world=1).on


# ---------------------------------------------------------------------------- item 14: steps, time, Ctrl-C


def test_one_step_is_singular(cli, base_checkpoint, sample_dir, tmp_path):
    r = cli(*train_args(base_checkpoint, sample_dir / "train.parquet", tmp_path / "run"), "--max-steps", "1")
    assert r.exit_code == 0, r.output
    assert "; 1 step; " in r.stderr and "ew: 1 step, 1 epoch, " in r.stdout
    assert counted(2, "epoch") == "2 epochs" and counted(1, "row") == "1 row"


def stop_at(monkeypatch, step: int) -> None:
    """SIGINT, as Ctrl-C sends it, during the ``step``-th step of the next run."""
    real, calls = loop.train_step, []

    def train_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == step:
            signal.raise_signal(signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", train_step)


def test_ctrl_c_says_stopped_not_error_and_a_resume_reports_every_session(
    cli, base_checkpoint, sample_dir, tmp_path, monkeypatch
):
    out = tmp_path / "run"
    args = train_args(base_checkpoint, sample_dir / "train.parquet", out, "--batch-size", "250", "--epochs", "2")
    stop_at(monkeypatch, 3)
    r = cli(*args, "--quiet")
    assert r.exit_code == 130, r.output
    assert r.stderr.startswith("stopped by SIGINT (Ctrl-C) at step 3 of 16 after ")
    assert "error" not in r.stderr and "rerun the same command to resume" in r.stderr
    state = ckpt_io.load(out / "last.safetensors").training_state
    assert state["sessions"] == 1 and state["total_steps"] == 16
    monkeypatch.undo()
    r = cli(*args, "--quiet")
    assert r.exit_code == 0, r.output
    assert "16 steps, 2 epochs, " in r.stdout and "of training in 2 sessions (this one, resumed at step 3: " in r.stdout
    doc = json.loads(cli(*args, "--json", "--overwrite", "--quiet").stdout)
    assert doc["sessions"] == 1 and doc["resumed_at_step"] is None


def test_a_state_saved_before_these_fields_resumes_as_its_run_began(cli, base_checkpoint, dirty, tmp_path, monkeypatch):
    """A training_state without sessions/total_steps/best_eval (saved by an earlier version) is
    resumed: its run's length is the one it began with (every row counted), its session the second."""
    out = tmp_path / "run"
    args = train_args(
        base_checkpoint, dirty["train"], out, "--on-invalid-rows", "drop", *STRICT, "--batch-size", "250", "--json"
    )
    stop_at(monkeypatch, 2)
    assert cli(*args, "--quiet").exit_code == 130
    monkeypatch.undo()
    saved = ckpt_io.load(out / "last.safetensors")
    assert saved.training_state["total_steps"] == math.ceil(dirty["used"] / 250)
    for key in ("sessions", "total_steps", "best_eval"):
        del saved.training_state[key]
    ckpt_io.save(saved, out / "last.safetensors")
    r = cli(*args)
    assert r.exit_code == 0, r.output
    assert "; 8 steps; " in r.stderr  # 2000 rows / 250, as the run began counting
    doc = json.loads(r.stdout)
    assert doc["sessions"] == 2 and doc["resumed_at_step"] == 2 and doc["steps"] == math.ceil(dirty["used"] / 250)
