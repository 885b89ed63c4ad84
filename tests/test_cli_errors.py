"""The CLI contract: exit codes, one-line errors on stderr, clean stdout, JSON output, untouched inputs.

Exit codes (cogradctl.errors): 0 ok, 1 unexpected (a bug), 2 usage/input error, 3 gate failed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from cogradctl import checkpoint as ckpt_io
from cogradctl import cli as cli_module

TASKS = ["click", "like", "share"]
TINY_TRAIN = ("--max-steps", "3", "--batch-size", "256", "--device", "cpu", "--quiet")
OUTPUTS = ("last.safetensors", "best.safetensors", "metrics.jsonl", "config.toml")
CUDA = torch.cuda.is_available()


def state(path) -> tuple[bytes, int]:
    """A file's bytes and mtime, to check that a command left it untouched."""
    return open(path, "rb").read(), os.stat(path).st_mtime_ns


def tree_state(directory) -> dict:
    return {p.name: state(p) for p in sorted(directory.iterdir())}


def assert_input_error(result, *needles, quiet=False):
    """Exit 2, the error as one line on stderr naming what is wrong, nothing on stdout, no traceback.

    Progress log lines may precede the error on stderr (they are suppressed by --quiet; with
    ``quiet=True`` stderr must be exactly the one error line).
    """
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.stdout == ""
    err = result.stderr
    assert err.endswith("\n"), err
    lines = err.splitlines()
    if quiet:
        assert len(lines) == 1, f"not one line: {err!r}"
    assert lines[-1].startswith("error: "), err
    assert sum(line.startswith("error") for line in lines) == 1, err
    for needle in needles:
        assert str(needle) in lines[-1], f"{needle!r} not in {lines[-1]!r}"
    assert "Traceback" not in result.output


@pytest.fixture(scope="module")
def files(sample_dir, base_checkpoint):
    return {"ckpt": base_checkpoint, "train": sample_dir / "train.parquet", "valid": sample_dir / "valid.parquet"}


@pytest.fixture(scope="module")
def bad_label_file(tmp_path_factory, sample_dir):
    """valid.parquet with one 'like' label set to 2."""
    table = pq.read_table(sample_dir / "valid.parquet")
    like = table.column("like").to_pylist()
    like[17] = 2
    table = table.set_column(table.schema.get_field_index("like"), "like", pa.array(like, type=pa.int8()))
    path = tmp_path_factory.mktemp("bad") / "bad_label.parquet"
    pq.write_table(table, path)
    return path


# ---------------------------------------------------------------------------- success cases


def test_version_and_help(cli):
    r = cli("--version")
    assert r.exit_code == 0 and r.stdout.startswith("cogradctl ")
    r = cli("--help")
    assert r.exit_code == 0
    for command in ("init", "train", "evaluate", "measure-transference", "inspect", "models", "methods", "sample-data"):
        assert command in r.stdout


def test_sample_data(cli, tmp_path):
    r = cli("sample-data", "--out", tmp_path / "s", "--rows", "50", "--valid-rows", "20", "--seed", "3")
    assert r.exit_code == 0, r.output
    assert pq.read_metadata(tmp_path / "s" / "train.parquet").num_rows == 50
    assert pq.read_metadata(tmp_path / "s" / "valid.parquet").num_rows == 20
    assert str(tmp_path / "s" / "train.parquet") in r.stdout
    r = cli(
        "sample-data",
        "--out",
        tmp_path / "j",
        "--rows",
        "30",
        "--valid-rows",
        "10",
        "--tasks",
        "a=1:0.5,b=-1:0.3",
        "--json",
    )
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout) == {
        "train": {"path": str(tmp_path / "j" / "train.parquet"), "rows": 30},
        "valid": {"path": str(tmp_path / "j" / "valid.parquet"), "rows": 10},
    }
    assert {"a", "b"} <= set(pq.read_schema(tmp_path / "j" / "train.parquet").names)


