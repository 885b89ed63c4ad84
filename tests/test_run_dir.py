"""The output directory under faults (issue #21): a kill before the first save, two runs started
together, an input checkpoint inside --out, corrupted resume states, non-finite weights. The
process-level cases run the real CLI in subprocesses."""

import hashlib
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cogradctl import checkpoint as ckpt_io
from cogradctl import sample

ROOT = Path(__file__).resolve().parents[1]


def command(ckpt, data, out, *extra):
    """``python -m cogradctl train …``; ``command(…)[3:]`` for the in-process ``cli`` fixture."""
    return [
        sys.executable,
        "-m",
        "cogradctl",
        "train",
        "--checkpoint",
        str(ckpt),
        "--data",
        str(data),
        "--out",
        str(out),
        "--batch-size",
        "64",
        "--seed",
        "3",
        "--device",
        "cpu",
        "--quiet",
        *extra,
    ]


def run(args, **kwargs):
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300, **kwargs)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def big_valid(tmp_path_factory):
    """240k validation rows (one 60k-row file four times): evaluating them before training takes
    longer than a short run with other settings takes from start to end."""
    root = tmp_path_factory.mktemp("bigvalid")
    sample.write(sample.generate(60_000, seed=5), root / "valid0.parquet")
    for i in range(1, 4):
        shutil.copy(root / "valid0.parquet", root / f"valid{i}.parquet")
    return root


# ---------------------------------------------------------------------------- 1: killed before the first save


def test_sigkill_before_the_first_save_then_the_same_command_restarts(base_checkpoint, sample_dir, tmp_path, cli):
    """SIGKILL as soon as metrics.jsonl appears (the start: config.toml, the first best.safetensors
    and last.safetensors follow): the same command runs the run to the end, and so does --resume."""
    train, valid = sample_dir / "train.parquet", sample_dir / "valid.parquet"
    extra = ("--valid", str(valid), "--max-steps", "3")
    reference = tmp_path / "reference"
    assert cli(*command(base_checkpoint, train, reference, *extra)[3:]).exit_code == 0
    out = tmp_path / "killed"
    proc = subprocess.Popen(command(base_checkpoint, train, out, *extra), cwd=ROOT)
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    shutil.copytree(out, tmp_path / "resumed")
    done = run(command(base_checkpoint, train, out, *extra))  # the same command
    assert done.returncode == 0, done.stderr
    resumed = cli(*command(base_checkpoint, train, tmp_path / "resumed", *extra, "--resume")[3:])
    assert resumed.exit_code == 0, resumed.stderr
    want = ckpt_io.load(reference / "last.safetensors")
    reference_steps = [json.loads(line)["step"] for line in (reference / "metrics.jsonl").read_text().splitlines()]
    for d in (out, tmp_path / "resumed"):
        got = ckpt_io.load(d / "last.safetensors")
        assert got.training_state["finished"] and got.training_state["step"] == 3
        for name in want.state:
            assert torch.equal(want.state[name], got.state[name]), name
        steps = [json.loads(line)["step"] for line in (d / "metrics.jsonl").read_text().splitlines()]
        assert steps == reference_steps


def test_a_directory_without_saved_state_says_what_it_is(base_checkpoint, sample_dir, tmp_path, cli):
    """What a kill in the start left with older versions (metrics.jsonl, no last.safetensors): both
    the rerun and --resume name the files and the missing state."""
    out = tmp_path / "old"
    out.mkdir()
    (out / "metrics.jsonl").write_text("")
    for flag in ((), ("--resume",)):
        done = cli(*command(base_checkpoint, sample_dir / "train.parquet", out, "--max-steps", "2", *flag)[3:])
        assert done.exit_code == 2
        assert "holds metrics.jsonl but no saved run state" in done.stderr and "--overwrite" in done.stderr


# ---------------------------------------------------------------------------- 2: two runs at once


