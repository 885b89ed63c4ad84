"""Crash safety and the training engine: resume after SIGKILL, SIGTERM, atomic writes, locks,
run files, optimizers and schedules, non-finite handling, precision, early stopping."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cogradctl import checkpoint as ckpt_io
from cogradctl.console import Log
from cogradctl.errors import Diverged, UsageError
from cogradctl.train import TrainConfig, lr_at, train
from tests.runs import saved_step, wait_for_step, weights

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dropout_checkpoint(tmp_path_factory, sample_dir, cli):
    """An MMoE with dropout, so that resuming must also restore the RNG state."""
    path = tmp_path_factory.mktemp("resume") / "init.safetensors"
    result = cli(
        "init",
        "--model",
        "mmoe",
        "--data",
        str(sample_dir / "train.parquet"),
        "--tasks",
        "click,like,share",
        "--out",
        str(path),
        "--config",
        "num_experts=2",
        "--config",
        "expert=[16]",
        "--config",
        "tower=[8]",
        "--config",
        "dropout=0.2",
    )
    assert result.exit_code == 0, result.output
    return path


def train_args(ckpt, sample_dir, out, *extra):
    return [
        sys.executable,
        "-m",
        "cogradctl",
        "train",
        "--checkpoint",
        str(ckpt),
        "--data",
        str(sample_dir / "train.parquet"),
        "--valid",
        str(sample_dir / "valid.parquet"),
        "--method",
        "pcgrad",
        "--batch-size",
        "64",
        "--epochs",
        "3",
        "--save-every",
        "3",
        "--seed",
        "7",
        "--device",
        "cpu",
        "--out",
        str(out),
        "--quiet",
        *extra,
    ]


def test_sigkill_mid_epoch_then_rerun_gives_bit_identical_weights(dropout_checkpoint, sample_dir, tmp_path, cli):
    reference = tmp_path / "reference"
    assert (
        cli(*train_args(dropout_checkpoint, sample_dir, reference)[3:]).exit_code == 0
    )  # in this process: no start-up
    out = tmp_path / "killed"
    proc = subprocess.Popen(train_args(dropout_checkpoint, sample_dir, out), cwd=ROOT)
    wait_for_step(proc, out, 12)  # epoch 1 has 32 steps: this is mid-epoch
    proc.kill()
    proc.wait()
    assert 12 <= saved_step(out) < 96
    subprocess.run(train_args(dropout_checkpoint, sample_dir, out), check=True, cwd=ROOT, timeout=600)  # same command
    want, got = weights(reference), weights(out)
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name
    state = ckpt_io.load(out / "last.safetensors").training_state
    assert state["finished"] and state["step"] == 96
    # metrics.jsonl reads as one run: every step record once, in order
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert steps == sorted(set(steps))
    assert ckpt_io.load(out / "best.safetensors").state.keys() == want.keys()


def test_sigterm_finishes_the_step_saves_and_exits_143(dropout_checkpoint, sample_dir, tmp_path, cli):
    out = tmp_path / "term"
    # 320 steps: the signal is sent as soon as the step-0 checkpoint exists (the handlers are in place
    # by then), so the run is at its first steps when it lands and the rerun does nearly all of them
    long_run = ("--save-every", "1000", "--epochs", "10")
    proc = subprocess.Popen(
        train_args(dropout_checkpoint, sample_dir, out, *long_run), cwd=ROOT, stderr=subprocess.PIPE, text=True
    )
    wait_for_step(proc, out, 0)  # the initial checkpoint: training starts
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "stopped by SIGTERM" in err and "rerun the same command to resume" in err
    state = ckpt_io.load(out / "last.safetensors").training_state
    assert not state["finished"] and 1 <= state["step"] < 320
    assert not (out / ".lock").exists()
    done = cli(*train_args(dropout_checkpoint, sample_dir, out, *long_run)[3:])  # the same command, in this process
    assert done.exit_code == 0, done.output
    assert ckpt_io.load(out / "last.safetensors").training_state["finished"]


def test_kill_during_a_write_leaves_a_complete_checkpoint(base_checkpoint, tmp_path):
    """A process rewrites a checkpoint as fast as it can; SIGKILL lands at random points in the
    writes; the file is always a complete, loadable checkpoint and no partial file replaces it."""
    target = tmp_path / "ckpt.safetensors"
    script = (
        "import sys, torch\n"
        "from cogradctl import checkpoint as c\n"
        f"ck = c.load({str(base_checkpoint)!r})\n"
        "ck.extra = {'big': torch.zeros(4_000_000)}\n"
        "i = 0\n"
        "while True:\n"
        "    ck.history = [{'version': i}]\n"
        f"    c.save(ck, {str(target)!r})\n"
        "    if i == 0:\n"
        "        print('ready', flush=True)\n"
        "    i += 1\n"
    )
    versions = []
    for delay in (0.05, 0.13, 0.21, 0.34):
        proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(delay)  # a 16 MB write takes tens of ms: the kill lands in one of the writes
        proc.kill()
        proc.wait()
        loaded = ckpt_io.load(target)
        assert loaded.extra["big"].shape == (4_000_000,)
        versions.append(loaded.history[0]["version"])
    assert max(versions) > 0  # the writer really was rewriting the file when killed


HOLD_LOCK = (
    "import fcntl, os, socket, sys, time\n"
    "fd = os.open(sys.argv[1], os.O_CREAT | os.O_RDWR)\n"
    "fcntl.flock(fd, fcntl.LOCK_EX)\n"
    "os.write(fd, f'{os.getpid()} {socket.gethostname()}'.encode())\n"
    "print('ready', flush=True)\n"
    "time.sleep(600)\n"
)


def test_live_lock_is_refused_and_stale_lock_recovered(base_checkpoint, sample_dir, tmp_path, cli):
    """A live run holds an OS lock on --out/.lock: refused, naming its pid. A lock file left by a
    dead run is taken over whatever pid it records: a dead one, this live (unrelated) process's
    (a reused pid), 0, -1, a zombie's."""
    import socket

    out = tmp_path / "locked"
    out.mkdir()
    args = [
        "train",
        "--checkpoint",
        str(base_checkpoint),
        "--data",
        str(sample_dir / "train.parquet"),
        "--out",
        str(out),
        "--max-steps",
        "2",
        "--batch-size",
        "64",
        "--device",
        "cpu",
        "-q",
        "--overwrite",
    ]
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        result = cli(*args)
        assert result.exit_code == 2
        assert f"pid {holder.pid})" in result.stderr and "in use by another cogradctl run" in result.stderr
        assert not (out / "last.safetensors").exists()
    finally:
        holder.kill()
        holder.wait()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    time.sleep(0.5)  # exited, not yet reaped: a zombie, which kill(pid, 0) calls alive
    try:
        for pid in (holder.pid, dead.pid, os.getpid(), 0, -1, zombie.pid):
            (out / ".lock").write_text(f"{pid} {socket.gethostname()}")
            result = cli(*args)
            assert result.exit_code == 0, (pid, result.stderr)
            assert not (out / ".lock").exists()
    finally:
        zombie.wait()
    (out / ".lock").write_text("123 another-host")  # flock may not reach across NFS: refused
    result = cli(*args)
    assert result.exit_code == 2 and "pid 123 on another-host" in result.stderr