def test_init_table_and_json(cli, tmp_path, files):
    out = tmp_path / "m.safetensors"
    r = cli(
        "init",
        "--model",
        "shared-bottom",
        "--data",
        files["valid"],
        "--tasks",
        "click,like",
        "--out",
        out,
        "--config",
        "bottom=[8]",
        "--features",
        "f0,f1,device",
    )
    assert r.exit_code == 0, r.output
    assert str(out) in r.stdout and "model=shared-bottom" in r.stdout and "rows=500" in r.stdout
    assert "wrote" in r.stderr and "wrote" not in r.stdout  # logs go to stderr
    out2 = tmp_path / "j.safetensors"
    r = cli(
        "init",
        "--model",
        "mmoe",
        "--data",
        files["valid"],
        "--tasks",
        "click,like,share",
        "--out",
        out2,
        "--config",
        "num_experts=2",
        "--config",
        "expert=[8]",
        "--json",
        "--quiet",
    )
    assert r.exit_code == 0, r.output
    assert r.stderr == ""  # --quiet
    doc = json.loads(r.stdout)
    assert set(doc) == {"checkpoint", "model", "config", "rows", "tasks", "features", "encodings", "parameters"}
    assert doc["checkpoint"] == str(out2) and doc["model"] == "mmoe" and doc["rows"] == 500
    assert doc["tasks"] == {t: "binary" for t in TASKS}
    assert doc["config"]["num_experts"] == 2 and doc["config"]["expert"] == [8] and doc["config"]["tower"] == [32]
    assert doc["features"]["f0"] == "dense" and doc["features"]["device"] == "categorical"
    p = doc["parameters"]
    assert p["total"] == p["shared"] + sum(p["tasks"].values())
    assert ckpt_io.load(out2).model_config == doc["config"]


def test_init_overwrite(cli, tmp_path, files):
    out = tmp_path / "m.safetensors"
    args = ("init", "--model", "mmoe", "--data", files["valid"], "--tasks", "click", "--out", out, "--quiet")
    assert cli(*args, "--seed", "1").exit_code == 0
    first = out.read_bytes()
    r = cli(*args, "--seed", "2")
    assert_input_error(r, f"--out {out}", "--overwrite")
    assert out.read_bytes() == first
    r = cli(*args, "--seed", "2", "--overwrite")
    assert r.exit_code == 0, r.output
    assert out.read_bytes() != first


