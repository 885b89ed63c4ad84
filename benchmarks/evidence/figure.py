"""The figure: each method's Δm% gain over ew against the transference measured on the ew model."""

from __future__ import annotations

from pathlib import Path

from .tables import prediction_rows


def figure(report: dict, cfg: dict, path: Path) -> bool:
    """Two panels: CoGrad's Δm% gain (95 % interval) and every other method's against the measured
    transference ratio. False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = prediction_rows(report, cfg)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in rows:
        g = r["gains"].get("cograd")
        if g:
            marker = "o" if r["proto"] == "scratch" else "s"
            left.errorbar(
                r["ratio"], g["mean"], yerr=[[g["mean"] - g["lo"]], [g["hi"] - g["mean"]]], fmt=marker, capsize=3
            )
            left.annotate(
                f"{r['name']} {r['proto'][0]}",
                (r["ratio"], g["mean"]),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
    colors = dict(zip([m for m in cfg["methods"] if m not in ("ew", "cograd")], plt.cm.tab10.colors))
    for m, color in colors.items():
        pts = [(r["ratio"], r["gains"][m]["mean"]) for r in rows if m in r["gains"]]
        if pts:
            right.scatter(*zip(*pts), color=color, label=m, s=18)
    for ax in (left, right):
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xlabel("transference ratio of the ew model (measured first)")
    left.set_ylabel("Δm% − ew (test)")
    right.set_ylabel("Δm% − ew (test)")
    left.set_title("CoGrad (o scratch, □ finetune; bars: 95 % CI)")
    right.set_title("the other methods (mean over seeds)")
    if colors:
        right.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