def test_rerun_rules(base_checkpoint, sample_dir, tmp_path, cli):
    out = tmp_path / "rules"
    common = [
        "--checkpoint",
        str(base_checkpoint),
        "--data",
        str(sample_dir / "train.parquet"),
        "--out",
        str(out),
        "--batch-size",
        "64",
        "--device",
        "cpu",
        "-q",
    ]
    result = cli("train", *common, "--resume", "--max-steps", "2")
    assert result.exit_code == 2 and "holds no run to resume" in result.stderr
    assert cli("train", *common, "--max-steps", "2").exit_code == 0
    result = cli("train", *common, "--max-steps", "2")
    assert result.exit_code == 2 and "finished run" in result.stderr
    assert cli("train", *common, "--max-steps", "2", "--overwrite").exit_code == 0
    # an unfinished run with other settings is refused, naming the setting
    state_ckpt = ckpt_io.load(out / "last.safetensors")
    state_ckpt.training_state["finished"] = False
    ckpt_io.save(state_ckpt, out / "last.safetensors")
    result = cli("train", *common, "--max-steps", "2", "--lr", "0.5")
    assert result.exit_code == 2 and "lr (0.001 → 0.5)" in result.stderr


def test_config_file_round_trip_overrides_and_errors(base_checkpoint, sample_dir, tmp_path, cli):
    out = tmp_path / "cfg"
    run = tmp_path / "run.toml"
    run.write_text(
        f'checkpoint = "{base_checkpoint}"\ndata = "{sample_dir / "train.parquet"}"\nout = "{out}"\n'
        'method = "cograd"\nmethod_options = { gamma = 0.3, normalize = "curvature" }\nmax_steps = 3\nbatch_size = 64\n'
        'lr = 0.01\noptimizer = "adamw"\nschedule = "linear"\nwarmup_steps = 1\ndevice = "cpu"\n'
    )
    result = cli("train", "--config", str(run), "--lr", "0.002", "-q", "--json")
    assert result.exit_code == 0, result.stderr
    written = (out / "config.toml").read_text()
    import tomllib

    effective = tomllib.loads(written)
    assert effective["lr"] == 0.002  # the flag wins
    assert effective["optimizer"] == "adamw" and effective["method_options"] == {"gamma": 0.3, "normalize": "curvature"}
    history = ckpt_io.load(out / "last.safetensors").history[-1]
    assert history["config"]["lr"] == 0.002 and history["config"]["schedule"] == "linear"
    # the effective file is itself a valid run file
    again = cli("train", "--config", str(out / "config.toml"), "--out", str(tmp_path / "again"), "-q")
    assert again.exit_code == 0, again.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("batchsize = 3\n")
    result = cli("train", "--config", str(bad))
    assert result.exit_code == 2 and "unknown key(s) batchsize" in result.stderr and "batch_size" in result.stderr
    bad.write_text('batch_size = "big"\n')
    result = cli("train", "--config", str(bad))
    assert result.exit_code == 2 and "key 'batch_size' must be int" in result.stderr
    bad.write_text("batch_size = \n")
    result = cli("train", "--config", str(bad))
    assert result.exit_code == 2 and "not valid TOML" in result.stderr