def test_train_evaluate_measure_inspect_leave_inputs_untouched(cli, tmp_path, files):
    before = {k: state(v) for k, v in files.items()}
    out = tmp_path / "run"
    r = cli(
        "train",
        "--checkpoint",
        files["ckpt"],
        "--data",
        files["train"],
        "--valid",
        files["valid"],
        "--out",
        out,
        "--method",
        "cograd",
        "--gamma",
        "0.1",
        *TINY_TRAIN,
        "--json",
    )
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert set(doc) == {
        "method",
        "steps",
        "epochs",
        "seconds",
        "out",
        "before",
        "after",
        "best",
        "skipped",
        "stopped_early",
        "seconds_session",
        "sessions",
        "resumed_at_step",
        "data",
        "after_step",
    }
    assert doc["method"] == "cograd" and doc["steps"] == 3 and doc["epochs"] == 1 and doc["out"] == str(out)
    for key in ("before", "after"):
        assert doc[key]["rows"] == 500 and set(doc[key]["tasks"]) == set(TASKS)
    assert set(doc["best"]) == {"auc", "score", "step", "valid", "averaged", "without_auc"}
    assert sorted(os.listdir(out)) == sorted(OUTPUTS)
    last = ckpt_io.load(out / "last.safetensors")
    assert [h["run"] for h in last.history] == ["init", "train"]
    assert last.history[-1]["steps"] == 3 and last.history[-1]["method"] == "cograd"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records and all("step" in rec for rec in records)

    r = cli("evaluate", "--checkpoint", files["ckpt"], "--data", files["valid"], "--device", "cpu", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert set(doc) == {"rows", "tasks"} and doc["rows"] == 500
    assert set(doc["tasks"]) == set(TASKS)
    for m in doc["tasks"].values():
        assert set(m) == {"rows", "auc", "auc_se", "logloss"} and m["rows"] == 500  # the task's observed rows
        assert 0.0 <= m["auc"] <= 1.0 and m["logloss"] > 0 and 0.0 < m["auc_se"] < 0.1

    r = cli(
        "measure-transference",
        "--checkpoint",
        files["ckpt"],
        "--data",
        files["valid"],
        "--batches",
        "2",
        "--batch-size",
        "128",
        "--device",
        "cpu",
        "--json",
    )
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert {"tasks", "transference", "transference_rel", "cosine", "conflict_rate", "batches"} <= set(doc)
    assert doc["tasks"] == TASKS and doc["batches"] == 2
    for key in ("transference", "transference_rel", "cosine", "conflict_rate"):
        assert len(doc[key]) == 3 and all(len(row) == 3 for row in doc[key])
    assert all(abs(doc["cosine"][i][i] - 1.0) < 1e-6 for i in range(3))
    assert all(0.0 <= v <= 1.0 for row in doc["conflict_rate"] for v in row)

    r = cli("inspect", files["ckpt"], "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    keys = {"checkpoint", "model", "plugin_error", "config", "tasks", "features", "parameters", "stored_elements"}
    assert set(doc) == keys | {"history"}
    assert doc["plugin_error"] is None and doc["parameters"]["total"] == doc["stored_elements"]
    assert doc["model"] == "mmoe" and doc["config"]["num_experts"] == 2
    assert [f["name"] for f in doc["features"]][:2] == ["f0", "f1"]

    after = {k: state(v) for k, v in files.items()}
    assert after == before


def test_human_readable_outputs(cli, tmp_path, files):
    r = cli(
        "train",
        "--checkpoint",
        files["ckpt"],
        "--data",
        files["valid"],
        "--valid",
        files["valid"],
        "--out",
        tmp_path / "run",
        *TINY_TRAIN,
    )
    assert r.exit_code == 0, r.output
    assert "ew: 2 steps" in r.stdout and "before → after" in r.stdout  # 500 rows, 256 per step, one epoch
    r = cli("evaluate", "--checkpoint", files["ckpt"], "--data", files["valid"], "--device", "cpu")
    assert r.exit_code == 0 and "auc" in r.stdout and "click" in r.stdout
    r = cli(
        "measure-transference",
        "--checkpoint",
        files["ckpt"],
        "--data",
        files["valid"],
        "--batches",
        "2",
        "--batch-size",
        "128",
    )
    assert r.exit_code == 0 and "relative transference" in r.stdout and "cosine" in r.stdout
    assert all(t in r.stdout for t in TASKS)
    r = cli("inspect", files["ckpt"])
    assert r.exit_code == 0 and "model mmoe" in r.stdout and "history" in r.stdout
    for kind, name in (("models", "shared-bottom"), ("methods", "cograd")):
        r = cli(kind)
        assert r.exit_code == 0 and name in r.stdout and r.stderr == ""


def test_evaluate_json_single_class_task_is_valid_json(cli, tmp_path, files):
    table = pq.read_table(files["valid"])
    table = table.set_column(
        table.schema.get_field_index("share"), "share", pa.array([0] * table.num_rows, type=pa.int8())
    )
    path = tmp_path / "one_class.parquet"
    pq.write_table(table, path)
    r = cli("evaluate", "--checkpoint", files["ckpt"], "--data", path, "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["tasks"]["share"]["auc"] is None and doc["tasks"]["share"]["auc_se"] is None
    assert doc["tasks"]["click"]["auc"] is not None and doc["tasks"]["click"]["auc_se"] is not None


# ---------------------------------------------------------------------------- input errors (exit 2)


CKPT_COMMANDS = {
    "train": lambda f, c, tmp: ("train", "--checkpoint", c, "--data", f["train"], "--out", tmp / "run", *TINY_TRAIN),
    "evaluate": lambda f, c, tmp: ("evaluate", "--checkpoint", c, "--data", f["valid"]),
    "measure-transference": lambda f, c, tmp: (
        "measure-transference",
        "--checkpoint",
        c,
        "--data",
        f["valid"],
        "--batches",
        "1",
    ),
    "inspect": lambda f, c, tmp: ("inspect", c),
}


@pytest.mark.parametrize("command", CKPT_COMMANDS)
def test_missing_checkpoint(cli, tmp_path, files, command):
    missing = tmp_path / "absent.safetensors"
    assert_input_error(cli(*CKPT_COMMANDS[command](files, missing, tmp_path)), missing, "no such checkpoint file")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", CKPT_COMMANDS)
def test_non_checkpoint_file(cli, tmp_path, files, command):
    before = state(files["train"])
    assert_input_error(cli(*CKPT_COMMANDS[command](files, files["train"], tmp_path)), files["train"], "safetensors")
    assert state(files["train"]) == before


@pytest.mark.parametrize("command", ["train", "evaluate", "inspect"])
def test_plain_safetensors_file(cli, tmp_path, files, command):
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, plain)
    assert_input_error(cli(*CKPT_COMMANDS[command](files, plain, tmp_path)), plain, "cogradctl init")


DATA_COMMANDS = {
    "init": lambda f, d, tmp: (
        "init",
        "--model",
        "mmoe",
        "--data",
        d,
        "--tasks",
        "click",
        "--out",
        tmp / "m.safetensors",
    ),
    "train": lambda f, d, tmp: ("train", "--checkpoint", f["ckpt"], "--data", d, "--out", tmp / "run", *TINY_TRAIN),
    "train --valid": lambda f, d, tmp: (
        "train",
        "--checkpoint",
        f["ckpt"],
        "--data",
        f["valid"],
        "--valid",
        d,
        "--out",
        tmp / "run",
        *TINY_TRAIN,
    ),
    "evaluate": lambda f, d, tmp: ("evaluate", "--checkpoint", f["ckpt"], "--data", d),
    "measure-transference": lambda f, d, tmp: (
        "measure-transference",
        "--checkpoint",
        f["ckpt"],
        "--data",
        d,
        "--batches",
        "1",
    ),
}


@pytest.mark.parametrize("command", DATA_COMMANDS)
@pytest.mark.parametrize("kind", ["file", "glob", "empty-dir"])
def test_missing_data(cli, tmp_path, files, command, kind):
    if kind == "file":
        spec, words = tmp_path / "absent.parquet", "no such file or directory"
    elif kind == "glob":
        spec, words = f"{tmp_path}/absent-*.parquet", "matches no files"
    else:
        (tmp_path / "empty").mkdir()
        spec, words = tmp_path / "empty", "no *.parquet"
    assert_input_error(cli(*DATA_COMMANDS[command](files, spec, tmp_path)), spec, words)
    assert not (tmp_path / "m.safetensors").exists() and not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", [c for c in DATA_COMMANDS if c != "init"])
def test_binary_label_out_of_range(cli, tmp_path, files, bad_label_file, command):
    before = state(files["ckpt"])
    r = cli(*DATA_COMMANDS[command](files, bad_label_file, tmp_path))
    assert_input_error(r, bad_label_file, "'like'", "outside {0, 1}")
    assert not (tmp_path / "run").exists()  # no half-started run
    assert state(files["ckpt"]) == before


def test_binary_label_out_of_range_at_init(cli, tmp_path, bad_label_file):
    r = cli(
        "init",
        "--model",
        "mmoe",
        "--data",
        bad_label_file,
        "--tasks",
        "click,like",
        "--out",
        tmp_path / "m.safetensors",
    )
    assert_input_error(r, bad_label_file, "'like'", "--task-type like=regression")
    assert not (tmp_path / "m.safetensors").exists()


@pytest.mark.parametrize("command", [c for c in DATA_COMMANDS])
def test_quiet_error_is_exactly_one_line(cli, tmp_path, files, command):
    args = [*DATA_COMMANDS[command](files, tmp_path / "absent.parquet", tmp_path)]
    if "--quiet" not in args:
        args.append("--quiet")
    assert_input_error(cli(*args), tmp_path / "absent.parquet", quiet=True)


def test_data_missing_a_checkpoint_column(cli, tmp_path, files):
    path = tmp_path / "narrow.parquet"
    pq.write_table(pq.read_table(files["valid"]).drop_columns(["user_bucket"]), path)
    r = cli("evaluate", "--checkpoint", files["ckpt"], "--data", path)
    assert_input_error(r, path, "user_bucket")


DEVICE_COMMANDS = {
    "train": lambda f, dev, tmp: (
        "train",
        "--checkpoint",
        f["ckpt"],
        "--data",
        f["valid"],
        "--out",
        tmp / "run",
        "--max-steps",
        "1",
        "--device",
        dev,
    ),
    "evaluate": lambda f, dev, tmp: ("evaluate", "--checkpoint", f["ckpt"], "--data", f["valid"], "--device", dev),
    "measure-transference": lambda f, dev, tmp: (
        "measure-transference",
        "--checkpoint",
        f["ckpt"],
        "--data",
        f["valid"],
        "--device",
        dev,
    ),
}


@pytest.mark.parametrize("command", DEVICE_COMMANDS)
@pytest.mark.parametrize("device", ["gpu", "cuda:x", "CPU", ""])
def test_bad_device_value(cli, tmp_path, files, command, device):
    assert_input_error(
        cli(*DEVICE_COMMANDS[command](files, device, tmp_path)), "--device", "expected auto, cpu, cuda or cuda:N"
    )
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(CUDA, reason="this machine has CUDA")
@pytest.mark.parametrize("command", DEVICE_COMMANDS)
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_cuda_on_a_cpu_machine(cli, tmp_path, files, command, device):
    assert_input_error(
        cli(*DEVICE_COMMANDS[command](files, device, tmp_path)), f"--device {device}", "CUDA is not available"
    )


def test_unknown_method(cli, tmp_path, files):
    r = cli(
        "train",
        "--checkpoint",
        files["ckpt"],
        "--data",
        files["valid"],
        "--out",
        tmp_path / "run",
        "--method",
        "sgd-magic",
        *TINY_TRAIN,
    )
    assert_input_error(r, "unknown method 'sgd-magic'", "known methods:", "ew", "cograd", "gdod")
    assert not (tmp_path / "run").exists()


def test_unknown_method_option(cli, tmp_path, files):
    r = cli(
        "train",
        "--checkpoint",
        files["ckpt"],
        "--data",
        files["valid"],
        "--out",
        tmp_path / "run",
        "-o",
        "bogus=1",
        *TINY_TRAIN,
    )
    assert_input_error(r, "method 'ew' has no option bogus")


@pytest.mark.parametrize(
    "gamma, words",
    [
        ("click=1", "no value for task(s) like, share"),
        ("click=1,like=2,share=x", "'x' is not a number"),
        ("clack=1", "unknown task 'clack'"),
    ],
)
def test_bad_per_task_gamma(cli, tmp_path, files, gamma, words):
    r = cli(
        "train",
        "--checkpoint",
        files["ckpt"],
        "--data",
        files["valid"],
        "--out",
        tmp_path / "run",
        "--method",
        "cograd",
        "--gamma",
        gamma,
        *TINY_TRAIN,
    )
    assert_input_error(r, "--gamma", words)


@pytest.mark.parametrize(
    "option, value",
    [("--batch-size", "0"), ("--lr", "-1"), ("--epochs", "0"), ("--max-steps", "0"), ("--log-every", "0")],
)
def test_train_nonpositive_numbers(cli, tmp_path, files, option, value):
    args = [
        "train",
        "--checkpoint",
        files["ckpt"],
        "--data",
        files["valid"],
        "--out",
        tmp_path / "run",
        "--device",
        "cpu",
        option,
        value,
    ]
    assert_input_error(cli(*args), option, "must be positive")
    assert not (tmp_path / "run").exists()


def test_evaluate_and_measure_nonpositive_numbers(cli, files):
    assert_input_error(
        cli("evaluate", "--checkpoint", files["ckpt"], "--data", files["valid"], "--batch-size", "0"), "--batch-size"
    )
    base = ("measure-transference", "--checkpoint", files["ckpt"], "--data", files["valid"])
    assert_input_error(cli(*base, "--batches", "0"), "--batches")
    assert_input_error(cli(*base, "--lookahead-lr", "0"), "--lookahead-lr")
    assert_input_error(cli(*base, "--lookahead-lr", "nan"), "--lookahead-lr")


def test_unknown_model(cli, tmp_path, files):
    r = cli(
        "init",
        "--model",
        "transformer",
        "--data",
        files["valid"],
        "--tasks",
        "click",
        "--out",
        tmp_path / "m.safetensors",
    )
    # The known list also holds the rechub-* bridges when the optional extra is installed.
    assert_input_error(r, "unknown model 'transformer'", "known models: mmoe, ple, ")
    known = r.stderr.split("known models: ")[1].split(";")[0].strip().split(", ")
    assert {"mmoe", "ple", "shared-bottom"} <= set(known) and known == sorted(known)
    assert not (tmp_path / "m.safetensors").exists()


@pytest.mark.parametrize(
    "model, keys",
    [
        ("mmoe", "embedding_dim, num_experts, expert, tower, dropout"),
        ("ple", "num_levels"),
        ("shared-bottom", "bottom"),
    ],
)
def test_unknown_config_key(cli, tmp_path, files, model, keys):
    r = cli(
        "init",
        "--model",
        model,
        "--config",
        "experts=4",
        "--data",
        files["valid"],
        "--tasks",
        "click",
        "--out",
        tmp_path / "m.safetensors",
    )
    assert_input_error(r, f"model '{model}' has no config key experts", "its keys:", keys)
    assert not (tmp_path / "m.safetensors").exists()


@pytest.mark.parametrize(
    "config, words", [("num_experts", "expected KEY=VALUE"), ("expert=abc", "rejected its config")]
)
def test_bad_config_value(cli, tmp_path, files, config, words):
    r = cli(
        "init",
        "--model",
        "mmoe",
        "--config",
        config,
        "--data",
        files["valid"],
        "--tasks",
        "click",
        "--out",
        tmp_path / "m.safetensors",
    )
    assert_input_error(r, words)


def test_negative_config_value_is_an_input_error(cli, tmp_path, files):
    r = cli(
        "init",
        "--model",
        "mmoe",
        "--config",
        "num_experts=-1",
        "--data",
        files["valid"],
        "--tasks",
        "click",
        "--out",
        tmp_path / "m.safetensors",
    )
    assert_input_error(r, "num_experts")


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_zero_experts_is_rejected_at_init(cli, tmp_path, files):
    out = tmp_path / "m.safetensors"
    r = cli(
        "init",
        "--model",
        "mmoe",
        "--config",
        "num_experts=0",
        "--data",
        files["valid"],
        "--tasks",
        "click",
        "--out",
        out,
        "--quiet",
    )
    if r.exit_code == 0:  # accepted: then the checkpoint must at least be usable
        r = cli("evaluate", "--checkpoint", out, "--data", files["valid"])
        assert r.exit_code == 0, r.output
    else:
        assert_input_error(r, "num_experts")


@pytest.mark.parametrize(
    "tasks, words", [("click,clicks", "no column 'clicks'"), ("click,click", "named twice"), (",", "at least one")]
)
def test_init_bad_tasks(cli, tmp_path, files, tasks, words):
    r = cli("init", "--model", "mmoe", "--data", files["valid"], "--tasks", tasks, "--out", tmp_path / "m.safetensors")
    assert_input_error(r, words)
    if "clicks" in tasks:
        assert_input_error(r, files["valid"])
    assert not (tmp_path / "m.safetensors").exists()


@pytest.mark.parametrize("spec", ["clicks=binary", "click=ordinal", "click"])
def test_init_bad_task_type(cli, tmp_path, files, spec):
    r = cli(
        "init",
        "--model",
        "mmoe",
        "--data",
        files["valid"],
        "--tasks",
        "click",
        "--task-type",
        spec,
        "--out",
        tmp_path / "m.safetensors",
    )
    assert_input_error(r, "--task-type", spec)


def test_init_bad_overrides(cli, tmp_path, files):
    base = (
        "init",
        "--model",
        "mmoe",
        "--data",
        files["valid"],
        "--tasks",
        "click",
        "--out",
        tmp_path / "m.safetensors",
    )
    assert_input_error(cli(*base, "--dense", "device"), "'device'", "--dense")
    assert_input_error(cli(*base, "--dense", "f0", "--categorical", "f0"), "f0", "both --dense and --categorical")
    assert_input_error(cli(*base, "--features", "f0,nope"), "no column 'nope'")
    assert_input_error(cli(*base, "--max-vocab", "0"), "--max-vocab")


def test_train_out_already_holds_a_run(cli, tmp_path, files):
    out = tmp_path / "run"
    args = (
        "train",
        "--checkpoint",
        files["ckpt"],
        "--data",
        files["valid"],
        "--valid",
        files["valid"],
        "--out",
        out,
        *TINY_TRAIN,
    )
    assert cli(*args).exit_code == 0
    existing = tree_state(out)
    assert set(existing) == set(OUTPUTS)
    r = cli(*args, "--seed", "7")
    assert_input_error(r, f"--out {out}", "already holds a finished run", "--overwrite")
    assert tree_state(out) == existing
    r = cli(*args, "--seed", "7", "--overwrite")
    assert r.exit_code == 0, r.output
    assert (out / "last.safetensors").read_bytes() != existing["last.safetensors"][0]


def test_train_out_with_only_metrics_is_a_run(cli, tmp_path, files):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    (out / "notes.txt").write_text("mine")
    r = cli("train", "--checkpoint", files["ckpt"], "--data", files["valid"], "--out", out, *TINY_TRAIN)
    assert_input_error(r, "metrics.jsonl")
    assert (out / "metrics.jsonl").read_text() == '{"step": 1}\n'


def test_train_out_is_a_file(cli, tmp_path, files):
    out = tmp_path / "run"
    out.write_text("x")
    r = cli("train", "--checkpoint", files["ckpt"], "--data", files["valid"], "--out", out, *TINY_TRAIN)
    assert_input_error(r, f"--out {out}", "not a directory")
    assert out.read_text() == "x"


def test_train_into_a_fresh_directory_with_unrelated_files(cli, tmp_path, files):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    r = cli("train", "--checkpoint", files["ckpt"], "--data", files["valid"], "--out", out, *TINY_TRAIN)
    assert r.exit_code == 0, r.output
    assert (out / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
    "args, words",
    [
        (("--rows", "0"), "--rows and --valid-rows must be positive"),
        (("--valid-rows", "-5"), "--rows and --valid-rows must be positive"),
        (("--tasks", "click=2"), "relatedness must be in [-1, 1]"),
        (("--tasks", "click=x"), "--tasks item"),
        (("--tasks", "click=1:1.5"), "0 < RATE < 1"),
    ],
)
def test_sample_data_bad_options(cli, tmp_path, args, words):
    r = cli("sample-data", "--out", tmp_path / "s", *args)
    assert_input_error(r, words)
    assert not (tmp_path / "s").exists()


def test_sample_data_out_is_a_file(cli, tmp_path):
    out = tmp_path / "taken"
    out.write_text("x")
    r = cli("sample-data", "--out", out, "--rows", "10", "--valid-rows", "10")
    assert_input_error(r, out)


def test_init_out_is_a_directory(cli, tmp_path, files):
    out = tmp_path / "adir"
    out.mkdir()
    r = cli("init", "--model", "mmoe", "--data", files["valid"], "--tasks", "click", "--out", out, "--overwrite")
    assert_input_error(r, out)


@pytest.mark.parametrize("kind", ["models", "methods"])
def test_registry_commands_bad_plugin_path(cli, tmp_path, kind):
    assert_input_error(cli(kind, "--plugin-path", tmp_path / "nope"), tmp_path / "nope", "not a directory")


def test_click_usage_errors_exit_2_without_stdout(cli, files):
    r = cli("evaluate", "--data", files["valid"])  # missing required --checkpoint
    assert r.exit_code == 2 and r.stdout == "" and "--checkpoint" in r.stderr
    r = cli("evaluate", "--checkpoint", files["ckpt"], "--data", files["valid"], "--batch-size", "many")
    assert r.exit_code == 2 and r.stdout == "" and "--batch-size" in r.stderr
    r = cli("frobnicate")
    assert r.exit_code == 2 and r.stdout == ""


# ---------------------------------------------------------------------------- unexpected failures (exit 1) and --debug


def _boom(*args, **kwargs):
    raise RuntimeError("boom in the library")


def test_unexpected_exception_is_one_line_exit_1(cli, files, monkeypatch):
    import cogradctl.evaluate

    monkeypatch.setattr(cogradctl.evaluate, "evaluate", _boom)
    r = cli("evaluate", "--checkpoint", files["ckpt"], "--data", files["valid"], "--json")
    assert r.exit_code == 1, r.output
    assert r.stdout == ""
    assert r.stderr.count("\n") == 1
    assert r.stderr.startswith("unexpected error: RuntimeError: boom in the library")
    assert "COGRADCTL_DEBUG=1" in r.stderr
    assert "Traceback" not in r.output


def test_unexpected_exception_in_inspect(cli, files, monkeypatch):
    monkeypatch.setattr(ckpt_io, "load", _boom)
    r = cli("inspect", files["ckpt"])
    assert r.exit_code == 1 and r.stdout == "" and r.stderr.count("\n") == 1 and "RuntimeError" in r.stderr


def test_debug_switch_raises_with_traceback(cli, files, monkeypatch):
    import cogradctl.evaluate

    monkeypatch.setattr(cogradctl.evaluate, "evaluate", _boom)
    monkeypatch.setitem(cli_module.DEBUG, "on", True)
    r = cli("evaluate", "--checkpoint", files["ckpt"], "--data", files["valid"])
    assert r.exit_code == 1
    assert isinstance(r.exception, RuntimeError) and str(r.exception) == "boom in the library"
    assert r.exc_info[2] is not None  # a traceback object to show
    with pytest.raises(RuntimeError, match="boom"):
        cli("evaluate", "--checkpoint", files["ckpt"], "--data", files["valid"], catch_exceptions=False)


def test_debug_option(cli, files, monkeypatch):
    import cogradctl.evaluate

    monkeypatch.setattr(cogradctl.evaluate, "evaluate", _boom)
    r = cli("--debug", "evaluate", "--checkpoint", files["ckpt"], "--data", files["valid"])
    assert isinstance(r.exception, RuntimeError)
    # input errors, too, show where they come from under --debug
    r = cli("--debug", "inspect", files["train"])
    assert type(r.exception).__name__ == "CheckpointError"


def test_debug_environment_variable_in_a_real_process(tmp_path, files):
    """COGRADCTL_DEBUG is read at start-up: check it through the real entry point (one process: slow)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COGRADCTL_")}
    cmd = [sys.executable, "-m", "cogradctl", "inspect", str(files["train"])]
    debug = subprocess.run(cmd, capture_output=True, text=True, env={**env, "COGRADCTL_DEBUG": "1"}, timeout=60)
    assert debug.returncode != 0
    assert "Traceback" in debug.stderr and "CheckpointError" in debug.stderr
    assert str(files["train"]) in debug.stderr
    assert debug.stdout == ""
