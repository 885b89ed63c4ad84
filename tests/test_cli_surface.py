"""The command line's surface (issue #25): parsing errors as one ``error:`` line, --help that reads
well at 80 and 120 columns, and the detail views of ``methods NAME`` / ``models NAME``."""

from __future__ import annotations

import re

import pytest

from cogradctl import cli as cli_module
from tests.conftest import TINY_MMOE, VALID_ROWS

COMMANDS = [
    [],
    ["init"],
    ["import"],
    ["train"],
    ["evaluate"],
    ["predict"],
    ["export"],
    ["measure-transference"],
    ["inspect"],
    ["models"],
    ["methods"],
    ["bench"],
    ["sample-data"],
    ["data"],
    ["data", "prepare"],
    ["data", "prepare", "census-kdd"],
]


def one_error_line(result, *needles):
    """Exit 2, nothing on stdout, exactly one line on stderr: ``error: …`` holding every needle."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# ---------------------------------------------------------------------------- parsing errors (item 5)


def test_misspelt_option_is_one_line_with_the_closest_option(cli):
    line = one_error_line(cli("train", "--epoch", "3"), "--epoch", "did you mean --epochs?")
    assert "╭" not in line and "Usage" not in line


def test_missing_option_is_one_line_naming_it(cli, tmp_path):
    one_error_line(cli("evaluate", "--checkpoint", tmp_path / "c.safetensors"), "missing option", "--data")
    one_error_line(cli("inspect"), "missing argument", "CHECKPOINT")


def test_bad_value_type_is_one_line_naming_the_option(cli, tmp_path):
    r = cli("evaluate", "--checkpoint", tmp_path / "c", "--data", tmp_path / "d", "--batch-size", "many")
    one_error_line(r, "--batch-size", "--help")


def test_unknown_command_suggests_the_closest(cli):
    one_error_line(cli("trian"), "no such command 'trian'", "did you mean 'train'?")
    one_error_line(cli("frobnicate"), "no such command 'frobnicate'", "--help")


def test_option_with_no_close_match_points_to_the_help(cli):
    one_error_line(cli("inspect", "x", "--zzzzzz"), "no such option --zzzzzz", "inspect --help")


# ---------------------------------------------------------------------------- --help (item 5)


def _help(cli, command: list[str], columns: int) -> str:
    r = cli(*command, "--help", env={"COLUMNS": str(columns)})
    assert r.exit_code == 0, (command, r.output)
    return r.stdout


@pytest.mark.parametrize("columns", [80, 120])
@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "root")
def test_help_has_no_bool_placeholders_boxes_or_hard_breaks(cli, command, columns):
    text = _help(cli, command, columns)
    assert "<bool>" not in text and "<list[" not in text
    assert "[default: no-" not in " ".join(text.split()), "an off-by-default --x/--no-x flag says nothing more"
    assert not set("╭╮╰╯│") & set(text), "rich's boxed panels are gone"
    assert all(len(line) <= columns for line in text.splitlines())
    # Every paragraph of prose (the description and the exit codes, indented by two spaces) is
    # filled: a line is only broken where the next word would not have fitted on it.
    width = max(len(line) for line in text.splitlines())
    for line, after in zip(text.splitlines(), text.splitlines()[1:]):
        prose = line.startswith("  ") and not line.startswith("   ") and not line.lstrip().startswith("-")
        continued = after.startswith("  ") and not after.startswith("   ") and after.strip()
        if prose and continued and not after.lstrip().startswith("-"):
            first_word = after.split()[0]
            assert len(line) + 1 + len(first_word) > min(width, 78), f"hard line break after {line!r}"


def test_train_help_marks_its_required_options(cli):
    text = " ".join(_help(cli, ["train"], 120).split())
    for option in ("--checkpoint", "--data", "--out"):
        entry = text.split(f"{option} <")[1].split(" --")[0]
        assert "required" in entry, (option, entry)


def test_train_help_flags_have_no_placeholder_and_say_what_they_are(cli):
    text = _help(cli, ["train"], 80)
    assert re.search(r"^  --resume / --no-resume\s", text, re.M)
    assert "[default: no-resume]" not in text
    assert "-o, --option <str>" in text


def test_root_help_lists_each_command_with_its_whole_first_sentence(cli):
    text = " ".join(_help(cli, [], 80).split("Commands:")[1].split())
    assert "Create a checkpoint with fresh weights: infer the schema from Parquet and build the model." in text
    assert "..." not in text


def test_no_arguments_shows_the_help():
    from typer.testing import CliRunner

    r = CliRunner().invoke(cli_module.app, [])
    assert "Usage:" in r.output and "Commands:" in r.output


# ---------------------------------------------------------------------------- misleading errors (item 13)


def test_a_run_directory_as_checkpoint_names_its_checkpoints(cli, tmp_path, base_checkpoint):
    run = tmp_path / "run"
    run.mkdir()
    (run / "best.safetensors").write_bytes(base_checkpoint.read_bytes())
    (run / "last.safetensors").write_bytes(base_checkpoint.read_bytes())
    line = one_error_line(cli("inspect", run), str(run), "a directory")
    assert f"{run / 'best.safetensors'} or {run / 'last.safetensors'}" in line
    (run / "best.safetensors").unlink()
    line = one_error_line(cli("inspect", run))
    assert str(run / "last.safetensors") in line and "best.safetensors" not in line
    empty = tmp_path / "empty"
    empty.mkdir()
    line = one_error_line(cli("inspect", empty), str(empty), "a directory", ".safetensors file of init")


def test_a_parquet_file_as_checkpoint_is_named_as_one(cli, sample_dir):
    path = sample_dir / "valid.parquet"
    line = one_error_line(cli("inspect", path), str(path), "a Parquet file, not a checkpoint", "--data")
    assert "header too large" not in line


def test_a_torch_save_file_as_checkpoint_points_to_import(cli, tmp_path):
    import torch

    path = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(2)}, path)
    one_error_line(cli("inspect", path), str(path), "torch.save", "cogradctl import --weights")


def test_a_misspelt_method_gets_the_closest_one(cli, tmp_path, base_checkpoint, sample_dir):
    data = sample_dir / "valid.parquet"
    r = cli("train", "--checkpoint", base_checkpoint, "--data", data, "--out", tmp_path / "r", "--method", "cogard")
    assert r.exit_code == 2 and r.stdout == "", r.output
    assert "unknown method 'cogard'; did you mean 'cograd'?; known methods: " in r.stderr.splitlines()[-1]
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------------------- methods / models (item 12)


def test_methods_list_shows_whole_names_and_no_raw_markup_at_80_columns(cli):
    from cogradctl import registry

    r = cli("methods", env={"COLUMNS": "80"})
    assert r.exit_code == 0, r.output
    assert all(len(line) <= 80 for line in r.stdout.splitlines())
    names = sorted(registry.discover("methods"))
    assert "aligned-mtl" in names and "metabalance" in names
    first_cells = {line.split("│")[1].strip() for line in r.stdout.splitlines() if line.startswith("│")}
    assert set(names) <= first_cells, set(names) - first_cells
    assert "`" not in r.stdout and "…" not in r.stdout
    assert "Σ_i w_i g_i" in " ".join(r.stdout.split())  # weighted's ``Σ_i w_i g_i``, as text


def test_methods_name_shows_each_option_with_type_default_and_meaning(cli):
    r = cli("methods", "cograd", env={"COLUMNS": "80"})
    assert r.exit_code == 0, r.output
    text = r.stdout
    assert "SIGIR 2023" in text and "family: transference" in text
    for option, default in (
        ("gamma", "0.1"),
        ("hessian", '"diag"'),
        ("normalize", '"relative"'),
        ("fisher_decay", "0.9"),
    ):
        row = next(line for line in text.splitlines() if line.startswith(option + " "))
        assert row.split()[2] == default, row
    assert "strength of the transference term" in text
    assert "`" not in text and ">>>" not in text  # the docstring's literals as text, its doctests left out
    assert all(len(line) <= 80 for line in text.splitlines() if not line.startswith("    "))


def test_methods_name_json(cli):
    r = cli("methods", "gdod", "--json")
    assert r.exit_code == 0, r.output
    import json

    doc = json.loads(r.stdout)
    assert doc["name"] == "gdod" and doc["source"] == "built-in" and doc["family"] == "gradient manipulation"
    options = {o["name"]: o for o in doc["options"]}
    assert list(options) == ["weights", "eps", "beta", "granularity"]
    assert (
        options["eps"]
        == {
            "name": "eps",
            "type": "float",
            "default": 1e-8,
            "meaning": options["eps"]["meaning"],
        }
        and "eigenvalue" in options["eps"]["meaning"]
    )
    assert options["granularity"]["default"] == "global" and options["weights"]["type"] == "float"


def test_models_name_lists_the_config_keys_with_defaults(cli):
    import json

    from cogradctl import models, registry

    r = cli("models", "mmoe", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    expected = models.config_options(registry.lookup("models", "mmoe"))
    assert {o["name"]: o["default"] for o in doc["options"]} == expected
    assert {o["name"]: o["type"] for o in doc["options"]}["expert"] == "list[int]"
    r = cli("models", "mmoe")
    assert r.exit_code == 0 and "--config KEY=VALUE" in r.stdout and "num_experts" in r.stdout


@pytest.mark.parametrize("kind, typo, meant", [("methods", "cogard", "cograd"), ("models", "mmeo", "mmoe")])
def test_detail_of_a_misspelt_name_suggests_the_closest(cli, kind, typo, meant):
    one_error_line(cli(kind, typo), f"unknown {kind[:-1]} '{typo}'", f"did you mean '{meant}'?")


def test_detail_of_a_plugin_file_method_without_declared_options(cli, tmp_path):
    d = tmp_path / "plugins"
    d.mkdir()
    (d / "mine.py").write_text(
        'class Halve:\n    """Half the **sum** of the ``task`` gradients.\n\n    More text\n    here.\n    """\n\n'
        "    def __init__(self, **options):\n        pass\n\n\nMETHODS = {'halve': Halve}\n"
    )
    r = cli("methods", "halve", "--plugin-path", d)
    assert r.exit_code == 0, r.output
    assert "Half the sum of the task gradients." in r.stdout and "More text here." in r.stdout
    assert f"file {d / 'mine.py'}" in r.stdout and "no options" in r.stdout
    r = cli("methods", "--plugin-path", d, env={"COLUMNS": "120"})
    assert r.exit_code == 0 and "Half the sum of the task gradients." in r.stdout
    squeezed = re.sub(r"[│\s]", "", r.stdout)  # the table's cells, wrapped or folded, read as one string
    assert f"(file{d / 'mine.py'})" in squeezed  # where a plugin that is not built in comes from
    assert all(len(line) <= 120 for line in r.stdout.splitlines())


def test_plain_text_of_a_docstring():
    from cogradctl.registry import plain

    doc = """Sum: ``Σ_i g_i``, `x` and **bold**.

    A paragraph
    over two lines.

    * an item
      continued
    * another

        indented = formula  # kept

    >>> 1 + 1
    2
    """
    assert plain(doc) == (
        "Sum: Σ_i g_i, x and bold.\n\nA paragraph over two lines.\n\n* an item continued\n* another\n\n"
        "    indented = formula  # kept"
    )


# ---------------------------------------------------------------------------- evaluate (items 6 and 14)


def test_evaluate_shows_only_the_columns_of_the_task_types_present(cli, base_checkpoint, sample_dir):
    r = cli("evaluate", "--checkpoint", base_checkpoint, "--data", sample_dir / "valid.parquet", "--quiet")
    assert r.exit_code == 0, r.output
    header = next(line for line in r.stdout.splitlines() if "task" in line and "auc" in line)
    assert "logloss" in header and "± se" in header
    assert "mse" not in header and "mae" not in header  # every task is binary


def test_evaluate_mixed_and_regression_only_columns(cli, tmp_path, sample_dir):
    data = sample_dir / "valid.parquet"
    for tasks, types, present, absent in (
        ("click,share", ["--task-type", "share=regression"], ["auc", "logloss", "mse", "mae"], []),
        ("share", ["--task-type", "share=regression"], ["mse", "mae"], ["auc", "logloss", "± se"]),
    ):
        out = tmp_path / f"{tasks.replace(',', '_')}.safetensors"
        r = cli("init", "--model", "mmoe", *TINY_MMOE, "--data", data, "--tasks", tasks, *types, "--out", out, "-q")
        assert r.exit_code == 0, r.output
        r = cli("evaluate", "--checkpoint", out, "--data", data, "--quiet")
        assert r.exit_code == 0, r.output
        header = next(line for line in r.stdout.splitlines() if "task" in line)
        assert all(c in header for c in present) and not any(c in header for c in absent), header


def test_evaluate_reports_progress_in_rows(cli, base_checkpoint, sample_dir, monkeypatch):
    """The bar (drawn only on a terminal, by console.Log.progress) is told the rows and advanced by
    every batch's rows."""
    from contextlib import contextmanager

    from cogradctl import console

    seen = {"total": None, "done": 0, "calls": 0}

    @contextmanager
    def progress(self, description, total):
        seen["total"], seen["description"] = total, description

        def advance(n=1, **fields):
            seen["done"] += n
            seen["calls"] += 1

        yield advance

    monkeypatch.setattr(console.Log, "progress", progress)
    data = sample_dir / "valid.parquet"
    r = cli("evaluate", "--checkpoint", base_checkpoint, "--data", data, "--batch-size", "128", "--json")
    assert r.exit_code == 0, r.output
    assert seen["total"] == VALID_ROWS and seen["done"] == VALID_ROWS and seen["calls"] == -(-VALID_ROWS // 128)
    assert "evaluate base.safetensors" == seen["description"]


def test_evaluate_without_a_terminal_prints_no_progress(cli, base_checkpoint, sample_dir):
    r = cli("evaluate", "--checkpoint", base_checkpoint, "--data", sample_dir / "valid.parquet", "--json")
    assert r.exit_code == 0 and r.stderr == "", r.stderr


def test_a_directory_of_csv_files_says_csv_is_not_read_and_how_to_convert(cli, tmp_path, base_checkpoint, sample_dir):
    import subprocess
    import sys

    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    d = tmp_path / "csvs"
    d.mkdir()
    pcsv.write_csv(pq.read_table(sample_dir / "valid.parquet"), d / "part-0.csv")
    r = cli("evaluate", "--checkpoint", base_checkpoint, "--data", d, "--quiet")
    line = one_error_line(r, str(d), "no *.parquet files", "CSV is not read", str(d / "part-0.csv"))
    code = line.split('python -c "')[1].rsplit('"', 1)[0]
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)  # the suggested conversion works
    assert (d / "part-0.parquet").is_file()
    r = cli("evaluate", "--checkpoint", base_checkpoint, "--data", d, "--json")
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("spec", ["part-0.csv", "*.csv"])
def test_a_csv_file_named_or_matched_is_refused_as_csv(cli, tmp_path, base_checkpoint, spec):
    """Not as an unreadable Parquet file (pyarrow's 'magic bytes not found in footer')."""
    (tmp_path / "part-0.csv").write_text("click,like\n1,0\n")
    r = cli("evaluate", "--checkpoint", base_checkpoint, "--data", str(tmp_path / spec), "--quiet")
    line = one_error_line(r, str(tmp_path / "part-0.csv"), "a CSV file", "CSV is not read", "p.write_table")
    assert "magic bytes" not in line


def test_an_empty_directory_gets_no_csv_hint(cli, tmp_path, base_checkpoint):
    (tmp_path / "empty").mkdir()
    line = one_error_line(cli("evaluate", "--checkpoint", base_checkpoint, "--data", tmp_path / "empty"))
    assert "no *.parquet files" in line and "CSV" not in line


def test_detail_of_a_method_whose_options_attribute_is_not_a_dict(cli, tmp_path):
    import json

    d = tmp_path / "plugins"
    d.mkdir()
    (d / "odd.py").write_text(
        "class Odd:\n    options = ['x']\n\n    def __init__(self, x: int = 3, *, y=None):\n        pass\n\n\n"
        "METHODS = {'odd': Odd}\n"
    )
    r = cli("methods", "odd", "--plugin-path", d, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["options"] == [
        {"name": "x", "type": "int", "default": 3, "meaning": ""},
        {"name": "y", "type": "", "default": None, "meaning": ""},
    ]
