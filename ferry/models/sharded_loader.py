"""Load one rank's part of a checkpoint: each tensor's slice only, read with ``get_slice``.

For every checkpoint tensor the model needs, the slice comes from the parameter's layout
attributes and its layer's ``tp_kind`` (``tensor_parallel.py``): column and vocab layers
split along ``output_dim``, row layers along ``input_dim``, anything else (norms, a
row-parallel bias, a per-tensor scale, a row layer's per-channel scales: one group over
all its inputs) is read whole. The rank's extent along that dim is
the parameter's (or, for a merged layer, the shard's, in stored elements when the dim is
packed), so a quantized method's packed weights and group scales shard with no format
code; a checkpoint size that is not that extent times the ranks is an error naming the
tensor. Only the slice is read from the file: no rank holds a full copy of a tensor it
splits. Pipeline stages map ``model.layers.{i}`` to their own layer numbers and skip the
rest.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import safe_open
from torch import nn

from ferry.layers.parameter import default_weight_loader
from ferry.models.loader import checkpoint_targets, renamed
from ferry.models.tensor_parallel import COLUMN, ROW, VOCAB

logger = logging.getLogger(__name__)

_LAYER = re.compile(r"^(model\.layers\.)(\d+)(\..*)$")


def owning_layers(model: nn.Module) -> dict[int, nn.Module]:
    """id(parameter) -> the module that registered it (the first, for a tied one)."""
    owners: dict[int, nn.Module] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            owners.setdefault(id(param), module)
    return owners


def rank_slice(param: torch.Tensor, layer: nn.Module, shard_id: Any, shape: list[int],
               tp_rank: int, tp_size: int) -> tuple[int | None, int, int, int]:
    """(dim, start, stop, local) of this rank's part of a checkpoint tensor of ``shape``.

    ``dim`` None: read it whole. ``local`` is the extent this rank's parameter expects
    along ``dim``; ``stop - start`` is less only in the vocabulary's padding.
    """
    kind = getattr(layer, "tp_kind", None)
    if tp_size == 1 or kind is None:
        return None, 0, 0, 0
    dim = getattr(param, "input_dim" if kind == ROW else "output_dim", None)
    if dim is None or dim >= len(shape):
        return None, 0, 0, 0
    local = param.shape[dim]
    offsets = getattr(layer, "shard_offsets", None)
    if shard_id is not None and offsets and kind == COLUMN:
        local = offsets[shard_id][1]
        if getattr(param, "packed_dim", None) == dim:
            local //= param.pack_factor
    full = shape[dim]
    if kind == VOCAB:   # padded to a multiple of tp_size: the last rank may hold padding
        start = tp_rank * local
        return dim, min(start, full), min(start + local, full), local
    if kind == ROW and full == local == 1:
        # one quantization group over all the inputs (per-channel scales and zeros):
        # every rank's inputs use the same values, so each reads them whole
        return None, 0, 0, 0
    replicated = shard_id in getattr(layer, "tp_replicated_shards", ())
    if local <= 0 or full % local or (full // local != tp_size and not (
            replicated and tp_size % (full // local) == 0)):
        raise ValueError(f"dim {dim} of size {full} does not divide into {tp_size} tensor-"
                         f"parallel parts of {local} (a head count, width or quantization "
                         f"group count that tensor_parallel_size={tp_size} does not divide)")
    part = tp_rank * (full // local) // tp_size   # replicated KV heads: ranks share a part
    return dim, part * local, (part + 1) * local, local


def read_rank_part(handle: Any, name: str, param: torch.Tensor, layer: nn.Module, shard_id: Any,
                   tp_rank: int, tp_size: int) -> torch.Tensor:
    """This rank's part of tensor ``name`` (zero-padded to the local extent), read sliced."""
    view = handle.get_slice(name)
    shape = list(view.get_shape())
    dim, start, stop, local = rank_slice(param, layer, shard_id, shape, tp_rank, tp_size)
    if dim is None:
        return view[:] if shape else handle.get_tensor(name)
    index = tuple(slice(start, stop) if d == dim else slice(None) for d in range(len(shape)))
    part = view[index]
    if stop - start < local:   # vocabulary padding rows: zeros
        pad = list(part.shape)
        pad[dim] = local - (stop - start)
        part = torch.cat([part, part.new_zeros(pad)], dim=dim)
    return part


def stage_name_map(num_layers_total: int, first: int, count: int) -> Callable[[str], str | None]:
    """Checkpoint name -> this stage's parameter name (None: another stage's layer)."""
    def rename(name: str) -> str | None:
        match = _LAYER.match(name)
        if match is None:
            return name
        index = int(match.group(2))
        if not first <= index < first + count:
            return None
        return f"{match.group(1)}{index - first}{match.group(3)}"
    return rename


def load_rank_weights(model: nn.Module, files: list[Path], model_dir: Path, tp_rank: int,
                      tp_size: int, rename: Callable[[str], str | None] = lambda n: n,
                      skip: set[str] = frozenset()) -> None:
    """Fill this rank's parameters from ``files``, each tensor read as its slice.

    ``rename`` maps checkpoint names to this model's (pipeline stages); names in ``skip``
    are parameters this rank does not hold (another stage's embedding or head).
    ValueError on a missing tensor, a shape mismatch or a size that does not divide.
    """
    targets = {k: v for k, v in checkpoint_targets(model).items() if k not in skip}
    owners = owning_layers(model)
    ignorable = model.ignored_checkpoint_suffixes + ("lm_head.weight",) * bool(
        model.options.tie_word_embeddings)
    loaded: set[str] = set()
    with torch.no_grad():
        for path in files:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                for ckpt_name in handle.keys():
                    name = rename(ckpt_name)
                    if name is not None:   # older names (e.g. KV scales) -> current ones
                        name = renamed(name, model.checkpoint_renames)
                    if name is None or name not in targets:
                        if name is not None and name not in skip and not name.endswith(ignorable):
                            logger.warning("checkpoint tensor %s is not used", ckpt_name)
                        continue
                    param, shard_id = targets[name]
                    try:
                        part = read_rank_part(handle, ckpt_name, param, owners[id(param)],
                                              shard_id, tp_rank, tp_size)
                        getattr(param, "weight_loader", default_weight_loader)(param, part, shard_id)
                    except ValueError as exc:
                        raise ValueError(f"tensor {ckpt_name!r} in {model_dir} (tensor rank "
                                         f"{tp_rank}/{tp_size}): {exc}") from None
                    loaded.add(name)
    missing = sorted(set(targets) - loaded)
    if missing:
        raise ValueError(f"checkpoint {model_dir} is missing tensor(s) the model needs: "
                         f"{', '.join(missing[:5])}")
