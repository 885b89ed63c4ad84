"""The evidence study's CTR/CVR partial-label data set at a tiny size (in this interpreter): the weight
column reaches every train, evaluate and measure step and is no feature, a single-task model never sees
the other task's label, and the markdown's purchase AUCs are the evaluate records' (recomputed here);
the rows and weights evaluate scored are counted independently from the test file."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from evidence import config, plan, report  # noqa: E402

CFG = {**config.TINY, "rhos": [], "hessian": None, "ctr": True, "cograd_grid": [0.1]}


def step(steps: Path, key: str) -> dict:
    return json.loads((steps / f"{key}.json").read_text())


def test_ctr_cvr_case(tmp_path):
    out, results = tmp_path / "run", tmp_path / "results.md"
    args = argparse.Namespace(
        out=str(out), source=None, jobs=1, in_process=True, fresh_processes=False, report_only=False, tiny=True
    )
    args.quick = False
    study = plan.run_study(args, CFG)
    report.write_results(study, CFG, args, results)
    md, steps, seeds = results.read_text(), out / "steps", CFG["seeds"]
    assert "complete." in md and "PARTIAL" not in md

    features = step(steps, "ctr-cvr-init-s0")["result"]["features"]
    assert "weight" not in features and features["history"] == "sequence"
    for task, other in (("click", "purchase"), ("purchase", "click")):
        single = step(steps, f"ctr-cvr-init-{task}-s0")["result"]["features"]
        assert other not in single and "weight" not in single
    weighted = ("ctr-cvr-scratch-ew-s0", "ctr-cvr-scratch-ew-s0-test", "ctr-cvr-measure")
    for key in (*weighted, "ctr-cvr-finetune-single-purchase-s1"):
        assert "--weight-column weight" in step(steps, key)["command"], key

    # evaluate scored purchase on its observed test rows only, weighted: counted from the file itself.
    test = pq.read_table(out / "data" / "ctr-cvr" / "new" / "valid.parquet")
    observed = pc.is_valid(test["purchase"])
    scored = step(steps, "ctr-cvr-scratch-ew-s0-test")["result"]["tasks"]
    assert scored["purchase"]["rows"] == pc.sum(observed).as_py() < test.num_rows
    assert abs(scored["purchase"]["weight"] - pc.sum(pc.filter(test["weight"], observed)).as_py()) < 1e-3
    assert abs(scored["click"]["weight"] - pc.sum(test["weight"]).as_py()) < 1e-3

    for proto in ("scratch", "finetune"):
        rows = md.split(f"## ctr-cvr — {proto}", 1)[1].split("\n## ", 1)[0]
        ew = next(line for line in rows.splitlines() if line.startswith("| ew |"))
        values = [step(steps, f"ctr-cvr-{proto}-ew-s{s}-test")["result"]["tasks"]["purchase"]["auc"] for s in seeds]
        assert f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f}" == ew.split("|")[4].strip()
