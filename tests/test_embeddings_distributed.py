"""Row-sparse embedding tables under torchrun (``--embeddings coordinate|sum``): the processes
exchange their touched rows (``distributed.StepReducer.rows``), not whole tables.

The merge of the processes' rows (``distributed.merge_rows``, the same placing and division the
exchange uses) against a dense float64 hand computation; then two gloo processes against one
process with the same global batch (``--data-shards 2``, twice the batch), as tests/test_distributed.py
does for the dense path, and a run saved under torchrun resumed by one process.

Tolerance for "the same weights" (1e-5), argued as in test_distributed: the runs differ only in
float32 summation order (two local means combined by the all-reduce against one mean over the
global batch), about 1e-7 relative per step; the largest difference measured over these runs (26
and 64 steps) is 3e-8 on weights of order 0.1–1. A real fault moves weights by far more (measured
here): the rows left unexchanged (each process stepping on its own touched rows) by 1e-2 in either
test, every task weighted by the same denominator (partial labels ignored) by 8e-3.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from cogradctl import checkpoint as ckpt_io
from cogradctl import sample
from cogradctl.distributed import merge_rows
from tests.runs import saved_step, torchrun, weights

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5
TABLE = "input.embedding.weight"  # the tiny MMoE's one table (every categorical feature's rows)

# ---------------------------------------------------------------------------- the merge, in-process


def dense_gradient(vocab: int, index: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """A process's K × rows × dim block as the K × vocab × dim gradient it stands for (untouched rows 0)."""
    out = torch.zeros(block.shape[0], vocab, block.shape[2], dtype=torch.float64)
    for j, row in enumerate(index.tolist()):
        out[:, row] = block[:, j]
    return out


def test_merge_rows_is_the_denominator_weighted_mean_on_the_union_of_touched_rows():
    """Three processes, two tables (vocab 10 × dim 3, vocab 7 × dim 2), K = 3 tasks: overlapping and
    disjoint rows, a process with no row of the second table, a task one process did not observe
    (d = 0: its rows must not count) and a task no process observed (stays zero)."""
    gen = torch.Generator().manual_seed(0)
    vocab, dims = (10, 7), (3, 2)
    index = [
        [torch.tensor([1, 4, 9]), torch.tensor([0, 6])],
        [torch.tensor([4, 5]), torch.tensor([], dtype=torch.long)],
        [torch.tensor([0, 1, 5, 8]), torch.tensor([2, 6])],
    ]
    d = [torch.tensor([5.0, 2.5, 0.0]), torch.tensor([3.0, 0.0, 0.0]), torch.tensor([1.5, 4.0, 0.0])]
    blocks = [
        [torch.randn(3, ids.numel(), dim, generator=gen, dtype=torch.float64) for ids, dim in zip(rows, dims)]
        for rows in index
    ]
    unions, merged = merge_rows([(i, b, w) for i, b, w in zip(index, blocks, d)])
    assert [u.tolist() for u in unions] == [[0, 1, 4, 5, 8, 9], [0, 2, 6]]
    total = sum(d)
    at = 0
    for t in range(2):
        want = sum(w[:, None, None] * dense_gradient(vocab[t], i[t], b[t]) for i, b, w in zip(index, blocks, d))
        want[:2] /= total[:2, None, None]  # task 2: Σ d = 0, its rows stay 0
        width = unions[t].numel() * dims[t]
        got = merged[:, at : at + width].reshape(3, unions[t].numel(), dims[t])
        at += width
        torch.testing.assert_close(got, want[:, unions[t]], rtol=1e-15, atol=1e-15)
        untouched = torch.ones(vocab[t], dtype=torch.bool)
        untouched[unions[t]] = False
        assert not want[:, untouched].any()  # the union holds every row with a gradient
    assert at == merged.shape[1] and not merged[2].any()
    # task 0's value on row 4 of table 0, by hand: processes 0 and 1 touched it
    by_hand = (5.0 * blocks[0][0][0, 1] + 3.0 * blocks[1][0][0, 0]) / (5.0 + 3.0 + 1.5)
    torch.testing.assert_close(merged[0, 2 * 3 : 3 * 3], by_hand, rtol=1e-15, atol=0)


# ---------------------------------------------------------------------------- torchrun, 2 processes


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "COGRADCTL_DEBUG": ""}


