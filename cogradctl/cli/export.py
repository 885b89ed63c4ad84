"""``cogradctl export``: a checkpoint's weights as a plain state dict for the team's own code."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cogradctl.cli.core import command
from cogradctl.cli.options import Json, Quiet
from cogradctl.cli.output import emit_json, stdout
from cogradctl.console import Log

HELP = (
    "Write the model's state_dict (parameters and buffers, no training state) as .pt (torch.save of a dict of "
    "tensors) or plain .safetensors, by the suffix of --out; an imported model's keys get back the team's "
    "original names, so load_state_dict(strict=True) in the team's own code takes it."
)


@command("export", help=HELP, short_help="A checkpoint's weights as a plain state dict (.pt or .safetensors).")
def export_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint to export.")],
    out: Annotated[Path, typer.Option(help="File to write: .pt, .pth, .bin or .safetensors.")],
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out file.")] = False,
    json_out: Json = False,
    quiet: Quiet = False,
) -> None:
    from cogradctl.export import export

    summary = export(checkpoint, out, overwrite)
    names = "the team's original key names" if summary["keys"] == "original" else "the plugin's key names"
    Log(quiet).info(f"wrote {out}: {summary['tensors']} tensors of {summary['model']} under {names}")
    if json_out:
        emit_json(summary)
    else:
        stdout.print(f"{out}  format={summary['format']}  tensors={summary['tensors']}  keys={summary['keys']}")
