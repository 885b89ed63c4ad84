"""Plugin discovery (entry points, plugin files, COGRADCTL_PLUGIN_PATH) and the model plugin contract."""

from __future__ import annotations

import json
import os
import textwrap

import pytest
import torch

from cogradctl import data, models, registry, taskgrad
from cogradctl.errors import PluginError

TASKS = ["click", "like", "share"]
BINARY = {t: "binary" for t in TASKS}

TINY_PLUGIN = '''
"""A plugin file for the tests."""
import torch
from torch import nn

from cogradctl.layers import FeatureInput, Tower, owned_by_prefix


class Tiny(nn.Module):
    def __init__(self, schema, width):
        super().__init__()
        self.tasks = schema.task_names
        self.input = FeatureInput(schema, 4)
        self.shared = nn.Linear(self.input.out_dim, width)
        self.towers = nn.ModuleDict({t: Tower(width, []) for t in self.tasks})

    def forward(self, batch):
        h = torch.relu(self.shared(self.input(batch)))
        return {t: self.towers[t](h) for t in self.tasks}

    def task_parameters(self):
        return owned_by_prefix(self, {t: (f"towers.{t}.",) for t in self.tasks})


def build(schema, width: int = 4):
    """A tiny test model: one shared layer, a linear head per task."""
    return Tiny(schema, width)


class Halve:
    """Half the sum of the task gradients."""

    options = {}

    def __init__(self, **options):
        pass


MODELS = {NAME: build}
METHODS = {"halve": Halve}
'''


def plugin_dir(root, files: dict[str, str]):
    root.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (root / name).write_text(textwrap.dedent(text))
    return root


def tiny(name="tiny") -> str:
    return TINY_PLUGIN.replace("NAME", repr(name))


# ---------------------------------------------------------------------------- built-ins and lookups


def test_builtin_models_are_discovered():
    found = registry.discover("models")
    for name in ("shared-bottom", "mmoe", "ple"):
        entry = found[name]
        assert entry.source == "built-in", name
        assert entry.error is None and entry.duplicates == []
        assert callable(entry.factory) and entry.description
        assert registry.lookup("models", name) is entry.factory


def test_builtin_methods_are_discovered():
    found = registry.discover("methods")
    for name in ("ew", "cograd"):
        assert found[name].source == "built-in"
        assert found[name].error is None and found[name].factory is not None
        assert registry.lookup("methods", name) is found[name].factory


@pytest.mark.parametrize("kind, known", [("models", ["mmoe", "ple", "shared-bottom"]), ("methods", ["cograd", "ew"])])
def test_unknown_name_lists_the_known_ones(kind, known):
    with pytest.raises(PluginError, match=f"unknown {kind[:-1]} 'nope'") as err:
        registry.lookup(kind, "nope")
    listed = str(err.value).split(f"known {kind}: ")[1].split(";")[0].split(", ")  # before any failed plugins
    assert set(known) <= set(listed)
    assert listed == sorted(listed)
    assert PluginError.exit_code == 2


def test_build_rejects_unknown_config_keys(sample_dir):
    schema, _ = data.infer_schema(str(sample_dir / "valid.parquet"), TASKS, BINARY)
    from cogradctl.errors import UsageError

    with pytest.raises(UsageError, match="no config key experts") as err:
        models.build("mmoe", schema, {"experts": 3})
    for key in ("num_experts", "expert", "tower", "embedding_dim", "dropout"):
        assert key in str(err.value)


# ---------------------------------------------------------------------------- plugin files


def test_plugin_file_is_discovered(tmp_path, sample_dir):
    d = plugin_dir(tmp_path / "plugins", {"tiny_plugin.py": tiny(), "notes.txt": "ignored"})
    found = registry.discover("models", [str(d)])
    entry = found["tiny"]
    assert entry.source == f"file {d / 'tiny_plugin.py'}"
    assert entry.error is None
    assert entry.description == "A tiny test model: one shared layer, a linear head per task."
    assert {"mmoe", "ple", "shared-bottom"} <= set(found)  # the built-ins are still there
    assert "tiny" not in registry.discover("models")  # only with the path
    methods = registry.discover("methods", [str(d)])
    assert methods["halve"].source == f"file {d / 'tiny_plugin.py'}"
    schema, _ = data.infer_schema(str(sample_dir / "valid.parquet"), TASKS, BINARY)
    net, effective = models.build("tiny", schema, {"width": 3}, [str(d)])
    assert effective == {"width": 3}
    assert net.shared.out_features == 3
    assert models.config_options(registry.lookup("models", "tiny", [str(d)])) == {"width": 4}


