"""The Llama-3-8B-shape checkpoint of ``gpu_llama8b.py``: random weights, no download.

``build_model_dir`` writes config.json, safetensors shards with HF Llama tensor names
(N(0, 0.02) generated on the target device, RMSNorm weights 1) and a word-level tokenizer,
so that both ferry's ``LLM`` and ``AutoModelForCausalLM.from_pretrained`` load the
directory. A marker file written last lets later runs reuse a complete directory.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

SHARD_BYTES = 5 * 2**30
MARKER = "ferry_bench_model.json"  # written last: its presence means the directory is complete


@dataclass(frozen=True)
class ModelShape:
    """A Llama-architecture model's shape; the top ``num_special`` ids are special tokens."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    num_special: int = 256
    rope_theta: float = 500000.0
    max_positions: int = 8192

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def bos_id(self) -> int:  # Llama 3: 128000 <|begin_of_text|>, 128001 <|end_of_text|>
        return self.vocab - self.num_special

    @property
    def eos_id(self) -> int:
        return self.bos_id + 1

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """HF Llama parameter names and shapes, untied lm_head (as Llama-3-8B)."""
        h, kv = self.hidden, self.kv_heads * self.head_dim
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.vocab, h)}
        for i in range(self.layers):
            p = f"model.layers.{i}."
            shapes.update({
                p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                p + "mlp.gate_proj.weight": (self.intermediate, h),
                p + "mlp.up_proj.weight": (self.intermediate, h),
                p + "mlp.down_proj.weight": (h, self.intermediate)})
        shapes["model.norm.weight"] = (h,)
        shapes["lm_head.weight"] = (self.vocab, h)
        return shapes

    def num_params(self, skip_embedding: bool = False) -> int:
        return sum(_numel(s) for n, s in self.tensor_shapes().items()
                   if not (skip_embedding and n == "model.embed_tokens.weight"))

    def kv_bytes_per_token(self, elem_bytes: int) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * elem_bytes


LLAMA3_8B = ModelShape(hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8,
                       vocab=128256)
SMOKE = ModelShape(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=512,
                   num_special=64, max_positions=512)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def build_model_dir(path: Path, shape: ModelShape, dtype: torch.dtype, device: torch.device,
                    seed: int = 0, shard_bytes: int = SHARD_BYTES) -> None:
    """Write config.json, safetensors shards (N(0, 0.02) on ``device``, norms 1) and a
    word-level tokenizer into ``path``; reuse it when a previous run built the same thing."""
    wanted = {"shape": asdict(shape), "dtype": str(dtype), "seed": seed,
              "shard_bytes": shard_bytes}
    marker = path / MARKER
    if marker.exists() and json.loads(marker.read_text()) == wanted:
        print(f"model: reusing {path}", flush=True)
        return
    if path.exists() and any(path.iterdir()) and not marker.exists():
        raise ValueError(f"{path} is not empty and was not built by this script: pass another "
                         f"--model-dir or delete it")
    path.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    _write_config(path, shape, dtype)
    _write_weights(path, shape, dtype, device, seed, shard_bytes)
    _write_tokenizer(path, shape)
    marker.write_text(json.dumps(wanted))
    print(f"model: built {shape.num_params() / 1e9:.2f}B parameters in {path} "
          f"({time.perf_counter() - start:.0f} s)", flush=True)


def _write_config(path: Path, shape: ModelShape, dtype: torch.dtype) -> None:
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads, max_position_embeddings=shape.max_positions,
        rope_parameters={"rope_type": "default", "rope_theta": shape.rope_theta},
        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=shape.bos_id,
        eos_token_id=shape.eos_id, architectures=["LlamaForCausalLM"])
    config.dtype = str(dtype).removeprefix("torch.")
    theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta")
    if theta != shape.rope_theta:  # a transformers version that spells rope settings otherwise
        raise RuntimeError(f"LlamaConfig kept rope_theta={theta}, not {shape.rope_theta}")
    config.save_pretrained(path)


def _write_weights(path: Path, shape: ModelShape, dtype: torch.dtype, device: torch.device,
                   seed: int, shard_bytes: int) -> None:
    """Shards of at most ``shard_bytes`` (or one tensor), generated tensor by tensor on
    ``device`` and written from host memory one shard at a time."""
    from safetensors.torch import save_file

    elem = torch.empty((), dtype=dtype).element_size()
    shards: list[list[str]] = [[]]
    size = 0
    for name, s in shape.tensor_shapes().items():
        if shards[-1] and size + _numel(s) * elem > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += _numel(s) * elem
    generator = torch.Generator(device=device).manual_seed(seed)
    weight_map, shapes = {}, shape.tensor_shapes()
    for index, names in enumerate(shards, start=1):
        file = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name in names:
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shapes[name], dtype=dtype)
            else:
                t = torch.randn(shapes[name], generator=generator, device=device, dtype=dtype)
                tensors[name] = t.mul_(0.02).cpu()
            weight_map[name] = file
        save_file(tensors, str(path / file), metadata={"format": "pt"})
    index = {"metadata": {"total_size": shape.num_params() * elem}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))


def _write_tokenizer(path: Path, shape: ModelShape) -> None:
    """Word-level: id i < bos_id is the word ``t<i>``; the top ids are special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = ["<|begin_of_text|>", "<|end_of_text|>", "<|unk|>"] + [
        f"<|reserved_{k}|>" for k in range(shape.num_special - 3)]
    vocab = {f"t{i}": i for i in range(shape.bos_id)}
    vocab.update({tok: shape.bos_id + k for k, tok in enumerate(special)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=special[0], eos_token=special[1],
                            unk_token=special[2], pad_token=special[1]).save_pretrained(path)
