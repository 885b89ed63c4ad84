"""The results' markdown sections: per-cell tables, measurement against gain, Hessian, defaults, conclusions."""

from __future__ import annotations

import json
import statistics

from .stats import mean_sd, measured, paired, spearman, spearman_p, summarize


def fmt_pair(p: dict | None, digits: int = 4) -> str:
    if not p:
        return "–"
    return f"{p['mean']:+.{digits}f} [{p['lo']:+.{digits}f}, {p['hi']:+.{digits}f}]"


def cells(report: dict, cfg: dict) -> list[tuple[str, str, dict, dict]]:
    """(data set, protocol, its raw report, its summary) in the study's order."""
    out = []
    for name in report["order"]:
        ds = report["datasets"].get(name)
        for proto, p in (ds or {}).get("protocols", {}).items():
            out.append((name, proto, p, summarize(p, ds["tasks"])))
    return out


def missing(report: dict, cfg: dict) -> list[str]:
    """The cells (data set / protocol / method: seeds) the configuration asks for and the report lacks."""
    seeds, lost = set(cfg["seeds"]), []
    for name in report["order"]:
        ds = report["datasets"].get(name)
        census_ft = (cfg["census"] or {}).get("finetune")
        protos = ["scratch", "finetune"] if not name.startswith("census") or census_ft else ["scratch"]
        for proto in protos:
            p = (ds or {}).get("protocols", {}).get(proto, {"runs": {}, "single": {}})
            want = {m: p["runs"].get(m, {}) for m in cfg["methods"]}
            want.update({f"single-{t}": p["single"].get(t, {}) for t in (ds or {}).get("tasks", ["?"])})
            for m, runs in want.items():
                if seeds - set(runs):
                    lost.append(f"{name}/{proto}/{m} (seeds {', '.join(map(str, sorted(seeds - set(runs))))})")
        if ds is None or not ds.get("measure"):
            lost.append(f"{name}/measure-transference")
    h, hc = report.get("hessian") or {"runs": {}}, cfg["hessian"]
    variants = ["ew", *(f"{k}-g{g:g}" for k in hc["kinds"] for g in hc["gammas"])] if hc else []
    for v in variants:
        if seeds - set(h["runs"].get(v, {})):
            lost.append(f"hessian/{v}")
    return lost


def results_table(tasks: list[str], summary: dict, proto: dict) -> list[str]:
    if not summary["rows"]:
        return ["Not run yet (listed under Missing)."]
    L = [
        "| method | seeds | " + " | ".join(f"test AUC {t}" for t in tasks) + " | Δm% | Δm% − ew [95% CI] | verdict | "
        "mean test AUC − ew [95% CI] | mean valid AUC |",
        "|---" * (len(tasks) + 7) + "|",
    ]
    for m, r in summary["rows"].items():
        label = f"cograd (γ={proto['gamma']:g})" if m == "cograd" and "gamma" in proto else m
        dm = f"{mean_sd(r['dm'].values())[0]:+.3f} ± {mean_sd(r['dm'].values())[1]:.3f}" if r["dm"] else "–"
        p = r["vs_ew_dm"] if r["dm"] else r["vs_ew_auc"]
        verdict = "(reference)" if m == "ew" else (p["verdict"] if p else "–")
        auc = " | ".join(f"{r['auc'][t][0]:.4f} ± {r['auc'][t][1]:.4f}" for t in tasks)
        pair_dm = "(reference)" if m == "ew" else fmt_pair(r["vs_ew_dm"])
        pair_auc = "(reference)" if m == "ew" else fmt_pair(r["vs_ew_auc"], 4)
        L.append(
            f"| {label} | {r['n']} | {auc} | {dm} | {pair_dm} | {verdict} | {pair_auc} | {r['valid'][0]:.4f} ± {r['valid'][1]:.4f} |"
        )
    ref = summary["ref"]
    if ref:
        L += [
            "",
            "Single-task models (test AUC, mean over seeds): " + ", ".join(f"{t} {ref[t]:.4f}" for t in tasks) + ".",
        ]
    else:
        L += ["", "Single-task models incomplete: Δm% not computed; the verdict uses the mean test AUC difference."]
    if proto.get("grid"):
        chosen = proto.get("gamma")
        grid = ", ".join(
            f"γ={g:g}: {v:.5f}{' (kept)' if g == chosen else ''}" for g, v in sorted(proto["grid"].items())
        )
        L += ["", f"CoGrad's γ grid (seed-0 mean validation AUC at the last step): {grid}."]
    return L