def test_two_runs_started_together_one_is_refused(base_checkpoint, sample_dir, big_valid, tmp_path):
    """A slow run (a big --valid, evaluated before anything is written) and a fast one with other
    settings, into one --out: one finishes, the other is refused; nothing is replaced silently.
    (Before the lock came first, both looked at the empty --out, the fast one finished and the
    slow one then wrote over its run: both exited 0.)"""
    out = tmp_path / "race"
    train = sample_dir / "train.parquet"
    slow = subprocess.Popen(
        command(base_checkpoint, train, out, "--valid", str(big_valid), "--max-steps", "2"),
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(1.0)  # the slow one looks at --out first; the fast one finishes while it evaluates
    fast = subprocess.Popen(
        command(base_checkpoint, train, out, "--max-steps", "3", "--lr", "0.01"),
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )
    (_, slow_err), (_, fast_err) = slow.communicate(timeout=300), fast.communicate(timeout=300)
    codes = sorted([slow.returncode, fast.returncode])
    assert codes == [0, 2], (slow_err, fast_err)
    refused = slow_err if slow.returncode == 2 else fast_err
    assert "in use by another cogradctl run" in refused or "already holds a finished run" in refused, refused
    winner_steps = 2 if slow.returncode == 0 else 3
    state = ckpt_io.load(out / "last.safetensors").training_state
    assert state["finished"] and state["step"] == winner_steps
    assert not (out / ".lock").exists()


# ---------------------------------------------------------------------------- 3: the input inside --out


def test_overwrite_never_touches_an_input_checkpoint_inside_out(base_checkpoint, sample_dir, tmp_path, cli):
    out = tmp_path / "out"
    train = sample_dir / "train.parquet"
    first = cli(*command(base_checkpoint, train, out, "--max-steps", "2", "--valid", sample_dir / "valid.parquet")[3:])
    assert first.exit_code == 0
    for name in ("best.safetensors", "last.safetensors"):
        before = sha256(out / name)
        args = command(out / name, train, out, "--max-steps", "2", "--overwrite")
        if name == "best.safetensors":  # the real process once; in-process otherwise (faster)
            done = run(args)
            code, err = done.returncode, done.stderr
        else:
            done = cli(*args[3:])
            code, err = done.exit_code, done.stderr
        line = err.strip()
        assert code == 2 and "\n" not in line and str(out / name) in line and f"--out {out}" in line, line
        assert sha256(out / name) == before


def test_refused_run_leaves_no_directory(base_checkpoint, sample_dir, tmp_path, cli):
    """The lock comes first, but a run refused while checking its inputs removes the --out it created."""
    out = tmp_path / "a" / "b"
    done = cli(*command(base_checkpoint, sample_dir / "missing.parquet", out, "--max-steps", "2")[3:])
    assert done.exit_code == 2
    assert not (tmp_path / "a").exists()


# ---------------------------------------------------------------------------- 4: corrupted resume states


def _resume_args(base_checkpoint, sample_dir, out):
    extra = ("--method", "cograd", "-o", "hessian=fisher-ema", "--max-steps", "3")
    return command(base_checkpoint, sample_dir / "train.parquet", out, *extra)[3:]


@pytest.fixture(scope="module")
def unfinished_run(tmp_path_factory, base_checkpoint, sample_dir, cli):
    """A run's directory whose last.safetensors is an unfinished state at step 3 (resumable)."""
    out = tmp_path_factory.mktemp("unfinished") / "run"
    assert cli(*_resume_args(base_checkpoint, sample_dir, out)).exit_code == 0
    ck = ckpt_io.load(out / "last.safetensors")
    ck.training_state["finished"] = False
    ckpt_io.save(ck, out / "last.safetensors")
    return out


def _shared_exp_avg(ck) -> str:
    return next(k for k in ck.extra if k.startswith("optim.exp_avg.") and "tower" not in k)


CORRUPTIONS = {
    "training_state": lambda ck: setattr(ck, "training_state", []),
    "training_state has no 'config'": lambda ck: ck.training_state.pop("config"),
    "training_state step": lambda ck: ck.training_state.update(step="x"),
    "training_state epoch = 1000000": lambda ck: ck.training_state.update(epoch=10**6),
    "training_state finished": lambda ck: ck.training_state.update(finished="no"),
    "training_state last_eval": lambda ck: ck.training_state.update(last_eval=[1]),
    "rng.torch": lambda ck: ck.extra.update({"rng.torch": torch.zeros(3, dtype=torch.uint8)}),
    "method.fisher": lambda ck: ck.extra.update({"method.fisher": torch.zeros(1)}),
    "optim.exp_avg.": lambda ck: [ck.extra.pop(k) for k in list(ck.extra) if k.startswith("optim.")],
    "SHARED": lambda ck: ck.extra.update({_shared_exp_avg(ck): torch.zeros(7, 3)}),
    "optim.step.": lambda ck: ck.extra.update(
        {k: v.double() for k, v in ck.extra.items() if k.startswith("optim.step.")}
    ),
    "optim.exp_avg.nowhere": lambda ck: ck.extra.update({"optim.exp_avg.nowhere": torch.zeros(1)}),
}


def test_a_corrupted_resume_state_is_refused_naming_the_key(unfinished_run, base_checkpoint, sample_dir, tmp_path, cli):
    control = tmp_path / "control"
    shutil.copytree(unfinished_run, control)
    result = cli(*_resume_args(base_checkpoint, sample_dir, control))
    assert result.exit_code == 0, result.stderr  # the intact state resumes
    for i, (named, corrupt) in enumerate(CORRUPTIONS.items()):
        out = tmp_path / f"c{i}"
        shutil.copytree(unfinished_run, out)
        ck = ckpt_io.load(out / "last.safetensors")
        if named == "SHARED":
            named = _shared_exp_avg(ck)
        corrupt(ck)
        ckpt_io.save(ck, out / "last.safetensors")
        before = sha256(out / "last.safetensors")
        result = cli(*_resume_args(base_checkpoint, sample_dir, out))
        line = result.stderr.strip()
        assert result.exit_code == 2 and named in line and "\n" not in line, (named, result.exit_code, result.stderr)
        assert sha256(out / "last.safetensors") == before


# ---------------------------------------------------------------------------- 8: non-finite weights


def _poison_after(monkeypatch, step: int) -> None:
    """The optimizer's update of step ``step`` makes a weight NaN (an overflow, say)."""
    import cogradctl.train.step as step_module

    real, calls = step_module.optimizer_step, {"n": 0}

    def poisoned(optimizer):
        real(optimizer)
        calls["n"] += 1
        if calls["n"] == step:
            with torch.no_grad():
                optimizer.param_groups[0]["params"][0].view(-1)[0] = float("nan")

    monkeypatch.setattr(step_module, "optimizer_step", poisoned)


def _train_cfg(base_checkpoint, sample_dir, out, **kw):
    from cogradctl.train import TrainConfig

    settings = {"batch_size": 64, "max_steps": 6, "seed": 3, "save_every": 2, **kw}
    return TrainConfig(
        checkpoint=str(base_checkpoint), data=str(sample_dir / "train.parquet"), out=str(out), **settings
    )


def _all_finite(path: Path) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in ckpt_io.load(path).state.values() if t.is_floating_point())


