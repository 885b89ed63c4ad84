"""Self-describing safetensors checkpoints: round trip, atomic writes, refusals (cogradctl.checkpoint)."""

from __future__ import annotations

import json
import os
import pickle
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cogradctl import atomic_files, models
from cogradctl import checkpoint as ckpt_io
from cogradctl.errors import CheckpointError


@pytest.fixture(scope="module")
def base(base_checkpoint) -> ckpt_io.Checkpoint:
    return ckpt_io.load(base_checkpoint)


@pytest.fixture
def full(base) -> ckpt_io.Checkpoint:
    """A checkpoint with model weights, extra tensors of many dtypes and shapes, and a rich history."""
    torch.manual_seed(0)
    net, config = models.build("mmoe", base.schema, {"num_experts": 3, "expert": [8, 4], "tower": [4]})
    extra = {
        "optim.f16": torch.randn(3, 5).half(),
        "optim.bf16": torch.randn(7).bfloat16(),
        "optim.f64": torch.randn(2, 2, 2, dtype=torch.float64),
        "optim.i64": torch.tensor([-(2**40), 0, 2**40]),
        "optim.i32": torch.arange(6, dtype=torch.int32).reshape(2, 3),
        "optim.u8": torch.tensor([0, 255], dtype=torch.uint8),
        "optim.bool": torch.tensor([True, False, True]),
        "optim.scalar": torch.tensor(3.5),
        "optim.empty": torch.zeros(0, 4),
        "optim.strided": torch.randn(4, 6).t(),  # not contiguous
        "optim.special": torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-45]),
    }
    history = [
        {"run": "init", "data": "/data/träin/*.parquet", "rows": 2000, "seed": 0, "time": "2024-01-01T00:00:00Z"},
        {
            "run": "train",
            "method": "cograd",
            "method_options": {"gamma": [0.1, 0.2, 0.3]},
            "steps": 3,
            "nested": {"a": [1, None, True]},
        },
    ]
    return ckpt_io.Checkpoint("mmoe", config, base.schema, net.state_dict(), history, extra)


def assert_same_tensors(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for name in a:
        assert b[name].dtype == a[name].dtype, name
        assert b[name].shape == a[name].shape, name
        if a[name].is_floating_point():
            # bit-exact, NaN and -0.0 included
            width = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a[name].element_size()]
            assert torch.equal(b[name].contiguous().view(width), a[name].contiguous().view(width)), name
        else:
            assert torch.equal(b[name], a[name]), name


def test_round_trip_is_exact(tmp_path, full):
    path = tmp_path / "c.safetensors"
    ckpt_io.save(full, path)
    back = ckpt_io.load(path)
    assert back.model == full.model
    assert back.model_config == full.model_config
    assert back.schema == full.schema
    cats = {f.name: f.vocab for f in back.schema.categorical}
    assert cats == {f.name: f.vocab for f in full.schema.categorical} and all(cats.values())
    assert [(f.mean, f.std) for f in back.schema.dense] == [(f.mean, f.std) for f in full.schema.dense]
    assert back.history == full.history
    assert_same_tensors(full.state, back.state)
    assert_same_tensors(full.extra, back.extra)


def test_model_config_keeps_its_order(tmp_path, full):
    """A plugin that builds its inputs from a config dict's order must get that order back.

    The header used to be written with sorted keys: a plugin given features={"user_id": …,
    "item_id": …} got them permuted after save → load, and predicted wrongly with no error
    (issue #22: per-row predictions off by up to 0.49, one task's AUC 0.963 → 0.882).
    """
    config = {"zeta": 1, "features": {"user_id": 64, "item_id": 64, "device": 8}, "alpha": [3, 1, 2]}
    path = tmp_path / "c.safetensors"
    ckpt_io.save(ckpt_io.Checkpoint("mmoe", config, full.schema, full.state), path)
    back = ckpt_io.load(path).model_config
    assert list(back) == ["zeta", "features", "alpha"]
    assert list(back["features"]) == ["user_id", "item_id", "device"] and back["alpha"] == [3, 1, 2]
    with safe_open(path, framework="pt") as f:
        assert list(json.loads(f.metadata()["model_config"])) == ["zeta", "features", "alpha"]


