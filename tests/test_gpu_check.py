"""benchmarks/gpu_check.py (issue #27) runs, small, on the CPU, so the GPU script cannot rot; and a
GPU out-of-memory error is the one-line exit 2 the script checks for on a GPU."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cogradctl import bench as bench_mod
from cogradctl.errors import OutOfMemory

ROOT = Path(__file__).resolve().parents[1]
# What torch 2.x says when a CUDA allocation fails (torch.OutOfMemoryError), abridged.
TORCH_OOM = (
    "CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 79.10 GiB of which "
    "3.25 GiB is free. Including non-PyTorch memory, this process has 75.84 GiB memory in use. Of the allocated "
    "memory 74.1 GiB is allocated by PyTorch. If reserved but unallocated memory is large try setting "
    "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation."
)


def test_the_out_of_memory_message_keeps_what_was_asked_for_and_the_capacity():
    text = str(OutOfMemory.from_torch(torch.OutOfMemoryError(TORCH_OOM)))
    assert text.startswith("out of GPU memory on cuda:0 (79.10 GiB in all) while allocating 20.00 GiB")
    assert "--batch-size" in text and "\n" not in text
    assert str(OutOfMemory.from_torch(RuntimeError("out of memory"))).startswith("out of GPU memory on the GPU:")


def test_a_gpu_running_out_of_memory_mid_command_exits_2_with_one_line(cli, monkeypatch):
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError(TORCH_OOM)

    monkeypatch.setattr(bench_mod, "bench", oom)
    result = cli("bench", "--model", "mmoe", "--synthetic", "--methods", "ew", "--device", "cpu", "--quiet")
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        "error: out of GPU memory on cuda:0 (79.10 GiB in all) while allocating 20.00 GiB: use a smaller "
        "--batch-size or model config, or a GPU with more memory"
    ]


def test_a_model_built_on_a_gpu_too_small_for_it_is_the_same_error(monkeypatch):
    from cogradctl import models
    from cogradctl.schema import Schema

    def factory(schema):
        raise torch.OutOfMemoryError(TORCH_OOM)

    monkeypatch.setattr(models.registry, "lookup", lambda *a, **k: factory)
    with pytest.raises(OutOfMemory, match="out of GPU memory on cuda:0"):
        models._call(factory, "big", Schema.__new__(Schema), {}, models.Budget(10, 10), "")


def test_gpu_check_runs_on_the_cpu(tmp_path):
    """Every area of the script, with its CPU profile: all PASS (on CPU nothing is a target), exit 0."""
    md = tmp_path / "check.md"
    proc = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--md", md],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line.split(" | ") for line in proc.stdout.splitlines() if line.startswith("| ") and " | PASS | " in line]
    areas = {row[0].lstrip("| ") for row in rows}
    assert areas == {"train", "resume", "measure", "torchrun", "oom", "bench"}, proc.stdout
    assert sum(row[0] == "| train" for row in rows) == 5  # each method once, cograd at bf16, fp16 refused
    assert "`bench`:" in proc.stdout and "`torchjd`:" in proc.stdout  # both timing tables were made
    assert md.read_text() == proc.stdout


@pytest.mark.parametrize("fused", [True, False])
def test_a_restored_step_count_goes_where_torch_would_put_it(fused):
    """Resuming on CUDA: the fused Adam kernel reads the step count on the parameter's device (the GPU
    check's first run failed there: 'state_steps is on cpu'). Oracle: torch's own load_state_dict
    policy. A meta-device parameter stands in for a GPU one (a device other than the CPU's)."""
    from types import SimpleNamespace

    from cogradctl.train.state import _placed

    param = torch.empty(3, device="meta")
    groups = [{"params": [0], "fused": fused, "capturable": False}]
    optimizer = SimpleNamespace(param_groups=[{"params": [param], "fused": fused, "capturable": False}])
    step = torch.tensor(7.0, dtype=torch.float64)
    ours = _placed("step", step, param, optimizer, torch.device("meta"))
    torch_policy = torch.optim.Optimizer._process_value_according_to_param_policy(param, step, 0, groups, "step")
    assert (ours.device, ours.dtype) == (torch_policy.device, torch_policy.dtype)
    assert ours.device.type == ("meta" if fused else "cpu")
    avg = _placed("exp_avg", torch.zeros(3), param, optimizer, torch.device("meta"))
    assert avg.device.type == "meta"
