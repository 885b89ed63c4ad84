"""docs/results.md: the setup, machine and time, every section, the missing cells and the exact commands."""

from __future__ import annotations

import json
import os
import platform
import statistics
from pathlib import Path

from .config import COGRAD_FIXED
from .figure import figure
from .tables import cells, conclusions, defaults_section, hessian_section, missing, prediction_section, results_table


def setup_section(cfg: dict, args) -> list[str]:
    s, f, c = cfg["scratch"], cfg["finetune"], cfg["census"]
    L = [
        "## Setup",
        "",
        f"- Seeds {', '.join(map(str, cfg['seeds']))} (`init --seed s` and `train --seed s`); methods "
        + ", ".join(f"`{m}`" for m in cfg["methods"])
        + f" at their defaults; CoGrad with `{' '.join(COGRAD_FIXED)}` and γ chosen per cell from "
        + "{"
        + ", ".join(f"{g:g}" for g in cfg["cograd_grid"])
        + "} by the seed-0 run's mean validation AUC at its last step.",
        f"- Synthetic (`sample-data --tasks a=1:0.3,b=ρ:0.3`), ρ ∈ {{{', '.join(f'{r:g}' for r in cfg['rhos'])}}}: "
        f"{cfg['syn']['rows']} training, {cfg['syn']['valid']} validation, {cfg['syn']['test']} test rows and "
        f"{cfg['syn']['ft_rows']} unseen rows for fine-tuning; the MMoE model ({json.dumps(cfg['syn']['model']) if cfg['syn']['model'] else 'its defaults'}).",
        f"- scratch: Adam, lr {s['lr']:g}, {s['warmup']} warmup steps then cosine decay to 0, {s['epochs']} epochs, batch {s['batch']}.",
        f"- finetune (synthetic): from the seed's scratch `ew` model, constant lr {f['lr']:g}, {f['epochs']} epochs, batch {f['batch']}, on the unseen rows.",
    ]
    if cfg["ctr"]:
        L.append(
            "- CTR/CVR partial labels (`sample-data --kind ctr-cvr`): tasks `click` and `purchase`, purchase null where "
            "click = 0 (`--missing-labels mask`, the default: a row teaches purchase only where it is observed), the "
            "`history` list column as a sequence feature, and row weights (`init --exclude-features weight`; `train`, "
            "`evaluate` and `measure-transference --weight-column weight`); the synthetic data sets' sizes, split (a "
            "second `--seed 1` draw gives the fine-tuning rows and test), schedules and both protocols."
        )
    if c and args.source:
        L.append(
            f"- Census-Income (KDD), groups {', '.join(c['groups'])}: scratch on the full training split, lr {c['lr']:g}, "
            f"{c['warmup']} warmup steps then cosine, {c['epochs']} epoch(s), batch {c['batch']}; finetune: the training "
            "split cut in two random halves (seed 0), the base (and each single-task model) trained from scratch on the "
            f"first with that schedule, then fine-tuned on the second at a constant lr {c['finetune']['lr']:g}, "
            f"{c['finetune']['epochs']} epoch(s), batch {c['finetune']['batch']}. The fine-tuning of a converged census "
            "base under a decaying lr is [docs/results-census.md](results-census.md)."
        )
    else:
        L.append(
            "- Census-Income: not part of this run (no `--source`, or `--quick`/`--tiny`); see [docs/results-census.md](results-census.md)."
        )
    L += [
        "- Scored: each run's `last.safetensors`, once, on test (`evaluate --json`); validation AUCs are `train`'s at the last step.",
        "- Δm% = mean over tasks of (AUC_t − AUC_single,t) / AUC_single,t × 100 (LibMTL, higher is better); "
        "single-task AUCs are the mean over seeds of the single-task models of the same cell; a single-task model's "
        "features leave out the other tasks' label columns (`init --exclude-features`).",
        "- Every difference against `ew` is paired by seed: mean, 95 % Student-t interval; *better*/*worse* only when "
        "the interval excludes 0.",
        "",
    ]
    return L


def load_note(records: list[dict]) -> str:
    loads = [r["load"] for r in records if "load" in r]
    if not loads:
        return ""
    return (
        f" (1-minute load average as the steps ended: median {statistics.median(loads):.1f}, on {os.cpu_count()} cores)"
    )


def running_time(records: list[dict], pause: float = 600.0) -> tuple[float, int]:
    """Seconds during which at least one step ran (the union of the steps' intervals), and the number
    of sittings: runs of steps separated by more than ``pause`` seconds with none running."""
    total, sittings, end = 0.0, 0, None
    for r in sorted(records, key=lambda r: r["started"]):
        start, stop = r["started"], r["started"] + r["seconds"]
        if end is None or start > end:
            sittings += end is None or start - end > pause
            total += stop - start
            end = stop
        elif stop > end:
            total += stop - end
            end = stop
    return total, sittings


def write_results(report: dict, cfg: dict, args, path: Path) -> None:
    import torch

    lost = missing(report, cfg)
    records = sorted(report["records"].values(), key=lambda r: r["started"])
    busy = sum(r["seconds"] for r in records)
    running, sittings = running_time(records)
    png = path.with_name(path.stem + "-gain.png")
    drew = figure(report, cfg, png)
    mode = "--tiny" if args.tiny else "--quick" if args.quick else ""
    command = f"python benchmarks/study.py --out {args.out}" + (f" --source {args.source}" if args.source else "")
    command += f" --jobs {args.jobs}" + (f" {mode}" if mode else "")
    L = [
        "# Where the gradient methods matter: the evidence study",
        "",
        "Generated by `benchmarks/study.py` (do not edit by hand): "
        + ("**PARTIAL** — missing cells are listed at the end." if lost else "complete."),
        "",
        f"Command: `{command}`",
        "",
        *conclusions(report, cfg),
        *setup_section(cfg, args),
        "## Machine and time",
        "",
        f"- {platform.platform()}, Python {platform.python_version()}, torch {torch.__version__}, {os.cpu_count()} cores; "
        f"{args.jobs} step(s) at a time, one torch thread each.",
        f"- {len(records)} steps; {running / 60:.1f} min wall with at least one step running"
        + (
            f" (in {sittings} sittings: the study was resumed from its step records, and reused them)"
            if sittings > 1
            else ""
        )
        + "; the "
        f"steps' summed wall time is {busy / 60:.1f} min, i.e. about {busy / 60 / max(1, args.jobs):.1f} min at "
        f"{args.jobs} at a time. The machine was shared with other agents' jobs while this ran, so both times "
        "are inflated against an idle machine" + load_note(records) + ".",
        "",
    ]
    for name, proto, p, summary in cells(report, cfg):
        L += [f"## {name} — {proto}", "", *results_table(report["datasets"][name]["tasks"], summary, p), ""]
    L += prediction_section(report, cfg, png.name if drew else None)
    L += ["", *hessian_section(report, cfg), *defaults_section(report, cfg)]
    if lost:
        L += ["## Missing (PARTIAL)", "", "Not finished when this file was written: " + "; ".join(lost) + ".", ""]
    L += [
        "## Exact commands",
        "",
        f"Every `cogradctl` call, in the order run, with its wall time; `$OUT` is `{args.out}`.",
        "",
    ]
    L += ["<details><summary>the commands</summary>", "", "```"]
    L += [f"{r['command'].replace(str(args.out), '$OUT')}    # {r['seconds']:.1f}s" for r in records]
    L += ["```", "", "</details>", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(L))
    os.replace(tmp, path)