def prediction_rows(report: dict, cfg: dict) -> list[dict]:
    """Per data set and protocol: the ew model's measurement beside each method's Δm% gain over ew."""
    rows = []
    for name, proto, _p, summary in cells(report, cfg):
        meas = report["datasets"][name].get("measure")
        if not meas:
            continue
        gains = {m: r["vs_ew_dm"] for m, r in summary["rows"].items() if m != "ew" and r["vs_ew_dm"]}
        rows.append({"name": name, "proto": proto, **measured(meas), "gains": gains})
    return rows


def prediction_section(report: dict, cfg: dict, figure: str | None) -> list[str]:
    rows = prediction_rows(report, cfg)
    methods = [m for m in cfg["methods"] if m != "ew"]
    mark = {"better": " ▲", "worse": " ▼", "no detectable difference": ""}
    L = [
        "## Does measurement predict the outcome?",
        "",
        "Measured once per data set on the seed-0 `ew` model of the scratch protocol (on the synthetic and CTR/CVR data also the "
        "base the finetune protocol starts from; on census that base is the same recipe on half the rows), on validation: `measure-transference --json`. *ratio*: the mean over task "
        "pairs of Z_rel[i→j] / Z_rel[i→i] (what a lookahead step on task i does to task j's loss, as a fraction of "
        "what it does to i's own); *cos*: the mean gradient cosine; *conflict*: the share of batches with a negative "
        "cosine. Each method column: its Δm% − ew (mean over seeds; ▲ better / ▼ worse beyond the 95 % interval, "
        "unmarked: no detectable difference).",
        "",
        "| data set | protocol | ratio | cos | conflict | " + " | ".join(methods) + " |",
        "|---" * (5 + len(methods)) + "|",
    ]
    for r in rows:
        g = [
            f"{r['gains'][m]['mean']:+.4f}{mark[r['gains'][m]['verdict']]}" if m in r["gains"] else "–" for m in methods
        ]
        L.append(
            f"| {r['name']} | {r['proto']} | {r['ratio']:+.3f} | {r['cosine']:+.3f} | {r['conflict']:.2f} | "
            + " | ".join(g)
            + " |"
        )
    for key, label in (("ratio", "transference ratio"), ("cosine", "gradient cosine")):
        pts = [(r[key], r["gains"]["cograd"]["mean"]) for r in rows if "cograd" in r["gains"]]
        rho = spearman([a for a, _ in pts], [b for _, b in pts])
        pval = spearman_p([a for a, _ in pts], [b for _, b in pts]) if rho is not None else None
        spread = [abs(g["mean"]) for r in rows for g in r["gains"].values()]
        L += [
            "",
            f"Spearman rank correlation between the {label} and CoGrad's gain over {len(pts)} cells: "
            + (
                f"{rho:+.2f} (permutation p = {pval:.2f}; the two protocols of a data set share one measurement, so "
                "the cells are not independent and p is optimistic)"
                if rho is not None
                else "not computed (under 3 cells)"
            )
            + (f" (the largest |gain| of any method is {max(spread):.3f} Δm%)." if spread else "."),
        ]
    if figure:
        L += ["", f"![gain against measurement]({figure})", ""]
    return L


def hessian_section(report: dict, cfg: dict) -> list[str]:
    h = report.get("hessian")
    runs = {v: rs for v, rs in (h or {"runs": {}})["runs"].items() if rs}
    if "ew" not in runs:
        return ["## CoGrad's Hessian, isolated", "", "Not run yet.", ""]
    tasks = h["tasks"]
    mean = {
        v: {s: {sp: statistics.fmean(r[sp][t] for t in tasks) for sp in ("valid", "test")} for s, r in rs.items()}
        for v, rs in runs.items()
    }
    L = [
        "## CoGrad's Hessian, isolated",
        "",
        f"Synthetic data at ρ = {h['rho']:g}, a small MMoE ({json.dumps(h['model'])}), the scratch schedule, "
        "`normalize=relative`; every approximation at the same strengths. Mean AUC over the tasks, paired against "
        "`ew` over the seeds (95 % t interval). Validation is what a default may be chosen on; test is shown beside it.",
        "",
        "| variant | seeds | valid mean AUC | valid − ew [95% CI] | verdict (valid) | test − ew [95% CI] | verdict (test) |",
        "|---|---|---|---|---|---|---|",
    ]
    for v, per in mean.items():
        pv = paired({s: x["valid"] for s, x in per.items()}, {s: x["valid"] for s, x in mean["ew"].items()})
        pt = paired({s: x["test"] for s, x in per.items()}, {s: x["test"] for s, x in mean["ew"].items()})
        valid = mean_sd(x["valid"] for x in per.values())
        ref = v == "ew"
        L.append(
            f"| {'ew' if ref else 'cograd ' + v} | {len(per)} | {valid[0]:.4f} ± {valid[1]:.4f} | "
            + (
                " (reference) | | (reference) | |"
                if ref
                else f"{fmt_pair(pv, 4)} | {pv['verdict'] if pv else '–'} | {fmt_pair(pt, 4)} | {pt['verdict'] if pt else '–'} |"
            )
        )
    return [*L, ""]


