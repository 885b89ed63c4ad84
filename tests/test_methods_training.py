"""Every registered method trains the sample data: finite throughout, better validation AUC."""

import json
import math

import pytest

from cogradctl.console import Log
from cogradctl.methods import list_methods
from cogradctl.train import TrainConfig, train

METHODS = sorted(list_methods())


def test_every_issue_method_is_registered():
    expected = {
        "ew",
        "weighted",
        "uw",
        "dwa",
        "gradnorm",
        "mgda",
        "pcgrad",
        "gradvac",
        "cagrad",
        "imtl-g",
        "nash-mtl",
        "aligned-mtl",
        "metabalance",
        "gdod",
        "cograd",
    }
    assert expected <= set(METHODS)


@pytest.mark.parametrize("method", METHODS)
def test_method_trains_and_improves_validation_auc(method, sample_dir, base_checkpoint, tmp_path):
    options = {"weights": [1.0, 0.5, 0.5]} if method == "weighted" else {}
    cfg = TrainConfig(
        checkpoint=str(base_checkpoint),
        data=str(sample_dir / "train.parquet"),
        valid=str(sample_dir / "valid.parquet"),
        out=str(tmp_path / method),
        method=method,
        method_options=options,
        lr=3e-3,
        batch_size=64,
        max_steps=120,
        epochs=10,
        seed=1,
        log_every=20,
    )
    result = train(cfg, Log(quiet=True))
    assert result["steps"] == 120
    records = [json.loads(line) for line in (tmp_path / method / "metrics.jsonl").read_text().splitlines()]
    for r in records:
        for value in r.get("loss", {}).values():
            assert math.isfinite(value)
    mean = lambda res: sum(m["auc"] for m in res["tasks"].values()) / len(res["tasks"])
    assert mean(result["after"]) > mean(result["before"]) + 0.01


@pytest.mark.parametrize("method", ["uw", "gradnorm"])
def test_learned_task_weights_are_trained_by_the_loop(method, sample_dir, base_checkpoint):
    """uw and gradnorm set their weights' .grad inside the method; the loop's optimizer must step
    them. With SGD (lr η, no momentum) one step moves them by exactly −η·grad (regression test:
    zero_grad once ran after the method and erased that gradient, so uw trained like ew)."""
    import torch

    from cogradctl import checkpoint as ckpt_io
    from cogradctl.methods import get_method
    from cogradctl.models import build, split_parameters
    from cogradctl.stream import ParquetStream
    from cogradctl.taskgrad import TaskGradients
    from cogradctl.train import make_optimizer, train_step

    source = ckpt_io.load(base_checkpoint)
    model, _ = build(source.model, source.schema, source.model_config)
    ckpt_io.load_into(model, source.state, str(base_checkpoint))
    split = split_parameters(model, source.schema.task_names, source.model)
    m = get_method(method)
    m.setup(3)
    m.segments = [p.numel() for p in split.shared]
    cfg = TrainConfig(checkpoint="", data="", out="", optimizer="sgd", momentum=0.0, lr=0.1)
    optimizer = make_optimizer(cfg, [*model.parameters(), *m.parameters()])
    inputs, labels = next(ParquetStream(str(sample_dir / "train.parquet"), source.schema).batches(256, shuffle=False))
    (param,) = list(m.parameters())
    before = param.detach().clone()
    train_step(TaskGradients(model, split, source.schema), m, optimizer, inputs, labels)
    assert param.grad is not None
    assert torch.allclose(param.detach(), before - 0.1 * param.grad, atol=1e-7)
    assert not torch.equal(param.detach(), before)