def test_staged_write_leaves_nothing_when_the_check_fails(tmp_path):
    """``import`` checks the staged file before it lands: a failed check leaves no file and no new folder."""
    target = tmp_path / "new" / "deeper" / "c.safetensors"
    with pytest.raises(RuntimeError, match="check failed"):
        with atomic_files.staged_write(target, b"abc") as staged:
            assert staged.read_bytes() == b"abc" and staged.parent == target.parent and not target.exists()
            raise RuntimeError("check failed")
    assert list(tmp_path.iterdir()) == []
    with atomic_files.staged_write(target, b"abc"):
        pass
    assert target.read_bytes() == b"abc" and list(target.parent.iterdir()) == [target]


def test_round_trip_loads_into_a_fresh_model(tmp_path, full):
    path = tmp_path / "c.safetensors"
    ckpt_io.save(full, path)
    back = ckpt_io.load(path)
    torch.manual_seed(123)
    fresh, _ = models.build(back.model, back.schema, back.model_config)
    assert not all(torch.equal(fresh.state_dict()[k], v) for k, v in full.state.items())  # really different
    ckpt_io.load_into(fresh, back.state, str(path))
    assert_same_tensors(full.state, fresh.state_dict())


def test_save_does_not_touch_the_callers_tensors(tmp_path, full):
    before = {k: v.clone() for k, v in full.state.items()}
    ckpt_io.save(full, tmp_path / "c.safetensors")
    back = ckpt_io.load(tmp_path / "c.safetensors")
    next(iter(back.state.values())).add_(1.0)  # loaded tensors are not views of the caller's
    assert_same_tensors(before, full.state)


def raw_header(path) -> dict:
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n])


def test_written_file_is_plain_safetensors_with_string_metadata(tmp_path, full):
    path = tmp_path / "c.safetensors"
    ckpt_io.save(full, path)
    header = raw_header(path)
    meta = header["__metadata__"]
    assert meta and all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    assert meta["format"] == "cogradctl-checkpoint" and meta["format_version"] == "1"
    assert meta["model"] == "mmoe"
    assert json.loads(meta["model_config"]) == full.model_config
    assert json.loads(meta["history"]) == full.history
    assert json.loads(meta["schema"])["tasks"] == [{"name": t, "type": "binary"} for t in ("click", "like", "share")]
    tensors = set(header) - {"__metadata__"}
    assert tensors == {"model." + k for k in full.state} | set(full.extra)
    # any safetensors reader can open it
    with safe_open(path, framework="pt") as f:
        assert set(f.keys()) == tensors
        assert f.metadata() == meta


def test_cli_made_checkpoint_metadata(base_checkpoint, base):
    meta = raw_header(base_checkpoint)["__metadata__"]
    assert all(isinstance(v, str) for v in meta.values())
    assert base.model == "mmoe"
    assert (
        base.model_config["num_experts"] == 2
        and base.model_config["expert"] == [16]
        and base.model_config["tower"] == [8]
    )
    assert [h["run"] for h in base.history] == ["init"]
    assert base.schema.task_names == ["click", "like", "share"]


# ---------------------------------------------------------------------------- atomic writes


def test_atomic_write_leaves_only_the_target(tmp_path, full):
    path = tmp_path / "sub" / "c.safetensors"
    ckpt_io.save(full, path)  # creates the folder too
    ckpt_io.save(full, path)  # and replaces
    assert os.listdir(path.parent) == ["c.safetensors"]


