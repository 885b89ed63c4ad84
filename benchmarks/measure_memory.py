"""Peak RSS of ``cogradctl measure-transference`` against embedding-table size, row-sparse and dense
(issue #24; docs/transference.md, "Embedding tables"). Prints a Markdown table.

    python benchmarks/measure_memory.py [--log2-rows 16,20,23] [--dense-up-to 20]
                                        [--batches 4] [--batch-size 1024] [--by-module]

The model and data are benchmarks/embeddings.py's: the built-in mmoe (embedding_dim 16, K = 3
tasks) on the sample data plus two id features hashed into 2^s rows each, uniformly drawn ids (a
batch touches about as many distinct rows of each table as it has rows). Each checkpoint comes
from ``cogradctl init`` (no optimizer state: ``--lookahead sgd``). Each measurement is one
``measure-transference --embeddings coordinate|dense --json`` process; its peak RSS is
``ru_maxrss`` of that process alone (read by a wrapper process that runs nothing else), against
the size of the tables themselves. Dense only up to 2^``--dense-up-to`` rows: beyond, its K×P
matrices need more memory than a small machine has (docs/transference.md gives the arithmetic).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from embeddings import init, write_data  # noqa: E402  (benchmarks/embeddings.py: the same model and data)

WRAPPER = (
    "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
)


def peak_rss_mb(cmd: list[str]) -> float:
    """The peak RSS (MB) of ``cmd``, run as the only child of a fresh wrapper process."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", WRAPPER, *cmd], check=True, capture_output=True, text=True, env=env)
    return int(out.stdout.split()[-1]) / 1024  # ru_maxrss is in KiB on Linux


def quietly(fn, *args) -> None:
    """``fn(*args)`` with this process's stdout (fd 1, inherited by its subprocesses) sent to /dev/null:
    ``cogradctl init``'s summary line would cut the table."""
    sys.stdout.flush()
    saved, null = os.dup(1), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    try:
        fn(*args)
    finally:
        os.dup2(saved, 1)
        os.close(null)
        os.close(saved)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log2-rows", default="16,20,23")
    parser.add_argument("--dense-up-to", type=int, default=20)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--by-module", action="store_true")
    args = parser.parse_args()
    rows = [int(s) for s in args.log2_rows.split(",")]
    print(
        f"mmoe, two hash:2^s id features × 16, K = 3; {args.batches} batches × {args.batch_size} rows, --lookahead sgd"
    )
    print()
    print("| rows per table | tables MB | path | peak RSS MB | peak − tables MB |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data.parquet"
        write_data(data)
        for s in rows:
            ckpt = Path(tmp) / f"init{s}.safetensors"
            quietly(init, data, s, ckpt)
            tables_mb = 2 * (1 << s) * 16 * 4 / 1e6
            for path in ("coordinate", "dense"):
                if path == "dense" and s > args.dense_up_to:
                    continue
                cmd = [sys.executable, "-m", "cogradctl", "measure-transference", "--checkpoint", str(ckpt)]
                cmd += ["--data", str(data), "--batches", str(args.batches), "--batch-size", str(args.batch_size)]
                cmd += ["--embeddings", path, "--json", "--quiet", "--device", "cpu"]
                cmd += ["--by-module"] if args.by_module else []
                rss = peak_rss_mb(cmd)
                print(f"| 2^{s} | {tables_mb:,.0f} | {path} | {rss:,.0f} | {rss - tables_mb:,.0f} |", flush=True)
            ckpt.unlink()
    print()
    print(json.dumps({"machine": os.uname().machine, "cpus": os.cpu_count()}))


if __name__ == "__main__":
    main()
