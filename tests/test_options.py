"""Numeric options (issue #21 item 7): every one finite and in range, refused with exit 2 and one
line before anything is written (--out is never created for a refused command)."""

from __future__ import annotations

import math

import pytest

from cogradctl.cli.options import count, finite
from cogradctl.errors import UsageError
from cogradctl.methods import get_method

TINY = ("--max-steps", "1", "--batch-size", "128", "--device", "cpu", "--quiet")

BAD_TRAIN = [
    ("--lr", "inf"),
    ("--lr", "nan"),
    ("--weight-decay", "nan"),
    ("--weight-decay", "inf"),
    ("--momentum", "nan"),
    ("--grad-clip", "inf"),
    ("--seed", "-1"),
    ("--seed", str(2**70)),
    ("--batch-size", str(2**70)),
    ("--gamma", "inf"),
    ("--gamma", "nan"),
    ("--gamma", "NaN"),
    ("--gamma", "abc"),
    ("--gamma", "-0.1"),
    ("--gamma", "[0.1,0.2]"),  # three tasks
    ("--gamma", "click=0.1,like=inf,share=0.1"),
    ("--weights", "click=-1,like=1,share=1"),
    ("--out", ""),
]


@pytest.mark.parametrize(("flag", "value"), BAD_TRAIN)
def test_bad_train_option_is_exit_2_before_out_exists(flag, value, cli, base_checkpoint, sample_dir, tmp_path):
    out = tmp_path / "run"
    method = ("--method", "cograd") if flag in ("--gamma", "--weights") else ()
    args = {"--out": str(out), flag: value} if flag == "--out" else {"--out": str(out)}
    argv = ["train", "--checkpoint", base_checkpoint, "--data", sample_dir / "train.parquet", *method, *TINY]
    for k, v in args.items():
        argv += [k, v]
    if flag != "--out":
        argv += [flag, value]
    result = cli(*argv)
    assert result.exit_code == 2, (flag, value, result.exit_code, result.stderr)
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists(), f"{flag} {value}: --out was created"


@pytest.mark.parametrize("seed", ["-1", str(2**70)])
@pytest.mark.parametrize("command", ["init", "import", "sample-data", "bench", "measure-transference"])
def test_bad_seed_is_exit_2_in_every_command(command, seed, cli, base_checkpoint, sample_dir, tmp_path):
    """--seed was checked by train alone: elsewhere -1 or 2**70 reached numpy/torch (exit 1)."""
    out = tmp_path / "out"
    data = str(sample_dir / "valid.parquet")
    argv = {
        "init": ["--model", "mmoe", "--data", data, "--tasks", "click", "--out", out],
        "import": ["--model", "mmoe", "--weights", tmp_path / "w.pt", "--data", data, "--tasks", "click", "--out", out],
        "sample-data": ["--out", out],
        "bench": ["--model", "mmoe", "--synthetic", "--steps", "2"],
        "measure-transference": ["--checkpoint", base_checkpoint, "--data", data],
    }[command]
    result = cli(command, *argv, "--seed", seed)
    assert result.exit_code == 2, (command, seed, result.exit_code, result.stderr)
    assert result.stderr.strip().splitlines() == [f"error: --seed must be an integer in [0, {2**63 - 1}], got {seed}"]
    assert not out.exists()


BAD_METHOD_OPTIONS = [
    ("cograd", {"gamma": math.inf}),
    ("cograd", {"gamma": math.nan}),
    ("cograd", {"gamma": "abc"}),
    ("cograd", {"gamma": -0.5}),
    ("cograd", {"weights": [1.0, -1.0]}),
    ("cograd", {"fisher_decay": math.nan}),
    ("weighted", {"weights": [1.0, math.nan]}),
    ("gdod", {"eps": math.inf}),
    ("uw", {"init": math.inf}),
    ("uw", {"init": math.nan}),
    ("gradnorm", {"alpha": math.nan}),
    ("gradnorm", {"alpha": -1.0}),
    ("mgda", {"max_iter": 0}),
    ("mgda", {"tol": math.nan}),
    ("nash-mtl", {"max_iter": 0}),
    ("nash-mtl", {"max_iter": math.inf}),
    ("nash-mtl", {"max_norm": math.nan}),
    ("dwa", {"temperature": math.inf}),
    ("dwa", {"period": 0}),
    ("cagrad", {"c": math.nan}),
    ("pcgrad", {"seed": -1}),
    ("pcgrad", {"seed": 2**70}),
    ("gradvac", {"eps": math.nan}),
    ("metabalance", {"main_task": math.inf}),
]


@pytest.mark.parametrize(("method", "options"), BAD_METHOD_OPTIONS)
def test_bad_method_option_is_a_usage_error_naming_it(method, options):
    with pytest.raises(UsageError, match=next(iter(options))):
        get_method(method, **options)


def test_good_method_options_still_pass():
    get_method("cograd", gamma=[0.1, 0.2, 0.0], weights=1)
    get_method("uw", init=-1.0)
    get_method("mgda", max_iter=1)
    get_method("weighted", weights=[0.0, 2])


def test_shared_validators():
    assert finite("--x", 0.5, 0) == 0.5
    assert finite("--x", None) is None
    for bad in (math.nan, math.inf, -math.inf, "1"):
        with pytest.raises(UsageError, match="--x must be a finite number"):
            finite("--x", bad)
    with pytest.raises(UsageError, match="--x must be > 0"):
        finite("--x", 0.0, 0, above=True)
    with pytest.raises(UsageError, match="--x must be ≤ 1"):
        finite("--x", 1.5, 0, 1)
    with pytest.raises(UsageError, match="--n must be an integer in"):
        count("--n", 0)
    assert count("--n", 3) == 3
