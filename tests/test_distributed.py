"""Data-parallel runs under torchrun (gloo on CPU, 2 processes) against one process with the same
global batch: the same weights, the same transference, resume after a kill and with another number
of processes, a SIGTERM to one process stopping all of them cleanly.

Tolerance for "the same weights": the two runs differ only in float32 summation order (two local
means combined by the all-reduce against one mean over the global batch), about 1e-7 relative per
step; over the ~26 Adam steps here the largest difference measured is under 1e-7 on weights of
order 0.1–1. 1e-5 leaves a wide margin and still fails for any real difference (one skipped or
repeated batch, a missing row weight, an unreduced task gradient all move weights by > 1e-3).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from cogradctl import checkpoint as ckpt_io
from cogradctl import sample
from cogradctl.errors import UsageError
from cogradctl.train import TrainConfig, data_shards, previous_state
from tests.runs import saved_step, torchrun, weights

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5
# 1537 rows: the two data shards have 768 and 769 rows, so with 64 rows per process the second
# process has a 13th batch of one row while the first has none: the uneven end of an epoch.
ROWS, PER_RANK = 1537, 64


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    sample.write(sample.generate(ROWS, seed=11), root / "train.parquet")
    return root / "train.parquet"


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "COGRADCTL_DEBUG": ""}


def run(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)


def assert_close(a: dict, b: dict, tol: float = TOL) -> None:
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= tol, f"largest weight difference {worst:.3g} > {tol}"


def train_args(ckpt, data, out, method_args, *extra):
    return [
        "train",
        "--checkpoint",
        ckpt,
        "--data",
        data,
        "--epochs",
        "2",
        "--seed",
        "3",
        "--device",
        "cpu",
        "--out",
        out,
        "--quiet",
        *method_args,
        *extra,
    ]


METHODS = {
    "ew": ["--method", "ew"],
    "cograd": ["--method", "cograd", "--gamma", "0.3"],
    "cograd-exact-hessian": ["--method", "cograd", "--gamma", "0.3", "-o", "hessian=exact"],
    "gdod": ["--method", "gdod"],
    "pcgrad": ["--method", "pcgrad"],
}


@pytest.mark.parametrize("name", list(METHODS))
def test_two_processes_match_one_process_with_the_same_global_batch(
    name, base_checkpoint, uneven, sample_dir, tmp_path, cli
):
    two, one = tmp_path / "two", tmp_path / "one"
    valid = ["--valid", sample_dir / "valid.parquet"]
    proc = run(
        torchrun(
            2, *train_args(base_checkpoint, uneven, two, METHODS[name], "--batch-size", PER_RANK, *valid, "--json")
        )
    )
    assert proc.returncode == 0, proc.stderr[:4000]
    result = json.loads(proc.stdout)  # rank 0 alone prints: one JSON document
    ref = cli(
        *train_args(
            base_checkpoint,
            uneven,
            one,
            METHODS[name],
            "--batch-size",
            2 * PER_RANK,
            "--data-shards",
            2,
            *valid,
            "--json",
        )
    )
    assert ref.exit_code == 0, ref.output
    assert result["steps"] == json.loads(ref.stdout)["steps"] == 2 * 13
    assert_close(weights(two), weights(one))
    # Rank 0 alone wrote the logs: every step record once, with the global batch's losses.
    recs = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in recs if "loss" in r]
    assert steps == sorted(set(steps))
    ref_recs = {r["step"]: r for r in map(json.loads, (one / "metrics.jsonl").read_text().splitlines()) if "loss" in r}
    for r in recs:
        if "loss" in r:
            for task, value in r["loss"].items():
                assert value == pytest.approx(ref_recs[r["step"]]["loss"][task], rel=1e-5, abs=1e-7)
    state = ckpt_io.load(two / "last.safetensors").training_state
    assert state["finished"] and state["config"]["global_batch"] == 2 * PER_RANK and state["config"]["data_shards"] == 2


def children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry.name))
    return out


def start_and_wait(cmd: list[str], out: Path, step: int) -> tuple[subprocess.Popen, list[int]]:
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while saved_step(out) < step:
        assert proc.poll() is None, "the run ended before it could be interrupted: " + proc.communicate()[1][-2000:]
        assert time.time() < deadline, "the run made no progress"
        time.sleep(0.02)
    workers = children(proc.pid)
    assert len(workers) == 2, workers
    return proc, workers


def rank_of(pid: int) -> int:
    return int(
        dict(
            line.split("=", 1) for line in Path(f"/proc/{pid}/environ").read_bytes().decode().split("\0") if "=" in line
        )["RANK"]
    )


LONG = [
    "--method",
    "pcgrad",
    "--batch-size",
    "16",
    "--epochs",
    "2",
    "--save-every",
    "2",
]  # 2 × 63 steps: a resume crosses an epoch


def test_sigkill_of_one_process_then_rerun_gives_the_same_weights(base_checkpoint, sample_dir, tmp_path):
    data = sample_dir / "train.parquet"
    reference, out = tmp_path / "reference", tmp_path / "killed"
    proc = run(torchrun(2, *train_args(base_checkpoint, data, reference, LONG)))
    assert proc.returncode == 0, proc.stderr[:4000]
    proc, workers = start_and_wait(torchrun(2, *train_args(base_checkpoint, data, out, LONG)), out, 20)
    os.kill(workers[0], signal.SIGKILL)
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert 20 <= saved_step(out) < 2 * 63
    again = run(torchrun(2, *train_args(base_checkpoint, data, out, LONG)))  # the same command resumes
    assert again.returncode == 0, again.stderr[-3000:]
    state = ckpt_io.load(out / "last.safetensors").training_state
    assert state["step"] == 2 * 63, (state, again.stderr[-3000:])
    for name, value in weights(reference).items():
        assert torch.equal(value, weights(out)[name]), name


def test_sigterm_to_one_process_stops_both_and_resumes_with_one_process(base_checkpoint, sample_dir, tmp_path, cli):
    data = sample_dir / "train.parquet"
    out, reference = tmp_path / "stopped", tmp_path / "reference"
    proc, workers = start_and_wait(torchrun(2, *train_args(base_checkpoint, data, out, LONG)), out, 20)
    rank1 = next(pid for pid in workers if rank_of(pid) == 1)
    os.kill(rank1, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "stopped by SIGTERM" in err  # rank 0's message: the stop reached it
    state = ckpt_io.load(out / "last.safetensors").training_state
    assert not state["finished"] and 20 <= state["step"] < 2 * 63
    # Resume with one process: --batch-size is per process, so the global batch of 32 is kept.
    wrong = cli(*train_args(base_checkpoint, data, out, [*LONG[:2], "--batch-size", "16", *LONG[4:]]))
    assert wrong.exit_code == 2 and "--batch-size 32" in wrong.stderr
    resumed = cli(*train_args(base_checkpoint, data, out, [*LONG[:2], "--batch-size", "32", *LONG[4:]]))
    assert resumed.exit_code == 0, resumed.output
    ref = cli(
        *train_args(
            base_checkpoint, data, reference, [*LONG[:2], "--batch-size", "32", "--data-shards", "2", *LONG[4:]]
        )
    )
    assert ref.exit_code == 0, ref.output
    assert_close(weights(out), weights(reference))


def test_distributed_transference_equals_one_process(base_checkpoint, sample_dir, tmp_path, cli):
    args = [
        "measure-transference",
        "--checkpoint",
        base_checkpoint,
        "--data",
        sample_dir / "valid.parquet",
        "--batches",
        "5",
        "--batch-size",
        "64",
        "--holdout",
        "--by-module",
        "--device",
        "cpu",
        "--json",
    ]
    proc = run(torchrun(2, *args))
    assert proc.returncode == 0, proc.stderr[:4000]
    one = cli(*args)
    assert one.exit_code == 0, one.output
    assert json.loads(proc.stdout) == json.loads(one.stdout)


def test_data_shards_must_split_evenly_among_processes(tmp_path):
    cfg = TrainConfig(checkpoint="c", data="d", out=str(tmp_path), batch_size=64, data_shards=3)
    with pytest.raises(UsageError, match="--data-shards 3: run it with a number of processes that divides 3"):
        data_shards(cfg, None, 2)
    assert data_shards(TrainConfig(checkpoint="c", data="d", out=str(tmp_path), batch_size=64), None, 4) == 4
    with pytest.raises(UsageError, match="not a multiple of the 3 data shards"):
        data_shards(TrainConfig(checkpoint="c", data="d", out=str(tmp_path), batch_size=64, data_shards=3), None, 1)
    # A resumed run keeps its shards: 4 of them resume on 1, 2 or 4 processes, not on 3.
    state = {"config": {"data_shards": 4}}
    assert data_shards(TrainConfig(checkpoint="c", data="d", out=str(tmp_path), batch_size=60), state, 2) == 4
    with pytest.raises(UsageError, match="reads its data in 4 shard"):
        data_shards(TrainConfig(checkpoint="c", data="d", out=str(tmp_path), batch_size=60), state, 3)
    assert (
        previous_state(TrainConfig(checkpoint="c", data="d", out=str(tmp_path / "none")), tmp_path / "none", 2) is None
    )


def test_no_valid_rows_on_any_process_is_an_error(base_checkpoint, tmp_path):
    table = sample.generate(300, seed=3)
    table = table.set_column(table.schema.get_field_index("f0"), "f0", pa.array([float("nan")] * 300, pa.float32()))
    pq.write_table(table, tmp_path / "bad.parquet", row_group_size=100)
    proc = run(
        torchrun(
            2,
            "train",
            "--checkpoint",
            base_checkpoint,
            "--data",
            tmp_path / "bad.parquet",
            "--on-invalid-rows",
            "drop",
            "--batch-size",
            "32",
            "--device",
            "cpu",
            "--out",
            tmp_path / "out",
            "--quiet",
        )
    )
    assert proc.returncode != 0
    # counted before the run starts (train.report.count_rows), by every process
    assert "bad.parquet: no rows left after dropping 300 invalid row(s)" in proc.stderr


# ---------------------------------------------------------------------------- partial labels and weights


def _partial_model(checkpoint: str):
    from cogradctl.models import build, split_parameters

    source = ckpt_io.load(checkpoint)
    model, _ = build(source.model, source.schema, source.model_config)
    ckpt_io.load_into(model, source.state, checkpoint)
    return source.schema, model, split_parameters(model, source.schema.task_names, source.model)


def _partial_batch(checkpoint: str, path: str, rows: slice):
    from cogradctl import data
    from cogradctl.labels import LabelOptions
    from cogradctl.taskgrad import TaskGradients

    schema, model, split = _partial_model(checkpoint)
    inputs, labels = data.load(path, schema, LabelOptions(weight="w")).batch(rows)
    grads = TaskGradients(model, split, schema)
    losses, g, own = grads(inputs, labels, create_graph=True)
    return grads, losses, g, own


def _reduce_worker(rank: int, checkpoint: str, path: str, store: str, out: str) -> None:
    import torch.distributed as tdist

    from cogradctl.distributed import Dist, StepReducer

    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        grads, losses, g, own = _partial_batch(checkpoint, path, slice(rank * 32, rank * 32 + 32))
        reducer = StepReducer(Dist(rank, 2))
        losses, own = reducer(32, losses, g, own, False, grads.denominators)
        hvp = reducer.hvp(32, grads.hvp())
        v = torch.randn(g.shape[1], generator=torch.Generator().manual_seed(0))
        result = {"losses": losses, "g": g.clone(), "own": own, "hvp": [hvp(i, v) for i in range(len(losses))]}
        torch.save(result, f"{out}/{rank}.pt")
    finally:
        tdist.destroy_process_group()


def test_partial_labels_and_weights_reduce_as_one_process_with_the_global_batch(base_checkpoint, tmp_path):
    """Two gloo processes of 32 rows each, rank 0 without any 'like' label and with row weights:
    the reduced losses, shared and own gradients and Hessian-vector products are those of one
    process holding the 64 rows (each task's loss a weighted mean over its observed rows)."""
    import torch.multiprocessing as mp

    t = sample.generate(64, seed=4)
    like = t.column("like").to_pylist()
    like[:40] = [None] * 40  # rank 0 has none; rank 1 has 24
    t = t.set_column(t.schema.get_field_index("like"), "like", pa.array(like, pa.int8()))
    t = t.append_column("w", pa.array(torch.rand(64, generator=torch.Generator().manual_seed(1)).numpy() * 3))
    pq.write_table(t, tmp_path / "partial.parquet")
    args = (str(base_checkpoint), str(tmp_path / "partial.parquet"), str(tmp_path / "store"), str(tmp_path))
    mp.spawn(_reduce_worker, args=args, nprocs=2)
    grads, losses, g, own = _partial_batch(str(base_checkpoint), args[1], slice(0, 64))
    v = torch.randn(g.shape[1], generator=torch.Generator().manual_seed(0))
    hvps = [grads.hvp()(i, v) for i in range(len(losses))]
    for rank in range(2):
        got = torch.load(tmp_path / f"{rank}.pt")
        assert torch.allclose(got["losses"], losses, rtol=1e-5, atol=1e-7)
        assert torch.allclose(got["g"], g, rtol=1e-4, atol=1e-7)
        for task, grads_of_task in own.items():
            for a, b in zip(got["own"][task], grads_of_task):
                assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)
        for a, b in zip(got["hvp"], hvps):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