def train(ckpt, data, out, *extra) -> list:
    common = ["train", "--checkpoint", ckpt, "--data", data, "--seed", "3", "--device", "cpu", "--out", out]
    return [*common, "--quiet", "--optimizer", "adamw", "--weight-decay", "0.01", *extra]


def assert_close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= TOL, f"largest difference {worst:.3g} > {TOL}"


def test_coordinate_with_two_processes_equals_one_process_with_the_global_batch(base_checkpoint, tmp_path, cli):
    """cograd coordinating the touched rows; 1537 rows (uneven shards: the second epoch's last step
    has one row on one process and none on the other), 'like' unobserved in a block of rows and a
    weight column, so the processes' denominators differ per task."""
    table = sample.generate(1537, seed=11)
    like = table.column("like").to_pylist()
    like[200:700] = [None] * 500
    table = table.set_column(table.schema.get_field_index("like"), "like", pa.array(like, pa.int8()))
    table = table.append_column("w", pa.array(torch.rand(1537, generator=torch.Generator().manual_seed(1)).numpy() * 3))
    pq.write_table(table, tmp_path / "partial.parquet", row_group_size=256)
    method = ["--method", "cograd", "--gamma", "0.3", "--embeddings", "coordinate", "--weight-column", "w"]
    method += ["--epochs", "2"]
    two, one = tmp_path / "two", tmp_path / "one"
    proc = subprocess.run(
        torchrun(2, *train(base_checkpoint, tmp_path / "partial.parquet", two, *method, "--batch-size", 64)),
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    ref = cli(
        *train(base_checkpoint, tmp_path / "partial.parquet", one, *method, "--batch-size", 128, "--data-shards", 2)
    )
    assert ref.exit_code == 0, ref.output
    got, want = ckpt_io.load(two / "last.safetensors"), ckpt_io.load(one / "last.safetensors")
    assert got.training_state["step"] == want.training_state["step"] == 2 * 13
    assert got.training_state["config"]["embeddings"] == "coordinate"
    assert_close(got.state, want.state)
    # the lazy optimizer: one step count per table, and the same rows ever touched (the union)
    assert torch.equal(got.extra[f"optim.step.{TABLE}"], want.extra[f"optim.step.{TABLE}"])
    never = (got.extra[f"optim.exp_avg_sq.{TABLE}"] == 0).all(dim=1)
    assert torch.equal(never, (want.extra[f"optim.exp_avg_sq.{TABLE}"] == 0).all(dim=1)) and never.any()
    assert_close(
        {k: got.extra[k] for k in (f"optim.exp_avg.{TABLE}", f"optim.exp_avg_sq.{TABLE}")},
        {k: want.extra[k] for k in (f"optim.exp_avg.{TABLE}", f"optim.exp_avg_sq.{TABLE}")},
    )


def workers_of(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry.name))
            except (OSError, ValueError, IndexError):
                continue
    return out


def test_sum_saved_under_torchrun_resumes_with_one_process(base_checkpoint, sample_dir, tmp_path, cli):
    """--embeddings sum with pcgrad on the dense layers: two processes stopped by a SIGTERM to one
    of them, resumed by one process with the same global batch, against one uninterrupted process."""
    data, out, reference = sample_dir / "train.parquet", tmp_path / "stopped", tmp_path / "reference"
    method = ["--method", "pcgrad", "--embeddings", "sum", "--epochs", "2", "--save-every", "2"]
    cmd = torchrun(2, *train(base_checkpoint, data, out, *method, "--batch-size", 32))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while saved_step(out) < 4:
        assert proc.poll() is None, "the run ended before it could be stopped: " + proc.communicate()[1][-2000:]
        assert time.time() < deadline, "the run made no progress"
        time.sleep(0.02)
    workers = workers_of(proc.pid)
    assert len(workers) == 2, workers
    os.kill(workers[-1], signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "stopped by SIGTERM" in err, err[-2000:]
    state = ckpt_io.load(out / "last.safetensors").training_state
    assert not state["finished"] and 4 <= state["step"] < 2 * 32
    assert state["config"]["embeddings"] == "sum"
    resumed = cli(*train(base_checkpoint, data, out, *method, "--batch-size", 64))
    assert resumed.exit_code == 0, resumed.output
    ref = cli(*train(base_checkpoint, data, reference, *method, "--batch-size", 64, "--data-shards", 2))
    assert ref.exit_code == 0, ref.output
    assert ckpt_io.load(out / "last.safetensors").training_state["step"] == 2 * 32
    assert_close(weights(out), weights(reference))
