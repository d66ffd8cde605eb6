"""``ferry quantize``: a float checkpoint in, a GPTQ / AWQ / compressed-tensors one out.

1. Load the model with transformers (float32) and run the calibration text through it,
   recording each projection's inputs (GPTQ: the Hessian sum x x^T; AWQ: a sample of rows).
2. Quantize each projection (``q/k/v/o/gate/up/down_proj``; embeddings, ``lm_head`` and
   modules matching ``--keep`` stay float): RTN, GPTQ, or AWQ (scales folded into the
   norms / producing projections, then RTN).
3. Write the format's tensors, config.json with its ``quantization_config``, and the
   tokenizer / chat template / generation config as they were.

The Hessians come from the float model's activations in one pass (not layer by layer on
the already-quantized model, as the GPTQ paper's sequential variant does).
"""
from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ferry.quant.quantize import formats
from ferry.quant.quantize.awq import search_scales
from ferry.quant.quantize.calibration import calibration_batches, calibration_texts
from ferry.quant.quantize.gptq import gptq
from ferry.quant.quantize.rtn import QuantizedWeight, rtn

logger = logging.getLogger(__name__)

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
METHODS = ("rtn", "gptq", "awq")
MAX_SAMPLE_ROWS = 2048          # AWQ's scale search: input rows kept per projection


@dataclass(frozen=True)
class QuantizeOptions:
    method: str = "gptq"
    bits: int = 4
    group_size: int = 128
    sym: bool = True
    act_order: bool = False
    fmt: str | None = None            # None: gptq for rtn/gptq, awq for awq
    keep: tuple[str, ...] = ()        # regexes of modules left in float
    calib_file: str | None = None
    num_samples: int = 128
    max_len: int = 256
    damp: float = 0.01

    def resolved_format(self) -> str:
        fmt = self.fmt or ("awq" if self.method == "awq" else "gptq")
        self.check(fmt)
        return fmt

    def check(self, fmt: str) -> None:
        if self.method not in METHODS:
            raise ValueError(f"--method {self.method!r}: choose one of {', '.join(METHODS)}")
        if fmt not in formats.FORMATS:
            raise ValueError(f"--format {fmt!r}: choose one of {', '.join(formats.FORMATS)}")
        if self.bits not in (4, 8):
            raise ValueError(f"--bits {self.bits}: choose 4 or 8")
        if fmt == "awq" and (self.bits != 4 or self.sym):
            raise ValueError("--format awq holds 4-bit asymmetric weights: use --bits 4 --asym")
        if self.act_order and (self.method != "gptq" or fmt != "gptq"):
            raise ValueError("--act-order needs --method gptq and --format gptq")