def test_written_file_has_the_usual_permissions(tmp_path, full):
    old = os.umask(0o022)
    try:
        ckpt_io.save(full, tmp_path / "c.safetensors")
    finally:
        os.umask(old)
    assert (os.stat(tmp_path / "c.safetensors").st_mode & 0o777) == 0o644


class _HalfWriter:
    """A file object that writes half of what it is given, then fails like a full disk."""

    def __init__(self, f):
        self.f = f

    def write(self, data):
        self.f.write(data[: len(data) // 2])
        self.f.flush()
        raise OSError(28, "No space left on device")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def __getattr__(self, name):
        return getattr(self.f, name)


def _fail_replace(*a, **k):
    raise OSError("rename failed")


def _fail_fsync(*a, **k):
    raise OSError("fsync failed")


def _interrupt_replace(*a, **k):
    raise KeyboardInterrupt


@pytest.mark.parametrize("failure", ["half-write", "fsync", "replace", "interrupt"])
def test_failed_write_keeps_the_old_file_and_no_temp(tmp_path, full, base, monkeypatch, failure):
    path = tmp_path / "c.safetensors"
    ckpt_io.save(base, path)
    old = path.read_bytes()
    real_fdopen = os.fdopen
    if failure == "half-write":
        monkeypatch.setattr(os, "fdopen", lambda *a, **k: _HalfWriter(real_fdopen(*a, **k)))
        expected = OSError
    elif failure == "fsync":
        monkeypatch.setattr(os, "fsync", _fail_fsync)
        expected = OSError
    elif failure == "replace":
        monkeypatch.setattr(os, "replace", _fail_replace)
        expected = OSError
    else:
        monkeypatch.setattr(os, "replace", _interrupt_replace)
        expected = KeyboardInterrupt
    with pytest.raises(expected):
        ckpt_io.save(full, path)
    monkeypatch.undo()
    assert path.read_bytes() == old
    assert os.listdir(tmp_path) == ["c.safetensors"]
    assert ckpt_io.load(path).model_config == base.model_config


def test_failed_first_write_leaves_nothing(tmp_path, full, monkeypatch):
    monkeypatch.setattr(os, "replace", _fail_replace)
    with pytest.raises(OSError):
        ckpt_io.save(full, tmp_path / "c.safetensors")
    assert os.listdir(tmp_path) == []


def test_reader_sees_old_file_until_the_rename(tmp_path, full, base, monkeypatch):
    """At the moment of the rename the new bytes are complete in the temporary file."""
    path = tmp_path / "c.safetensors"
    ckpt_io.save(base, path)
    old = path.read_bytes()
    seen = {}
    real_replace = os.replace

    def spy(src, dst):
        seen["target"] = open(dst, "rb").read()
        seen["temp"] = ckpt_io.load(src)  # the temporary file is already a complete checkpoint
        seen["temp_dir"] = os.path.dirname(os.path.abspath(src))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    ckpt_io.save(full, path)
    assert seen["target"] == old
    assert seen["temp"].model_config == full.model_config
    assert seen["temp_dir"] == str(tmp_path)  # same filesystem, so the rename is atomic
    assert ckpt_io.load(path).model_config == full.model_config


# ---------------------------------------------------------------------------- refusals


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint file") as err:
        ckpt_io.load(tmp_path / "absent.safetensors")
    assert str(tmp_path / "absent.safetensors") in str(err.value)
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        ckpt_io.load(tmp_path)  # a directory is not a checkpoint


@pytest.mark.parametrize("content", [b"", b"hello world, not a checkpoint\n" * 4, b"PK\x03\x04" + bytes(200)])
def test_not_a_safetensors_file(tmp_path, content):
    path = tmp_path / "x.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="not a readable safetensors file") as err:
        ckpt_io.load(path)
    assert str(path) in str(err.value)


def test_a_pickled_torch_file_is_refused(tmp_path, full):
    path = tmp_path / "model.pt"
    torch.save(full.state, path)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        ckpt_io.load(path)


@pytest.mark.parametrize("keep", [4, 100, 0.5, -1])
def test_truncated_file(tmp_path, base_checkpoint, keep):
    raw = base_checkpoint.read_bytes()
    n = keep if isinstance(keep, int) and keep > 0 else (len(raw) + keep if keep == -1 else int(len(raw) * keep))
    path = tmp_path / "t.safetensors"
    path.write_bytes(raw[:n])
    with pytest.raises(CheckpointError) as err:
        ckpt_io.load(path)
    assert str(path) in str(err.value)


def test_safetensors_without_cogradctl_metadata(tmp_path):
    for meta in (None, {"format": "pt"}):
        path = tmp_path / "plain.safetensors"
        save_file({"w": torch.ones(2)}, path, metadata=meta)
        with pytest.raises(CheckpointError, match="cogradctl init") as err:
            ckpt_io.load(path)
        assert "without cogradctl metadata" in str(err.value)
        assert str(path) in str(err.value)


def _rewrite_metadata(src, dst, **changes):
    with safe_open(src, framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta.update(changes)
    meta = {k: v for k, v in meta.items() if v is not None}
    save_file(tensors, dst, metadata=meta)
    return dst


def test_other_format_version(tmp_path, base_checkpoint):
    path = _rewrite_metadata(base_checkpoint, tmp_path / "v2.safetensors", format_version="2")
    with pytest.raises(CheckpointError, match="format version 2"):
        ckpt_io.load(path)


def test_missing_required_metadata_key(tmp_path, base_checkpoint):
    path = _rewrite_metadata(base_checkpoint, tmp_path / "noschema.safetensors", schema=None)
    with pytest.raises(CheckpointError, match="missing: schema"):
        ckpt_io.load(path)


@pytest.mark.parametrize(
    "key, value",
    [
        ("schema", "{not json"),
        ("model_config", "[1, 2"),
        ("history", "nope"),
        ("schema", '{"features": [{"bogus": 1}], "tasks": []}'),
    ],
)
def test_corrupt_metadata_json(tmp_path, base_checkpoint, key, value):
    path = _rewrite_metadata(base_checkpoint, tmp_path / "bad.safetensors", **{key: value})
    with pytest.raises(CheckpointError, match="corrupt checkpoint") as err:
        ckpt_io.load(path)
    assert str(path) in str(err.value)


def test_load_into_names_mismatched_tensors(base):
    other, _ = models.build("mmoe", base.schema, {"num_experts": 3, "expert": [16], "tower": [8]})
    with pytest.raises(CheckpointError, match="do not fit the model plugin") as err:
        ckpt_io.load_into(other, base.state, "base.safetensors")
    message = str(err.value)
    assert message.startswith("base.safetensors:")
    assert "gates.click.weight has shape (2, " in message and "expects (3, " in message
    assert "experts.2.0.weight missing" in message


def test_load_into_names_unexpected_tensors_and_counts_the_rest(base):
    net, _ = models.build("mmoe", base.schema, base.model_config)
    state = dict(base.state)
    state["extra.thing"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="extra.thing unexpected"):
        ckpt_io.load_into(net, state, "x")
    smaller, _ = models.build("shared-bottom", base.schema, {})
    with pytest.raises(CheckpointError, match=r"and \d+ more"):
        ckpt_io.load_into(smaller, base.state, "x")


def test_loading_never_unpickles(tmp_path, full, base_checkpoint, monkeypatch, cli):
    path = tmp_path / "c.safetensors"
    ckpt_io.save(full, path)

    def forbidden(*a, **k):
        raise AssertionError("checkpoint loading must not unpickle")

    class ForbiddenUnpickler:
        def __init__(self, *a, **k):
            forbidden()

    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", ForbiddenUnpickler)
    monkeypatch.setattr(torch, "load", forbidden)
    back = ckpt_io.load(path)
    assert_same_tensors(full.state, back.state)
    result = cli("inspect", base_checkpoint, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["model"] == "mmoe"
