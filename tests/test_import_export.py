"""Bring your own model (issue #22): ``cogradctl import`` and ``cogradctl export`` with a team's plain PyTorch MMoE.

The team's model knows nothing of cogradctl: its own class, its own feature pipeline (hashed ids
in the team's column order, raw dense values), trained a few steps with plain torch and saved with
``torch.save(model.state_dict())``. Its plugin wraps it (``self.net``), so the team's keys lack the
plugin's ``net.`` prefix (``--rename '=net.'``), and it builds its inputs from a config dict whose
order is not sorted: a checkpoint that sorted model_config's keys would feed the embedding tables
the wrong columns, and the round trip below would fail.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file, save_file

from cogradctl import checkpoint as ckpt_io
from cogradctl.layers import OriginalDense, OriginalIds
from cogradctl.schema import Feature, Schema, Task

TASKS = ["click", "like", "share"]
TOL = 1e-6

TEAM = '''
"""The team's MMoE (plain PyTorch) and its feature pipeline, and the cogradctl plugin that wraps it."""
import zlib

import torch
from torch import nn

FEATURES = {"user_bucket": 16, "device": 16, "category": 16}  # the team's input order: name -> hash buckets
DENSE = ["f3", "f0", "f1", "f2", "f4", "f5"]
TASKS = ["click", "like", "share"]


def team_id(name, value, buckets):
    """The team's id of a raw value: a stable hash into buckets 1..B-1 (0 is the team's missing id)."""
    return 1 + zlib.crc32(f"{name}={value}".encode()) % (buckets - 1)


def encode(columns):
    """The team's pipeline: raw Parquet columns (a dict of lists) -> (ids B x 3, dense B x 6)."""
    ids = [[team_id(n, v, b) for n, b in FEATURES.items() for v in [columns[n][i]]] for i in range(len(columns["f0"]))]
    dense = [[columns[c][i] for c in DENSE] for i in range(len(columns["f0"]))]
    return torch.tensor(ids), torch.tensor(dense, dtype=torch.float32)


class TeamMMoE(nn.Module):
    def __init__(self, buckets, num_dense, emb=4, experts=2, hidden=8, tasks=3):
        super().__init__()
        self.emb = nn.ModuleList([nn.Embedding(b, emb) for b in buckets])
        self.bn = nn.BatchNorm1d(num_dense)  # running statistics: buffers
        d = len(buckets) * emb + num_dense
        self.experts = nn.ModuleList([nn.Sequential(nn.Linear(d, hidden), nn.ReLU()) for _ in range(experts)])
        self.gates = nn.ModuleList([nn.Linear(d, experts) for _ in range(tasks)])
        self.towers = nn.ModuleList([nn.Linear(hidden, 1) for _ in range(tasks)])

    def forward(self, ids, dense):
        x = torch.cat([*(e(ids[:, k]) for k, e in enumerate(self.emb)), self.bn(dense)], dim=1)
        h = torch.stack([e(x) for e in self.experts], dim=1)
        gates = [torch.softmax(g(x), -1) for g in self.gates]
        return torch.cat([t(torch.einsum("be,beh->bh", g, h)) for g, t in zip(gates, self.towers)], dim=1)


def build(schema, features: dict = FEATURES, dense: list = DENSE, NOISE_ARG):
    """The team's MMoE fed cogradctl's batches mapped back to the team's ids and raw values."""
    from cogradctl.layers import OriginalDense, OriginalIds

    class Plugin(nn.Module):
        def __init__(self):
            super().__init__()
            self.tasks = schema.task_names
            self.net = TeamMMoE(list(features.values()), len(dense), tasks=len(self.tasks))
            self.ids = OriginalIds(schema, to_id=lambda name, v: team_id(name, v, features[name]))
            self.raw = OriginalDense(schema)
            self.cat_cols = [self.ids.index[n] for n in features]  # the config's order is the model's
            self.dense_cols = [self.raw.index[n] for n in dense]

        def forward(self, batch):
            ids = self.ids(batch["categorical"])[:, self.cat_cols]
            out = self.net(ids, self.raw(batch["dense"])[:, self.dense_cols])
            out = NOISE_EXPR
            return {t: out[:, k] for k, t in enumerate(self.tasks)}

        def task_parameters(self):
            own = {t: (f"net.gates.{k}.", f"net.towers.{k}.") for k, t in enumerate(self.tasks)}
            return {t: [n for n, _ in self.named_parameters() if n.startswith(p)] for t, p in own.items()}

    return Plugin()