def quantize_checkpoint(model_dir: Path, output: Path, options: QuantizeOptions) -> Path:
    """Quantize ``model_dir`` into ``output``; returns ``output``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    fmt = options.resolved_format()
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    targets = {name: m for name, m in model.named_modules()
               if name.split(".")[-1] in PROJECTIONS and isinstance(m, torch.nn.Linear)
               and not any(re.search(p, name) for p in options.keep)}
    if options.method != "rtn":
        texts = calibration_texts(tokenizer, options.calib_file, options.num_samples)
        stats = collect_inputs(model, targets, calibration_batches(tokenizer, texts, options.max_len),
                               hessian=options.method == "gptq")
    if options.method == "awq":
        apply_awq_scales(model, targets, stats, options)
    quantized: dict[str, QuantizedWeight] = {}
    min_zero = 1 if (fmt == "gptq" and not options.sym) else 0    # GPTQ v1 stores zero - 1
    for name, module in tqdm(targets.items(), desc=f"Quantizing ({options.method})", unit="layer",
                             disable=None):
        w = module.weight.data
        if options.method == "gptq":
            h = stats[name]["h"] / max(stats[name]["n"], 1)
            quantized[name] = gptq(w, h, options.bits, options.group_size, options.sym,
                                   options.act_order, options.damp, min_zero=min_zero)
        else:
            quantized[name] = rtn(w, options.bits, options.group_size, options.sym, min_zero)
    write_checkpoint(model, model_dir, output, quantized, fmt, options)
    return output


def collect_inputs(model, targets: dict, batches: list[torch.Tensor], hessian: bool) -> dict:
    """Per projection: ``h`` = sum 2 x x^T and ``n`` rows (GPTQ), or ``x`` sample rows (AWQ)."""
    stats: dict[str, dict] = {name: {"n": 0, "h": None, "x": []} for name in targets}

    def hook(name):
        def record(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()       # (R, K)
            entry = stats[name]
            entry["n"] += x.shape[0]
            if hessian:
                add = 2 * x.t() @ x                                             # (K, K)
                entry["h"] = add if entry["h"] is None else entry["h"] + add
            elif sum(len(r) for r in entry["x"]) < MAX_SAMPLE_ROWS:
                entry["x"].append(x)
        return record

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in targets.items()]
    try:
        with torch.no_grad():
            for ids in tqdm(batches, desc="Calibrating", unit="sample", disable=None):
                model(ids)
    finally:
        for h in handles:
            h.remove()
    for entry in stats.values():
        if entry["x"]:
            entry["x"] = torch.cat(entry["x"])[:MAX_SAMPLE_ROWS]
    return stats


@torch.no_grad()
def apply_awq_scales(model, targets: dict, stats: dict, options: QuantizeOptions) -> None:
    """Search and fold AWQ scales for each decoder layer's input-sharing projection groups."""
    for block_name, block in tqdm(list(_decoder_layers(model)), desc="AWQ scale search",
                                  unit="block", disable=None):
        groups = [
            ([f"{block_name}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")],
             lambda s, b=block: b.input_layernorm.weight.div_(s)),
            ([f"{block_name}.mlp.{p}" for p in ("gate_proj", "up_proj")],
             lambda s, b=block: b.post_attention_layernorm.weight.div_(s)),
            ([f"{block_name}.mlp.down_proj"],
             lambda s, b=block: b.mlp.up_proj.weight.div_(s[:, None])),
        ]
        attn = block.self_attn
        if attn.v_proj.weight.shape[0] == attn.o_proj.weight.shape[1]:   # no GQA: v rows feed o
            groups.append(([f"{block_name}.self_attn.o_proj"],
                           lambda s, a=attn: a.v_proj.weight.div_(s[:, None])))
        for names, fold in groups:
            if not all(n in targets for n in names):
                continue
            x = stats[names[0]]["x"]
            s = search_scales(x, [targets[n].weight for n in names], options.bits,
                              options.group_size, options.sym)
            for n in names:
                targets[n].weight.mul_(s)                                    # columns scaled up
            fold(s)                                                          # producer scaled down


def _decoder_layers(model):
    for name, module in model.named_modules():
        if hasattr(module, "self_attn") and hasattr(module, "mlp") and hasattr(module, "input_layernorm"):
            yield name, module


def write_checkpoint(model, model_dir: Path, output: Path, quantized: dict[str, QuantizedWeight],
                     fmt: str, options: QuantizeOptions) -> None:
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        tensors.pop("lm_head.weight", None)
    for name, qw in quantized.items():
        qw.scales = qw.scales.to(formats.SCALE_DTYPE).float()
        del tensors[name + ".weight"]
        writer = {"gptq": formats.gptq_tensors, "awq": formats.awq_tensors,
                  "compressed-tensors": formats.ct_tensors}[fmt]
        tensors.update(writer(name, qw))
    save_file(tensors, str(output / "model.safetensors"))
    kept = sorted({n for n, m in model.named_modules() if n.split(".")[-1] in PROJECTIONS}
                  - set(quantized))
    config = json.loads((Path(model_dir) / "config.json").read_text())
    config["quantization_config"] = quantization_config(fmt, options, kept)
    for src in Path(model_dir).iterdir():
        if src.is_file() and src.suffix != ".safetensors" and src.name not in (
                "config.json", "model.safetensors.index.json"):
            shutil.copy2(src, output / src.name)          # tokenizer, chat template, generation config
    (output / "config.json").write_text(json.dumps(config, indent=2))
    logger.info("wrote %s (%s, %d quantized projections, %d kept)", output, fmt, len(quantized), len(kept))


def quantization_config(fmt: str, options: QuantizeOptions, kept: list[str]) -> dict:
    if fmt == "gptq":
        config = formats.gptq_config(options.bits, options.group_size, options.sym, options.act_order)
        if kept:   # GPTQModel's negative "dynamic" rules leave modules unquantized
            config["dynamic"] = {f"-:^{re.escape(n)}$": {} for n in kept}
        return config
    if fmt == "awq":
        return formats.awq_config(options.group_size, kept or None)
    return formats.ct_config(options.bits, options.group_size, options.sym, ["lm_head", *kept])
