"""The ``ferry quantize`` command (mounted by ``ferry/cli.py``)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


def quantize(
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory to write the quantized checkpoint to")],
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Float checkpoint directory or hub id (default: the demo model)")] = None,
    method: Annotated[str, typer.Option(help="rtn | gptq | awq")] = "gptq",
    bits: Annotated[int, typer.Option(help="4 or 8")] = 4,
    group_size: Annotated[int, typer.Option(help="Inputs per scale group; -1: per output channel")] = 128,
    sym: Annotated[Optional[bool], typer.Option("--sym/--asym", help="Symmetric or asymmetric (zero points); default: sym, asym for awq")] = None,
    act_order: Annotated[bool, typer.Option("--act-order", help="GPTQ: quantize columns by decreasing activation energy (desc_act)")] = False,
    calib: Annotated[Optional[Path], typer.Option("--calib", help="Calibration text file (default: the demo tasks' synthetic chats)")] = None,
    fmt: Annotated[Optional[str], typer.Option("--format", help="gptq | awq | compressed-tensors (default: gptq, awq for --method awq)")] = None,
    keep: Annotated[Optional[list[str]], typer.Option("--keep", help="Regex of modules to keep in 16/32-bit (repeatable); embeddings and lm_head always are")] = None,
    num_samples: Annotated[int, typer.Option(help="Calibration samples")] = 128,
    max_len: Annotated[int, typer.Option(help="Tokens per calibration sample")] = 256,
) -> None:
    """Quantize a float checkpoint with RTN, GPTQ or AWQ into a standard layout."""
    from ferry.checkpoint import resolve_model_dir
    from ferry.quant.quantize.pipeline import QuantizeOptions, quantize_checkpoint

    chosen_fmt = fmt or ("awq" if method == "awq" else "gptq")
    options = QuantizeOptions(method=method, bits=bits, group_size=group_size,
                              sym=(chosen_fmt != "awq") if sym is None else sym, act_order=act_order,
                              fmt=fmt, keep=tuple(keep or ()), calib_file=str(calib) if calib else None,
                              num_samples=num_samples, max_len=max_len)
    try:
        options.resolved_format()
        source = resolve_model_dir(model)
        out = quantize_checkpoint(source, output, options)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"wrote {out}")
