#!/usr/bin/env python3
"""The evidence study (issue #26): where CoGrad and the other gradient methods change a model's
test AUC beyond seed noise, and whether measuring transference first tells a user when.

Usage::

    python benchmarks/study.py --out /tmp/study-run [--source ../shared/datasets/census-kdd]
                               [--quick | --tiny] [--jobs 2] [--results docs/results.md]
    python benchmarks/study.py --out /tmp/study-run --report-only   # results from the finished steps

Every step is one ``cogradctl`` command, run through the CLI's entry by one of ``--jobs`` long-lived
worker processes, which import torch and cogradctl once (``--fresh-processes``: a new interpreter per
step; ``--in-process``: in this interpreter, for the test); every worker runs this checkout's code,
model plugins included. Its exact command and JSON output are kept in ``OUT/steps/KEY.json``;
a step whose record has the same command and whose inputs are older than the record is reused, so
an interrupted study resumes where it stopped. Up to ``--jobs`` steps run at a time (each with one
torch thread), the data sets in the order listed below (the first finish first).

Data sets:

* ``syn±ρ``: the MMoE paper's synthetic construction (``cogradctl sample-data``, anchor task ``a``
  and task ``b`` at relatedness ρ, both 30 % positive) for ρ in {−0.5, 0, 0.5, 0.9}. ``sample-data
  --seed 0`` gives train and valid; ``--seed 1`` gives the fine-tuning data (its train file: rows the
  base never saw, same distribution) and test (its valid file).
* ``ctr-cvr``: ``cogradctl sample-data --kind ctr-cvr`` (tasks click and purchase, purchase null where
  click = 0, masked; a ``history`` sequence feature; a ``weight`` column, excluded from the features and
  given to train, evaluate and measure-transference as ``--weight-column``), split as ``syn±ρ``.
* ``census-g1``, ``census-g2``, ``census-all``: ``cogradctl data prepare census-kdd --group 1|2|all``
  (income+marital, education+marital, the three). For ``finetune`` the training split is cut in two
  random halves (seed 0): the base learns on the first from scratch, is fine-tuned on the second
  (docs/results-census.md fine-tunes a converged base under a decaying learning rate instead).

Protocols (per data set, every seed s):

* ``scratch``: ``init --seed s``, then ``train --method M --seed s`` for the whole schedule (warmup,
  cosine decay), as the MTL literature and LibMTL do.
* ``finetune``: the product's use. The base is an ``ew`` model trained from scratch with the same
  seed (synthetic: the scratch protocol's); it is fine-tuned on rows it never saw with a constant
  learning rate (room to act).

Methods: ew, cograd, gdod, pcgrad, mgda, cagrad, nash-mtl, uw at their defaults, except CoGrad,
whose strength γ is chosen per data set and protocol within a declared grid by the seed-0 run's
mean validation AUC at its last step (``hessian=diag normalize=relative`` given explicitly). The
single-task references are the same model built with one task (``init --tasks T``, the other tasks'
label columns excluded from its features) trained with the
same schedule (and, for ``finetune``, fine-tuned the same way from its own scratch model).

Every run's ``last.safetensors`` is scored once on test (``evaluate --json``); the validation AUCs
are the ones ``train`` reports at its last step. Nothing reads test to choose anything.

Outputs (``--results``, default docs/results.md; the figure beside it):

* per data set and protocol: per-task test AUC (mean ± sd over seeds), Δm% (LibMTL: the mean over
  tasks of (M_t − M_single,t) / M_single,t × 100, AUC higher is better), and each method − ew as a
  paired difference over seeds with a 95 % t interval and a verdict: better / worse only when the
  interval excludes 0, otherwise "no detectable difference";
* "does measurement predict the outcome": ``measure-transference`` on the seed-0 ``ew`` model (the
  base of ``finetune``) on validation — the transference ratio (what a step on one task does to the
  other's loss, as a fraction of what it does to its own), gradient cosine and conflict rate — beside
  every method's Δm% gain, and one PNG figure (needs matplotlib, the ``plot`` extra);
* CoGrad's Hessian isolated: on a small MMoE, ``hessian=exact`` (true Hessian-vector products),
  ``diag``, ``fisher-ema`` and ``outer`` at the same strengths, paired against ``ew`` on validation
  and on test;
* CoGrad's defaults: which γ the validation grid chose where, and the Hessian study's validation
  differences, from which a default change would follow;
* the setup, the exact commands, the machine and the time each step took. A study stopped early
  gives a file marked PARTIAL that lists the missing cells.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/: the package evidence, also when loaded by path

from evidence.config import FULL, QUICK, ROOT, TINY  # noqa: E402
from evidence.plan import run_study  # noqa: E402
from evidence.report import write_results  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", required=True, help="working directory: data, checkpoints, runs, step records")
    p.add_argument("--source", default=None, help="directory with the raw UCI census-kdd files (no census without it)")
    p.add_argument(
        "--quick", action="store_true", help="a smaller study (≤ 5 min on 2 idle cores): ρ = 0, 3 seeds, 4 methods"
    )
    p.add_argument("--tiny", action="store_true", help="the test's size: 2 seeds, ew and cograd, a few hundred rows")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="steps at a time (default: the core count)")
    p.add_argument("--in-process", action="store_true", help="call the CLI in this interpreter (one step at a time)")
    p.add_argument(
        "--fresh-processes",
        action="store_true",
        help="a new cogradctl process per step (default: --jobs long-lived workers)",
    )
    p.add_argument("--report-only", action="store_true", help="run nothing: write the results from the recorded steps")
    p.add_argument(
        "--results", default=None, help="the markdown file (default docs/results.md; --quick/--tiny: OUT/results.md)"
    )
    args = p.parse_args(argv)
    if args.in_process:
        args.jobs = 1
    cfg = TINY if args.tiny else QUICK if args.quick else FULL
    default = ROOT / "docs" / "results.md"
    path = (
        Path(args.results) if args.results else (Path(args.out) / "results.md" if args.quick or args.tiny else default)
    )
    report = run_study(args, cfg)
    (Path(args.out) / "report.json").write_text(json.dumps(report, indent=1, default=str))
    write_results(report, cfg, args, path)
    print(f"wrote {path} ({report['seconds'] / 60:.1f} min)", file=sys.stderr)


if __name__ == "__main__":
    main()