MODELS = {"NAME": build}
'''


def team_source(name: str = "team-mmoe", noisy: bool = False) -> str:
    noise = "out + 1e-3 * torch.rand_like(out)" if noisy else "out"
    return TEAM.replace("NAME", name).replace("NOISE_ARG", "hidden: int = 8").replace("NOISE_EXPR", noise)


@pytest.fixture(scope="module")
def team(tmp_path_factory, sample_dir):
    """The team's side: plugin folder, module, weights trained a few steps on the sample (torch.save)."""
    root = tmp_path_factory.mktemp("team")
    plugins = root / "plugins"
    plugins.mkdir()
    (plugins / "team.py").write_text(team_source())
    spec = importlib.util.spec_from_file_location("team_code_for_tests", plugins / "team.py")
    code = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = code  # torch.save of a whole module (a bad-input case) pickles its class by name
    spec.loader.exec_module(code)
    columns = pq.read_table(sample_dir / "train.parquet").to_pydict()
    ids, dense = code.encode(columns)
    labels = torch.tensor([columns[t] for t in TASKS], dtype=torch.float32).T
    torch.manual_seed(0)
    model = code.TeamMMoE(list(code.FEATURES.values()), len(code.DENSE))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(20):
        rows = torch.randint(0, len(labels), (256,))
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(ids[rows], dense[rows]), labels[rows])
        opt.zero_grad()
        loss.backward()
        opt.step()
    weights = root / "team.pt"
    torch.save(model.state_dict(), weights)
    yield {"root": root, "plugins": plugins, "code": code, "weights": weights, "model": model.eval()}
    sys.modules.pop(spec.name, None)


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def import_args(team, sample_dir, weights, out, *extra):
    return (
        "import",
        "--model",
        "team-mmoe",
        "--plugin-path",
        team["plugins"],
        "--weights",
        weights,
        "--data",
        sample_dir / "train.parquet",
        "--tasks",
        ",".join(TASKS),
        "--out",
        out,
        *extra,
    )


def team_probabilities(team, model, path) -> np.ndarray:
    """The team's own module on the team's own encoding of the rows of ``path``: N×K probabilities."""
    ids, dense = team["code"].encode(pq.read_table(path).to_pydict())
    with torch.no_grad():
        return torch.sigmoid(model.eval()(ids, dense)).double().numpy()


def predict(cli, team, checkpoint, data, out) -> np.ndarray:
    r = cli("predict", "--checkpoint", checkpoint, "--data", data, "--out", out, "--plugin-path", team["plugins"])
    assert r.exit_code == 0, r.output
    table = pq.read_table(out)
    return np.stack([table.column(t).to_numpy() for t in TASKS], axis=1)


# ---------------------------------------------------------------------------- the round trip


def test_round_trip_import_predict_train_measure_export(team, sample_dir, tmp_path, cli):
    """import → predict = the team's module → train cograd → measure → export → the team's class loads it."""
    weights = tmp_path / "copy" / "team.pt"  # a copy, deleted after the import: nothing may need it later
    weights.parent.mkdir()
    weights.write_bytes(team["weights"].read_bytes())
    digest = sha256(weights)
    imported = tmp_path / "imported.safetensors"
    r = cli(*import_args(team, sample_dir, weights, imported, "--rename", "=net.", "--json"))
    assert r.exit_code == 0, r.output
    assert sha256(weights) == digest  # the source is never modified
    doc = json.loads(r.stdout)
    check = doc["self_check"]
    assert check["max_abs_diff"] <= TOL and check["tensors_equal"] == len(team["model"].state_dict()) == 24
    assert doc["weights"]["sha256"] == digest and doc["weights"]["size"] == weights.stat().st_size
    assert doc["mapping"]["renamed"] == 24 and doc["mapping"]["rename"] == ["=net."]
    assert list(doc["config"]["features"]) == ["user_bucket", "device", "category"]  # the config's order kept
    assert doc["vocabulary"]["sample_oov"] == {"device": 0, "category": 0, "user_bucket": 0}
    assert "self-check" in r.stderr and "--encoding COLUMN=identity:N" in r.stderr
    ckpt = ckpt_io.load(imported)
    assert str(weights) not in json.dumps(ckpt.model_config)  # provenance lives in the history only
    (entry,) = ckpt.history
    assert entry["run"] == "import" and entry["weights"]["file"] == str(weights)
    assert entry["mapping"]["renamed"]["net.bn.running_var"] == "bn.running_var"  # buffers included
    assert list(ckpt.model_config["features"]) == ["user_bucket", "device", "category"]
    weights.unlink()

    valid = sample_dir / "valid.parquet"
    ours = predict(cli, team, imported, valid, tmp_path / "imported.parquet")
    theirs = team_probabilities(team, team["model"], valid)
    assert np.abs(ours - theirs).max() <= TOL

    tuned = tmp_path / "tuned"
    train = ("train", "--checkpoint", imported, "--data", sample_dir / "train.parquet", "--valid", valid)
    r = cli(
        *train,
        "--method",
        "cograd",
        "--max-steps",
        4,
        "--batch-size",
        256,
        "--out",
        tuned,
        "--quiet",
        "--plugin-path",
        team["plugins"],
    )
    assert r.exit_code == 0, r.output  # still trains with the source file gone
    last = tuned / "last.safetensors"
    r = cli("evaluate", "--checkpoint", last, "--data", valid, "--plugin-path", team["plugins"], "--json")
    assert r.exit_code == 0, r.output
    r = cli(
        "measure-transference",
        *("--checkpoint", last, "--baseline", imported, "--data", valid, "--batches", 2, "--batch-size", 128),
        *("--plugin-path", team["plugins"], "--json", "--quiet"),
    )
    assert r.exit_code == 0, r.output
    assert np.array(json.loads(r.stdout)["delta"]["transference"]).shape == (3, 3)

    tuned_preds = predict(cli, team, last, valid, tmp_path / "tuned.parquet")
    assert np.abs(tuned_preds - ours).max() > 1e-4  # training changed the model
    for name in ("team_tuned.pt", "team_tuned.safetensors"):
        out = tmp_path / name
        r = cli("export", last, "--out", out, "--json")
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout)["keys"] == "original"
        state = torch.load(out, weights_only=True) if name.endswith(".pt") else load_file(out)
        assert set(state) == set(team["model"].state_dict())  # the team's names, nothing else
        model = team["code"].TeamMMoE(list(team["code"].FEATURES.values()), len(team["code"].DENSE))
        model.load_state_dict(state, strict=True)
        assert np.abs(team_probabilities(team, model, valid) - tuned_preds).max() <= TOL


def test_trainer_checkpoint_ddp_prefix_extras_and_safetensors(team, sample_dir, tmp_path, cli):
    """A trainer's checkpoint: nested state dict, DDP's module. prefix, uncertainty weights to ignore."""
    state = team["model"].state_dict()
    nested = {f"module.{k}": v for k, v in state.items()}
    nested["module.loss_weight.0"] = torch.tensor(0.3)
    trainer = tmp_path / "trainer.pt"
    torch.save({"epoch": 3, "state_dict": nested, "optimizer": {"lr": 0.01}}, trainer)
    out = tmp_path / "ddp.safetensors"
    r = cli(*import_args(team, sample_dir, trainer, out, "--rename", "=net."))
    assert r.exit_code == 2 and "--weights-key state_dict" in r.stderr and not out.exists()
    r = cli(*import_args(team, sample_dir, trainer, out, "--rename", "=net.", "--weights-key", "state_dict"))
    assert r.exit_code == 2 and "loss_weight.0" in r.stderr and "--ignore-keys" in r.stderr and not out.exists()
    extra = ("--rename", "=net.", "--weights-key", "state_dict", "--ignore-keys", "loss_weight.*", "--json")
    r = cli(*import_args(team, sample_dir, trainer, out, *extra))
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["mapping"]["strip_module"] and doc["mapping"]["ignored"] == ["module.loss_weight.0"]
    assert doc["self_check"]["max_abs_diff"] <= TOL
    exported = tmp_path / "back.pt"
    assert cli("export", out, "--out", exported).exit_code == 0
    back = torch.load(exported, weights_only=True)
    assert set(back) == set(nested) - {"module.loss_weight.0"}  # the file's own names; extras are not weights
    assert all(torch.equal(back[k], v) for k, v in nested.items() if k in back)

    flat = tmp_path / "team.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, flat)
    out2 = tmp_path / "st.safetensors"
    r = cli(*import_args(team, sample_dir, flat, out2, "--rename", "=net.", "--quiet"))
    assert r.exit_code == 0, r.output
    assert cli("export", out2, "--out", tmp_path / "st_back.safetensors").exit_code == 0
    back = load_file(tmp_path / "st_back.safetensors")
    assert set(back) == set(state) and all(torch.equal(back[k], v) for k, v in state.items())


def test_values_pruned_from_the_vocabulary_are_counted(team, sample_dir, tmp_path, cli):
    """--min-count leaves rare sample ids out of the vocabulary: they reach the plugin as index 0, and the import counts them."""
    out = tmp_path / "pruned.safetensors"
    r = cli(*import_args(team, sample_dir, team["weights"], out, "--rename", "=net.", "--min-count", "15", "--json"))
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["vocabulary"]["sample_oov"]["user_bucket"] > 0 and doc["vocabulary"]["sample_oov"]["device"] == 0
    assert doc["self_check"]["max_abs_diff"] <= TOL


def test_export_of_an_init_checkpoint_uses_the_plugin_keys(base_checkpoint, tmp_path, cli):
    from cogradctl import models

    out = tmp_path / "mmoe.pt"
    r = cli("export", base_checkpoint, "--out", out, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["keys"] == "plugin"
    ckpt = ckpt_io.load(base_checkpoint)
    net, _ = models.build("mmoe", ckpt.schema, ckpt.model_config)
    net.load_state_dict(torch.load(out, weights_only=True), strict=True)
    r = cli("export", base_checkpoint, "--out", out)
    assert r.exit_code == 2 and "--overwrite" in r.stderr
    assert cli("export", base_checkpoint, "--out", tmp_path / "x.onnx").exit_code == 2


# ---------------------------------------------------------------------------- bad input: one line, exit 2, nothing written


def _bad_weights(team, tmp_path, case: str):
    state = dict(team["model"].state_dict())
    path = tmp_path / "w.pt"
    if case == "pickled module":
        torch.save(team["model"], path)
    elif case == "missing file":
        return path, "no such file"
    elif case == "unreadable file":
        path.write_bytes(b"not a torch file " * 8)
        return path, "not a readable PyTorch file"
    elif case == "key the model lacks":
        state["extra.weight"] = torch.zeros(2)
        torch.save(state, path)
        return path, "not in the model: extra.weight"
    elif case == "missing key":
        del state["towers.2.bias"]
        torch.save(state, path)
        return path, "missing from the file: net.towers.2.bias"
    elif case == "shape mismatch":
        state["gates.0.weight"] = torch.zeros(3, 3)
        torch.save(state, path)
        return path, "gates.0.weight (as net.gates.0.weight) (3, 3) vs the model's (2, 18)"
    elif case == "not a state dict":
        torch.save({"epoch": 3, "lr": torch.tensor(1.0)}, path)
        return path, "'epoch' holds int 3, not a tensor"
    return path, "holds a pickled module or other Python object (team_code_for_tests.TeamMMoE), not a state dict"


BAD = ["pickled module", "missing file", "unreadable file", "key the model lacks", "missing key", "shape mismatch"]


@pytest.mark.parametrize("case", [*BAD, "not a state dict"])
def test_bad_weights_are_one_line_and_exit_2(team, sample_dir, tmp_path, cli, case):
    path, expected = _bad_weights(team, tmp_path, case)
    before = sha256(path) if path.exists() else None
    out = tmp_path / "out" / "imported.safetensors"
    r = cli(*import_args(team, sample_dir, path, out, "--rename", "=net."))
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines
    assert r.stdout == "" and not (tmp_path / "out").exists()
    assert (sha256(path) if path.exists() else None) == before
    if case == "pickled module":
        assert "save model.state_dict() and import that" in lines[0]


def test_plugin_that_fails_to_import(team, sample_dir, tmp_path, cli):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "team_rechub.py").write_text("import torch_rechub_missing_xyz\n\nMODELS = {'team-mmoe': None}\n")
    out = tmp_path / "imported.safetensors"
    args = list(import_args(team, sample_dir, team["weights"], out))
    args[args.index("--plugin-path") + 1] = plugins
    r = cli(*args)
    assert r.exit_code == 2 and r.stdout == "" and not out.exists()
    (line,) = r.stderr.strip().splitlines()
    assert "model 'team-mmoe'" in line and "failed to load" in line and "torch_rechub_missing_xyz" in line


def test_existing_out_is_kept_and_a_failed_self_check_writes_nothing(team, sample_dir, tmp_path, cli):
    out = tmp_path / "imported.safetensors"
    out.write_bytes(b"keep me")
    r = cli(*import_args(team, sample_dir, team["weights"], out, "--rename", "=net."))
    assert r.exit_code == 2 and "--overwrite" in r.stderr and out.read_bytes() == b"keep me"
    noisy = tmp_path / "noisy"
    noisy.mkdir()
    (noisy / "noisy.py").write_text(team_source(noisy=True))
    args = list(import_args(team, sample_dir, team["weights"], out, "--rename", "=net.", "--overwrite"))
    args[args.index("--plugin-path") + 1] = noisy
    r = cli(*args)
    assert r.exit_code == 2 and "self-check" in r.stderr and "deterministic" in r.stderr, r.output
    assert out.read_bytes() == b"keep me" and sorted(p.name for p in tmp_path.iterdir()) == [
        "imported.safetensors",
        "noisy",
    ]


# ---------------------------------------------------------------------------- the plugin helpers


def test_original_ids_and_dense_invert_the_encoding():
    schema = Schema(
        [
            Feature("user", "categorical", vocab=[42, 7, 1000], value_type="int"),
            Feature("device", "categorical", vocab=["ios", "web"], value_type="str"),
            Feature("age", "dense", mean=40.0, std=12.5),
        ],
        [Task("click")],
    )
    with pytest.raises(ValueError, match="device"):
        OriginalIds(schema)  # string values need to_id
    ids = OriginalIds(
        schema, to_id=lambda f, v: {"ios": 5, "web": 9}[v] if f == "device" else v, missing_id={"user": -1}
    )
    got = ids(torch.tensor([[1, 2], [3, 0], [0, 1]]))
    assert got.tolist() == [[42, 9], [1000, 0], [-1, 5]] and ids.index == {"user": 0, "device": 1}
    assert ids.state_dict() == {}  # rebuilt from the schema, never part of the weights
    raw = OriginalDense(schema)
    x = torch.tensor([[(np.float32(33.3) - 40.0) / 12.5]], dtype=torch.float32)
    assert raw(x).item() == np.float32(33.3) and raw.state_dict() == {}
