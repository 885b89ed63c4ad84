"""The study's plan: methods, CoGrad's fixed options and γ grid, data sizes, schedules; full, quick and tiny."""

from __future__ import annotations

from pathlib import Path

METHODS = ["ew", "cograd", "gdod", "pcgrad", "mgda", "cagrad", "nash-mtl", "uw"]
COGRAD_FIXED = ["-o", "hessian=diag", "-o", "normalize=relative"]
ROOT = Path(__file__).resolve().parent.parent.parent
SMALL_MMOE = {"num_experts": 2, "expert": [16], "tower": [8]}

FULL = {
    "seeds": [0, 1, 2, 3, 4],
    "methods": METHODS,
    "cograd_grid": [0.03, 0.1, 0.3],
    "rhos": [0.0, -0.5, 0.9, 0.5],
    "ctr": True,  # sample-data --kind ctr-cvr: the partial-label case
    "syn": {"rows": 12000, "valid": 6000, "ft_rows": 6000, "test": 6000, "model": {}},
    "scratch": {"epochs": 4, "batch": 256, "lr": 2e-3, "warmup": 20},
    "finetune": {"epochs": 2, "batch": 256, "lr": 1e-3},
    "census": {
        "groups": ["1", "2", "all"],
        **{"epochs": 1, "batch": 1024, "lr": 2e-3, "warmup": 50},
        "finetune": {"epochs": 1, "batch": 1024, "lr": 5e-4},
    },
    "hessian": {"rho": 0.0, "gammas": [0.1, 0.5], "kinds": ["exact", "diag", "fisher-ema", "outer"]},
    "measure": {"batches": 10, "batch": 512},
}
QUICK = {
    **FULL,
    "seeds": [0, 1, 2],
    "methods": ["ew", "cograd", "pcgrad", "mgda"],
    "cograd_grid": [0.1, 0.3],
    "rhos": [0.0],
    "ctr": False,
    "syn": {**FULL["syn"], "rows": 6000, "valid": 3000, "ft_rows": 3000, "test": 3000},
    "scratch": {**FULL["scratch"], "epochs": 2},
    "finetune": {**FULL["finetune"], "epochs": 1},
    "census": None,
    "hessian": {**FULL["hessian"], "gammas": [0.1]},
}
TINY = {
    **QUICK,
    "seeds": [0, 1],
    "methods": ["ew", "cograd"],
    "cograd_grid": [0.1, 0.3],
    "syn": {"rows": 600, "valid": 600, "ft_rows": 300, "test": 600, "model": SMALL_MMOE},
    "scratch": {"epochs": 1, "batch": 128, "lr": 2e-3, "warmup": 1},
    "finetune": {"epochs": 1, "batch": 128, "lr": 1e-3},
    "hessian": {"rho": 0.0, "gammas": [0.1], "kinds": ["exact", "diag"]},
    "measure": {"batches": 2, "batch": 256},
}