def test_plugin_model_through_the_cli(tmp_path, sample_dir, cli):
    d = plugin_dir(tmp_path / "plugins", {"tiny_plugin.py": tiny()})
    out = tmp_path / "tiny.safetensors"
    r = cli(
        "init",
        "--model",
        "tiny",
        "--config",
        "width=5",
        "--plugin-path",
        d,
        "--data",
        sample_dir / "valid.parquet",
        "--tasks",
        "click,like",
        "--out",
        out,
        "--json",
        "--quiet",
    )
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["config"] == {"width": 5}
    # inspect reads the file alone: without the plugin it describes it all the same, with a warning
    r = cli("inspect", out, "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["tasks"] == {"click": "binary", "like": "binary"} and doc["config"] == {"width": 5}
    assert doc["parameters"] is None and doc["stored_elements"] > 0 and "unknown model 'tiny'" in doc["plugin_error"]
    assert "warning:" in r.stderr and "--plugin-path" in r.stderr
    r = cli("inspect", out)
    assert r.exit_code == 0 and "stored weight elements" in r.stdout and "click (binary)" in r.stdout, r.output
    r = cli("inspect", out, "--plugin-path", d, "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["plugin_error"] is None and set(doc["parameters"]["tasks"]) == {"click", "like"}
    assert doc["parameters"]["total"] == doc["stored_elements"]  # the tiny model has no buffers
    # a command that needs the model says how to give it the plugin
    r = cli("evaluate", "--checkpoint", out, "--data", sample_dir / "valid.parquet", "--quiet")
    assert r.exit_code == 2 and r.stdout == "" and len(r.stderr.splitlines()) == 1, r.output
    for needle in ("unknown model 'tiny'", str(out), "--plugin-path DIR", "COGRADCTL_PLUGIN_PATH", "known models:"):
        assert needle in r.stderr, (needle, r.stderr)


def test_broken_plugin_is_reported_and_others_still_load(tmp_path, cli):
    d = plugin_dir(
        tmp_path / "plugins",
        {
            "a_broken.py": "raise RuntimeError('needs libfoo')\n",
            "b_syntax.py": "def oops(:\n",
            "c_tiny.py": tiny(),
        },
    )
    for _ in range(2):  # a failed import is not cached as a half-initialised module
        found = registry.discover("models", [str(d)])
        assert found["a_broken"].error == "RuntimeError: needs libfoo"
        assert found["a_broken"].source == f"file {d / 'a_broken.py'}"
        assert found["b_syntax"].error.startswith("SyntaxError")
        assert found["tiny"].error is None and found["tiny"].factory is not None
        assert found["mmoe"].error is None
    with pytest.raises(PluginError, match="failed to load: RuntimeError: needs libfoo") as err:
        registry.lookup("models", "a_broken", [str(d)])
    assert str(d / "a_broken.py") in str(err.value)
    assert callable(registry.lookup("models", "tiny", [str(d)]))
    with pytest.raises(PluginError) as err:
        registry.lookup("models", "nope", [str(d)])
    known = str(err.value).split("known models: ")[1].split(";")[0]
    assert "tiny" in known and "a_broken" not in known  # only loadable names are offered as known
    assert "failed to load" in str(err.value) and "needs libfoo" in str(err.value)  # broken ones are named apart
    r = cli("models", "--plugin-path", d, "--json")
    assert r.exit_code == 0, r.output
    rows = {row["name"]: row for row in json.loads(r.stdout)["models"]}
    assert rows["a_broken"]["status"] == "failed to load: RuntimeError: needs libfoo"
    assert rows["tiny"]["status"] == "ok" and rows["mmoe"]["status"] == "ok"
    r = cli("models", "--plugin-path", d)  # the table shows it too
    assert r.exit_code == 0 and "needs libfoo" in r.stdout


def test_broken_plugin_file_is_named_by_the_models_it_registers(tmp_path, sample_dir, cli):
    """A plugin file named otherwise than its model, whose library is missing: the error says so.

    Before, asking for the model gave "unknown model 'team-mmoe'" and only 'cogradctl models'
    showed the import error (the failure was recorded under the file's name, team_models).
    """
    d = plugin_dir(
        tmp_path / "plugins",
        {
            "team_models.py": "import no_such_library_xyz\n\nMODELS = {'team-mmoe': None}\nMODELS['team-ple'] = None\n",
            "only_methods.py": "import no_such_library_xyz\nMETHODS = {'my-method': None}\n",
        },
    )
    found = registry.discover("models", [str(d)])
    assert found["team-mmoe"].error == "ModuleNotFoundError: No module named 'no_such_library_xyz'"
    assert found["team-ple"].error == found["team-mmoe"].error
    assert "team_models" not in found and "only_methods" not in found and "my-method" not in found
    assert registry.discover("methods", [str(d)])["my-method"].error.startswith("ModuleNotFoundError")
    out = tmp_path / "x.safetensors"
    for cmd in (
        ("init", "--data", sample_dir / "valid.parquet", "--tasks", "click", "--out", out),
        (
            "import",
            "--weights",
            tmp_path / "w.pt",
            "--data",
            sample_dir / "valid.parquet",
            "--tasks",
            "click",
            "--out",
            out,
        ),
    ):
        r = cli(*cmd, "--model", "team-mmoe", "--plugin-path", d)
        assert r.exit_code == 2, r.output
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "unknown" not in lines[0], lines
        assert "model 'team-mmoe'" in lines[0] and "failed to load" in lines[0]
        assert "No module named 'no_such_library_xyz'" in lines[0] and str(d / "team_models.py") in lines[0]
        assert r.stdout == "" and not out.exists()


def test_factory_that_imports_lazily_is_a_plugin_error(tmp_path, sample_dir, cli):
    d = plugin_dir(
        tmp_path / "plugins",
        {"lazy.py": "def build(schema):\n    import no_such_library_xyz\n\n\nMODELS = {'lazy': build}\n"},
    )
    out = tmp_path / "x.safetensors"
    r = cli(
        "init",
        "--model",
        "lazy",
        "--plugin-path",
        d,
        "--data",
        sample_dir / "valid.parquet",
        "--tasks",
        "click",
        "--out",
        out,
    )
    assert r.exit_code == 2, r.output
    assert "model plugin 'lazy' failed to load: ModuleNotFoundError" in r.stderr and not out.exists()


def test_duplicate_name_is_an_error_naming_both_sources(tmp_path, sample_dir, base_checkpoint, cli):
    d = plugin_dir(tmp_path / "plugins", {"fake_mmoe.py": tiny("mmoe")})
    path = d / "fake_mmoe.py"
    found = registry.discover("models", [str(d)])
    assert found["mmoe"].source == "built-in"
    assert found["mmoe"].duplicates == [f"file {path}"]
    with pytest.raises(PluginError, match="registered more than once") as err:
        registry.lookup("models", "mmoe", [str(d)])
    assert "built-in" in str(err.value) and str(path) in str(err.value)
    assert callable(registry.lookup("models", "ple", [str(d)]))  # other names are unaffected
    r = cli("models", "--plugin-path", d, "--json")
    assert r.exit_code == 0, r.output
    rows = {row["name"]: row for row in json.loads(r.stdout)["models"]}
    assert rows["mmoe"]["status"] == f"duplicate name, also from file {path}"
    assert rows["ple"]["status"] == "ok"
    args = ("--data", sample_dir / "valid.parquet", "--tasks", "click", "--out", tmp_path / "x.safetensors")
    r = cli("init", "--model", "mmoe", *args, "--plugin-path", d)
    assert r.exit_code == 2, r.output
    assert "registered more than once" in r.stderr and str(path) in r.stderr and "built-in" in r.stderr
    assert r.stdout == ""
    assert not (tmp_path / "x.safetensors").exists()
    # inspect needs nothing from the plugin: it describes the checkpoint and warns
    r = cli("inspect", base_checkpoint, "--plugin-path", d)
    assert r.exit_code == 0, r.output
    assert "warning:" in r.stderr and "registered more than once" in r.stderr and str(path) in r.stderr
    assert "model mmoe" in r.stdout


def test_duplicate_between_two_plugin_files(tmp_path):
    d = plugin_dir(tmp_path / "plugins", {"one.py": tiny("twin"), "two.py": tiny("twin")})
    with pytest.raises(PluginError) as err:
        registry.lookup("models", "twin", [str(d)])
    assert str(d / "one.py") in str(err.value) and str(d / "two.py") in str(err.value)


def test_plugin_path_from_the_environment(tmp_path, monkeypatch, cli):
    d1 = plugin_dir(tmp_path / "p1", {"t1.py": tiny("env-one")})
    d2 = plugin_dir(tmp_path / "p2", {"t2.py": tiny("env-two")})
    monkeypatch.setenv("COGRADCTL_PLUGIN_PATH", os.pathsep.join([str(d1), str(d2)]))
    found = registry.discover("models")
    assert found["env-one"].source == f"file {d1 / 't1.py'}"
    assert found["env-two"].source == f"file {d2 / 't2.py'}"
    r = cli("models", "--json")
    assert r.exit_code == 0, r.output
    assert {"env-one", "env-two"} <= {row["name"] for row in json.loads(r.stdout)["models"]}
    monkeypatch.setenv("COGRADCTL_PLUGIN_PATH", str(tmp_path / "missing"))
    with pytest.raises(PluginError, match="not a directory"):
        registry.discover("models")


def test_plugin_path_that_is_not_a_directory(tmp_path, cli):
    for kind in ("models", "methods"):
        r = cli(kind, "--plugin-path", tmp_path / "missing", "--json")
        assert r.exit_code == 2
        assert r.stdout == ""
        assert str(tmp_path / "missing") in r.stderr and "not a directory" in r.stderr
        assert "Traceback" not in r.output


@pytest.mark.parametrize("kind", ["models", "methods"])
def test_registry_json_is_one_document(cli, kind):
    r = cli(kind, "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)  # json.loads refuses trailing data, so this is exactly one document
    assert list(doc) == [kind]
    rows = doc[kind]
    names = [row["name"] for row in rows]
    assert names == sorted(names)
    expected = {"shared-bottom", "mmoe", "ple"} if kind == "models" else {"ew", "cograd"}
    assert expected <= set(names)
    for row in rows:
        assert {"name", "source", "description", "status"} <= set(row)
        if row["name"] in expected:
            assert row["source"] == "built-in" and row["status"] == "ok"
        if kind == "models":  # a plugin that failed to load (an optional extra missing) has no readable config
            assert isinstance(row["config"], dict) if row["status"] == "ok" else row["config"] is None
        else:
            assert {"family", "paper", "options"} <= set(row)
    if kind == "models":
        mmoe = next(r for r in rows if r["name"] == "mmoe")
        assert mmoe["config"]["num_experts"] == 8 and mmoe["config"]["expert"] == [64]


# ---------------------------------------------------------------------------- the model plugin contract


@pytest.fixture(scope="module")
def batch(sample_dir):
    schema, _ = data.infer_schema(str(sample_dir / "train.parquet"), TASKS, BINARY)
    inputs, labels = data.load(str(sample_dir / "train.parquet"), schema).batch(slice(0, 64))
    return schema, inputs, labels


def check_contract(name, config, schema, inputs, labels):
    torch.manual_seed(0)
    net, _ = models.build(name, schema, config)
    named = dict(net.named_parameters())
    owned = net.task_parameters()
    split = models.split_parameters(net, schema.task_names, name)  # the structural checks
    assert split.num_shared > 0
    claimed = {n for names in owned.values() for n in names}
    assert all(owned[t] for t in schema.task_names), "every task owns some parameters"
    losses = taskgrad.task_losses(net(inputs), labels, schema)
    assert torch.isfinite(losses).all()
    nonzero = {}  # task → {parameter: its loss has a nonzero gradient there}
    for k, task in enumerate(schema.task_names):
        grads = torch.autograd.grad(losses[k], list(named.values()), retain_graph=True, allow_unused=True)
        nonzero[task] = {n: g is not None and bool((g != 0).any()) for n, g in zip(named, grads)}
    leaks = [
        f"{u}'s loss → {t}'s {n}"
        for t in schema.task_names
        for n in owned[t]
        for u in schema.task_names
        if u != t and nonzero[u][n]
    ]
    assert leaks == [], "task-owned parameters get gradient from other tasks"
    dead = [n for n in named if n not in claimed and not any(nonzero[t][n] for t in schema.task_names)]
    assert dead == [], "shared parameters no task's loss reaches"
    own_used = [n for t in schema.task_names for n in owned[t] if not nonzero[t][n]]
    assert own_used == [], "task-owned parameters their own task does not use"


CONTRACT_CASES = [
    ("shared-bottom", {}),
    ("shared-bottom", {"bottom": [16], "tower": []}),
    ("mmoe", {"num_experts": 2, "expert": [16], "tower": [8]}),
    ("mmoe", {"num_experts": 3, "expert": [8, 8], "tower": []}),
    ("ple", {"num_levels": 1, "expert": [8], "tower": [4]}),
    ("ple", {"num_levels": 2, "expert": [8], "tower": [4]}),
    ("ple", {"num_levels": 3, "expert": [8], "tower": [4]}),
    ("ple", {"num_levels": 3, "shared_experts": 1, "task_experts": 2, "expert": [6], "tower": []}),
]


@pytest.mark.parametrize(
    "name, config", CONTRACT_CASES, ids=[f"{n}-{json.dumps(c, sort_keys=True)}" for n, c in CONTRACT_CASES]
)
def test_model_plugin_contract(batch, name, config):
    check_contract(name, config, *batch)


def test_every_builtin_model_is_covered_by_the_contract_test():
    builtins = {n for n, e in registry.discover("models").items() if e.source == "built-in"}
    # The torch-rechub bridge (an optional extra) is held to the same oracle in tests/test_rechub.py.
    assert {n for n in builtins if not n.startswith("rechub-")} == {n for n, _ in CONTRACT_CASES}


@pytest.mark.parametrize("name", ["shared-bottom", "mmoe", "ple"])
def test_model_plugin_contract_with_a_regression_task(sample_dir, name):
    types = {"click": "binary", "like": "regression"}
    schema, _ = data.infer_schema(str(sample_dir / "valid.parquet"), ["click", "like"], types)
    inputs, labels = data.load(str(sample_dir / "valid.parquet"), schema).batch(slice(0, 64))
    check_contract(name, {"tower": [4]}, schema, inputs, labels)


def test_model_plugin_contract_dense_only(sample_dir):
    schema, _ = data.infer_schema(str(sample_dir / "valid.parquet"), TASKS, BINARY, features=["f0", "f1", "f2"])
    inputs, labels = data.load(str(sample_dir / "valid.parquet"), schema).batch(slice(0, 64))
    check_contract("shared-bottom", {}, schema, inputs, labels)


def test_categorical_only_schema_satisfies_the_contract(sample_dir):
    schema, _ = data.infer_schema(str(sample_dir / "valid.parquet"), TASKS, BINARY, features=["device", "category"])
    inputs, labels = data.load(str(sample_dir / "valid.parquet"), schema).batch(slice(0, 64))
    check_contract("mmoe", {"num_experts": 2, "expert": [8]}, schema, inputs, labels)


@pytest.mark.parametrize(
    "kind, typo, meant", [("models", "mmeo", "mmoe"), ("methods", "cogard", "cograd"), ("methods", "pc-grad", "pcgrad")]
)
def test_a_misspelt_name_gets_the_closest_known_one(kind, typo, meant):
    with pytest.raises(PluginError) as err:
        registry.lookup(kind, typo)
    message = str(err.value)
    assert f"unknown {kind[:-1]} '{typo}'; did you mean '{meant}'?; known {kind}: " in message


def test_a_name_like_no_other_gets_no_suggestion():
    with pytest.raises(PluginError) as err:
        registry.lookup("methods", "zzzzzz")
    assert "did you mean" not in str(err.value) and "known methods: " in str(err.value)
