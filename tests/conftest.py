"""Shared fixtures: a small generated dataset, a tiny MMoE checkpoint and a CLI runner.

Everything is written under pytest's temporary directories, never into the repository. The
session-scoped fixtures are read-only by convention: a test that needs to modify a file copies it.
"""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from cogradctl import cli as cli_module
from cogradctl import sample

TASKS = ["click", "like", "share"]
TRAIN_ROWS, VALID_ROWS = 2000, 500
# A deliberately tiny MMoE so that train/evaluate/measure runs take well under a second.
TINY_MMOE = ["--config", "num_experts=2", "--config", "expert=[16]", "--config", "tower=[8]"]


@pytest.fixture(scope="session", autouse=True)
def _hermetic_env():
    """The user's COGRADCTL_* variables must not change what the tests see. Every cogradctl process
    a test starts uses one torch thread, as the tests' own process does (test_allocator sets it when
    collected): the models are tiny, and on a loaded machine a second thread waiting for a core made
    a training step several times slower."""
    with pytest.MonkeyPatch.context() as mp:
        for var in ("COGRADCTL_PLUGIN_PATH", "COGRADCTL_DEBUG"):
            mp.delenv(var, raising=False)
        mp.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        yield


@pytest.fixture(autouse=True)
def _debug_off(monkeypatch):
    """``--debug`` flips a module-level switch; restore it after every test."""
    monkeypatch.setitem(cli_module.DEBUG, "on", False)


@pytest.fixture(scope="session")
def runner() -> CliRunner:
    # click >= 8.2 keeps result.stdout and result.stderr apart (result.output interleaves both).
    return CliRunner()


@pytest.fixture(scope="session")
def cli(runner):
    """``cli("inspect", path, "--json")`` → click Result; arguments are str()-ed."""

    def invoke(*args, **kwargs):
        return runner.invoke(cli_module.app, [str(a) for a in args], **kwargs)

    return invoke


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory):
    """A directory with train.parquet (2000 rows) and valid.parquet (500 rows) of the sample data."""
    root = tmp_path_factory.mktemp("sample")
    sample.write(sample.generate(TRAIN_ROWS, seed=1), root / "train.parquet")
    sample.write(sample.generate(VALID_ROWS, seed=2), root / "valid.parquet")
    return root


@pytest.fixture(scope="session")
def base_checkpoint(tmp_path_factory, sample_dir, cli):
    """A fresh tiny MMoE checkpoint (tasks click, like, share) made by ``cogradctl init``."""
    out = tmp_path_factory.mktemp("ckpt") / "base.safetensors"
    result = cli(
        "init",
        "--model",
        "mmoe",
        *TINY_MMOE,
        "--data",
        sample_dir / "train.parquet",
        "--tasks",
        ",".join(TASKS),
        "--out",
        out,
        "--quiet",
    )
    assert result.exit_code == 0, result.output
    assert out.is_file()
    return out
