"""How CoGrad's raw γ and its scale-free strengths relate, measured on a real model.

    python benchmarks/cograd_scale.py [--checkpoint CKPT --data PATH] [--batches 8] [--batch-size 1024]

Without --checkpoint, an MMoE is initialised on sample_data/ and trained one epoch with ew (as the
issue's Census measurement was). For each setting, on the same batches: the mean over batches and
tasks of ‖correction_i‖ / ‖g_i‖ (the `relative_correction` CoGrad logs), and the relative change of
the shared update against ew, ‖u − u_ew‖ / ‖u_ew‖. Prints a Markdown table (docs/methods.md quotes it).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cogradctl import checkpoint as ckpt_io  # noqa: E402
from cogradctl import data as data_io  # noqa: E402
from cogradctl import models  # noqa: E402
from cogradctl.console import Log  # noqa: E402
from cogradctl.methods import get_method  # noqa: E402
from cogradctl.stream import ParquetStream  # noqa: E402
from cogradctl.taskgrad import TaskGradients  # noqa: E402
from cogradctl.train import TrainConfig, train  # noqa: E402

SETTINGS = (
    [("none", g) for g in (1e-2, 1.0, 1e2, 1e4, 1e6)]
    + [("curvature", g) for g in (0.01, 0.1, 1.0)]
    + [("relative", g) for g in (0.01, 0.1, 1.0)]
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--data", default=str(ROOT / "sample_data" / "train.parquet"))
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=1024)
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.checkpoint
        if ckpt is None:
            schema, _ = data_io.infer_schema(
                args.data, ["click", "like", "share"], {t: "binary" for t in ("click", "like", "share")}
            )
            net, config = models.build("mmoe", schema, {})
            init = Path(tmp) / "init.safetensors"
            ckpt_io.save(ckpt_io.Checkpoint("mmoe", config, schema, net.state_dict(), []), init)
            train(
                TrainConfig(
                    checkpoint=str(init), data=args.data, out=f"{tmp}/base", batch_size=args.batch_size, epochs=1
                ),
                Log(quiet=True),
            )
            ckpt = Path(tmp) / "base" / "last.safetensors"
        loaded, model, split = models.from_checkpoint(ckpt)
        grads = TaskGradients(model, split, loaded.schema)
        stream = ParquetStream(args.data, loaded.schema)
        matrices = []
        for k, (inputs, labels) in enumerate(stream.batches(args.batch_size, shuffle=True, seed=0, epoch=1)):
            if k == args.batches:
                break
            _, g, _ = grads(inputs, labels)
            matrices.append(g.clone())
    ew = get_method("ew")
    print(
        f"Model: {loaded.model}, {split.num_shared} shared parameters, K = {len(loaded.schema.tasks)}, {len(matrices)} batches of {args.batch_size}.\n"
    )
    print("| normalize | γ | ‖correction_i‖ / ‖g_i‖ (mean) | ‖u − u_ew‖ / ‖u_ew‖ (mean) |")
    print("|---|---:|---:|---:|")
    for mode, gamma in SETTINGS:
        rel, change = [], []
        for g in matrices:
            m = get_method("cograd", gamma=gamma, normalize=mode)
            u = m(g)
            base = ew(g)
            rel.append(sum(m.stats["relative_correction"]) / len(m.stats["relative_correction"]))
            change.append(float((u - base).norm() / base.norm()))
        print(f"| {mode} | {gamma:g} | {sum(rel) / len(rel):.3g} | {sum(change) / len(change):.3g} |")


if __name__ == "__main__":
    main()
