"""What a command pays before its work starts: loading the one model plugin it names, and checking a
checkpoint's model on the meta device, without importing what they do not use."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cogradctl import models

ROOT = Path(__file__).resolve().parents[1]


def imported_after(code: str) -> dict:
    """Run ``code`` in a fresh interpreter → which heavy modules it imported."""
    probe = code + "\nimport json, sys\nprint(json.dumps({m: m in sys.modules for m in WATCH}))"
    watch = "WATCH = ['torch_rechub', 'sklearn', 'torch._dynamo']\n"
    out = subprocess.run([sys.executable, "-c", watch + probe], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.splitlines()[-1])


def test_looking_up_a_built_in_model_loads_no_other_plugin():
    """The rechub-* bridges import torch-rechub (and scikit-learn): seconds a command using mmoe must
    not pay. They are still listed, and an unknown name still says which plugins failed to load."""
    seen = imported_after("from cogradctl import registry\nregistry.lookup('models', 'mmoe')")
    assert seen == {"torch_rechub": False, "sklearn": False, "torch._dynamo": False}


def test_checking_a_checkpoint_on_the_meta_device_imports_no_compiler(base_checkpoint):
    """Random fills on the meta device go through torch's Python decompositions, which import
    torch._dynamo (seconds); the meta build skips them, since they change no shape."""
    seen = imported_after(f"from cogradctl import models\nmodels.check_checkpoint({str(base_checkpoint)!r})")
    assert seen["torch._dynamo"] is False


@pytest.mark.parametrize(
    "init",
    [
        lambda t: torch.nn.init.normal_(t),
        lambda t: torch.nn.init.trunc_normal_(t),
        lambda t: t.exponential_(),
        lambda t: t.log_normal_(),
        lambda t: t.clamp_(-1, 1),
    ],
)
def test_a_skipped_fill_on_the_meta_device_keeps_the_tensor_and_its_shape(init):
    """Oracle: the same fill outside the mode (where torch runs it)."""
    with torch.device("meta"):
        want = init(torch.empty(3, 5))
        with models._SkipMetaFills():
            t = torch.empty(3, 5)
            got = init(t)
    assert got is t and got.shape == want.shape == (3, 5) and got.dtype == want.dtype and got.is_meta


def test_the_skip_leaves_real_tensors_alone():
    torch.manual_seed(0)
    want = torch.empty(4).normal_()
    torch.manual_seed(0)
    with models._SkipMetaFills():
        got = torch.empty(4).normal_()
    assert torch.equal(got, want)