@pytest.mark.parametrize("on_nonfinite", ["abort", "skip"])
@pytest.mark.parametrize("poisoned_step", [2, 3])
def test_non_finite_weights_are_never_saved_nor_end_0(
    base_checkpoint, sample_dir, tmp_path, monkeypatch, on_nonfinite, poisoned_step
):
    """Weights turned NaN by step 2's or 3's update (saves every 2 steps): the run exits 4 (abort,
    and skip, whose later steps are all non-finite), last.safetensors keeps the finite state of
    the step the message names, and no best or last holds NaN."""
    from cogradctl.console import Log
    from cogradctl.errors import Diverged
    from cogradctl.train import train

    _poison_after(monkeypatch, poisoned_step)
    out = tmp_path / "run"
    cfg = _train_cfg(
        base_checkpoint, sample_dir, out, on_nonfinite=on_nonfinite, valid=str(sample_dir / "valid.parquet")
    )
    with pytest.raises(Diverged) as caught:
        train(cfg, Log(quiet=True))
    kept = 0 if poisoned_step == 2 else 2  # a state saved with NaN weights is refused
    assert f"keeps the state saved at step {kept}" in str(caught.value)
    assert ckpt_io.load(out / "last.safetensors").training_state["step"] == kept
    assert _all_finite(out / "last.safetensors") and _all_finite(out / "best.safetensors")


def test_an_input_checkpoint_with_non_finite_weights_is_refused(base_checkpoint, sample_dir, tmp_path, cli):
    ck = ckpt_io.load(base_checkpoint)
    name = next(n for n, t in ck.state.items() if t.is_floating_point())
    ck.state[name] = ck.state[name].clone().fill_(float("nan"))
    nan_ckpt = tmp_path / "nan.safetensors"
    ckpt_io.save(ck, nan_ckpt)
    out = tmp_path / "out"
    result = cli(
        *command(nan_ckpt, sample_dir / "train.parquet", out, "--on-nonfinite", "skip", "--max-steps", "2")[3:]
    )
    assert result.exit_code == 2 and name in result.stderr and "NaN or infinite" in result.stderr
    assert not out.exists()


def test_metrics_lines_are_strict_json_with_null_for_non_finite(tmp_path):
    from cogradctl.train import MetricsLog

    log = MetricsLog(tmp_path / "metrics.jsonl", keep_until=None)
    log.write(
        {"step": 1, "valid": {"click": {"auc": float("nan"), "logloss": float("inf")}}, "x": [float("-inf"), 1.5]}
    )
    log.close()

    def refuse(constant):
        raise ValueError(constant)

    record = json.loads((tmp_path / "metrics.jsonl").read_text(), parse_constant=refuse)
    assert record == {"step": 1, "valid": {"click": {"auc": None, "logloss": None}}, "x": [None, 1.5]}