def hessian_conclusion(report: dict) -> list[str]:
    """One line: the Hessian study's verdicts on validation, per approximation and strength."""
    h = report.get("hessian") or {"runs": {}}
    runs = {v: rs for v, rs in h["runs"].items() if rs}
    if "ew" not in runs or len(runs) < 2:
        return []
    tasks = h["tasks"]
    ew = {s: statistics.fmean(r["valid"][t] for t in tasks) for s, r in runs["ew"].items()}
    parts = []
    for v, rs in runs.items():
        p = (
            paired({s: statistics.fmean(r["valid"][t] for t in tasks) for s, r in rs.items()}, ew)
            if v != "ew"
            else None
        )
        if p:
            parts.append(f"{v} {p['verdict']} ({fmt_pair(p, 4)})")
    return [
        f"- CoGrad's Hessian isolated (small MMoE, ρ = {h['rho']:g}; mean validation AUC − ew, by approximation and "
        "γ): " + "; ".join(parts) + "."
    ]


def defaults_section(report: dict, cfg: dict) -> list[str]:
    chosen = [(n, pr, p.get("gamma")) for n, pr, p, _ in cells(report, cfg) if p.get("gamma") is not None]
    counts = {g: sum(1 for *_, c in chosen if c == g) for g in cfg["cograd_grid"]}
    spreads = [max(p["grid"].values()) - min(p["grid"].values()) for *_, p, _ in cells(report, cfg) if p.get("grid")]
    L = [
        "## CoGrad's defaults (validation only)",
        "",
        "The library default is γ = 0.1, `hessian=diag`, `normalize=relative`. The γ the validation grid kept, per cell: "
        + ("; ".join(f"{n}/{pr}: {g:g}" for n, pr, g in chosen) or "none yet")
        + ". Times each γ was kept: "
        + ", ".join(f"{g:g}: {c}" for g, c in counts.items())
        + ". Within a cell the grid's seed-0 validation AUCs differ by at most "
        + (f"{max(spreads):.5f} (median {statistics.median(spreads):.5f})" if spreads else "–")
        + ", so which γ is kept is decided by differences of that size on one seed; the Hessian table above gives "
        "the paired validation evidence (every seed) across approximations and strengths.",
        "",
    ]
    return L


def conclusions(report: dict, cfg: dict) -> list[str]:
    """Counted statements only: what the verdicts say, and in which cells beyond noise."""
    verdicts: dict[str, dict[str, list[str]]] = {}
    for name, proto, _, s in cells(report, cfg):
        for m, r in s["rows"].items():
            p = r["vs_ew_dm"] or r["vs_ew_auc"]
            if m != "ew" and p:
                v = verdicts.setdefault(m, {"better": [], "worse": [], "no detectable difference": []})
                v[p["verdict"]].append(f"{name}/{proto} ({fmt_pair(p)})")
    L = ["## What a user should conclude", ""]
    for m, v in verdicts.items():
        n = sum(map(len, v.values()))
        line = f"- `{m}` against `ew` ({n} data-set/protocol cells; Δm% points, 95 % paired intervals over seeds): "
        line += f"better in {len(v['better'])}, worse in {len(v['worse'])}, no detectable difference in "
        line += f"{len(v['no detectable difference'])}."
        for word in ("better", "worse"):
            if v[word]:
                line += f" {word.capitalize()}: " + "; ".join(v[word]) + "."
        L.append(line)
    L += hessian_conclusion(report)
    c = verdicts.get("cograd")
    if c and not c["better"]:
        L.append("- **CoGrad never beat `ew` beyond noise in this study.**")
    elif c:
        L.append(f"- CoGrad beat `ew` beyond noise in {len(c['better'])} cell(s), listed above.")
    L += [
        "- A cell's verdict is per data set and protocol; with several methods and cells compared, an occasional "
        "interval that excludes 0 is expected by chance alone (about 1 in 20 per comparison when nothing differs).",
        "- Whether measuring transference first predicts the gain: see the rank correlations and the figure below.",
        "",
    ]
    return L