def test_learning_rate_schedules():
    cfg = TrainConfig(checkpoint="c", data="d", out="o", lr=1.0, warmup_steps=4, schedule="cosine")
    assert [lr_at(cfg, s, 12) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(cfg, 4, 12) == pytest.approx(1.0)
    assert lr_at(cfg, 8, 12) == pytest.approx(0.5)
    assert lr_at(cfg, 12, 12) == pytest.approx(0.0, abs=1e-12)
    cfg.schedule = "linear"
    assert lr_at(cfg, 8, 12) == pytest.approx(0.5)
    cfg.schedule, cfg.warmup_steps = "constant", 0
    assert lr_at(cfg, 100, 12) == 1.0


def _cfg(base_checkpoint, sample_dir, out, **kw):
    settings = {"batch_size": 64, "max_steps": 6, "seed": 3, **kw}
    return TrainConfig(
        checkpoint=str(base_checkpoint), data=str(sample_dir / "train.parquet"), out=str(out), **settings
    )


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd"])
def test_optimizers_and_clipping_train(optimizer, base_checkpoint, sample_dir, tmp_path):
    result = train(
        _cfg(
            base_checkpoint,
            sample_dir,
            tmp_path / optimizer,
            optimizer=optimizer,
            weight_decay=0.01,
            grad_clip=0.5,
            method="cograd",
        ),
        Log(quiet=True),
    )
    assert result["steps"] == 6
    before, after = ckpt_io.load(base_checkpoint).state, weights(tmp_path / optimizer)
    assert any(not torch.equal(before[n], after[n]) for n in before)


def test_gradient_clipping_bounds_the_step(base_checkpoint, sample_dir, tmp_path):
    """SGD without momentum, lr 1, clip c: no parameter moves more than c in total norm."""
    clip = 1e-3
    train(
        _cfg(
            base_checkpoint,
            sample_dir,
            tmp_path / "clip",
            optimizer="sgd",
            momentum=0.0,
            lr=1.0,
            grad_clip=clip,
            max_steps=1,
        ),
        Log(quiet=True),
    )
    before, after = ckpt_io.load(base_checkpoint).state, weights(tmp_path / "clip")
    moved = torch.sqrt(sum(((after[n] - before[n]).double() ** 2).sum() for n in before))
    assert 0 < float(moved) <= clip * (1 + 1e-5)


def test_nonfinite_abort_keeps_last_good_state_and_skip_counts(base_checkpoint, sample_dir, tmp_path, monkeypatch):
    import cogradctl.taskgrad as taskgrad

    real = taskgrad.masked_losses  # what TaskGradients computes each step's losses with
    calls = {"n": 0}

    def poisoned(outputs, labels, schema):
        calls["n"] += 1
        losses, denominators = real(outputs, labels, schema)
        return (losses * float("nan") if calls["n"] == 4 else losses), denominators

    monkeypatch.setattr(taskgrad, "masked_losses", poisoned)
    with pytest.raises(Diverged, match=r"non-finite loss or gradient for task\(s\) click, like, share at step 4"):
        train(_cfg(base_checkpoint, sample_dir, tmp_path / "abort", save_every=2), Log(quiet=True))
    assert ckpt_io.load(tmp_path / "abort" / "last.safetensors").training_state["step"] == 2
    assert Diverged.exit_code == 4
    calls["n"] = 0
    result = train(_cfg(base_checkpoint, sample_dir, tmp_path / "skip", on_nonfinite="skip"), Log(quiet=True))
    assert result["steps"] == 6 and result["skipped"] == 1
    assert '"skipped_total": 1' in (tmp_path / "skip" / "metrics.jsonl").read_text()


def test_bf16_autocast_on_cpu_trains(base_checkpoint, sample_dir, tmp_path):
    result = train(
        _cfg(
            base_checkpoint,
            sample_dir,
            tmp_path / "bf16",
            precision="bf16",
            valid=str(sample_dir / "valid.parquet"),
            max_steps=30,
            lr=3e-3,
        ),
        Log(quiet=True),
    )
    mean = lambda r: sum(m["auc"] for m in r["tasks"].values()) / 3
    assert mean(result["after"]) > mean(result["before"])
    with pytest.raises(UsageError, match="fp16 needs a CUDA device"):
        train(_cfg(base_checkpoint, sample_dir, tmp_path / "fp16", precision="fp16"), Log(quiet=True))


def test_early_stopping(base_checkpoint, sample_dir, tmp_path):
    result = train(
        _cfg(
            base_checkpoint,
            sample_dir,
            tmp_path / "early",
            valid=str(sample_dir / "valid.parquet"),
            lr=1e-12,
            eval_every=1,
            early_stopping=2,
            max_steps=50,
        ),
        Log(quiet=True),
    )
    assert result["stopped_early"] and result["steps"] == 2
    assert ckpt_io.load(tmp_path / "early" / "last.safetensors").training_state["finished"]


def test_input_checkpoint_is_never_modified(base_checkpoint, sample_dir, tmp_path):
    before = base_checkpoint.read_bytes()
    train(_cfg(base_checkpoint, sample_dir, tmp_path / "ro"), Log(quiet=True))
    assert base_checkpoint.read_bytes() == before


def test_tensorboard_logs_the_losses(base_checkpoint, sample_dir, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    train(
        _cfg(base_checkpoint, sample_dir, out, tensorboard=True, log_every=2, valid=str(sample_dir / "valid.parquet")),
        Log(quiet=True),
    )
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"loss/click", "loss/like", "loss/share", "valid/click/auc"} <= set(tags)
    logged = {e.step: e.value for e in events.Scalars("loss/click")}
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for r in records:
        if "loss" in r:
            assert logged[r["step"]] == pytest.approx(r["loss"]["click"], rel=1e-6)
