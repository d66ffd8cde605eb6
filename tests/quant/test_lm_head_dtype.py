"""The ``lm_head_dtype`` key (auto, bfloat16, int8) under on-load int8/int4 RTN.

- the key reaches the weight methods through the config and the registry, and is refused
  (naming the key) where it would be ignored: no on-load quantization, FP8 on load, a
  quantized checkpoint;
- the logits equal those of an HF float model whose projections hold their RTN round trip
  and whose head holds the bfloat16 (or int8 RTN) round trip of its weight, through a
  chunked prefill and decodes, so the head really is stored that way and nothing else
  changes;
- a tensor-parallel rank's int8 head holds its rows of the one-process head (each row is
  quantized on its own), so its partial logits are the one-process logits' columns;
- end to end, ``LLM(quant_type="int8", lm_head_dtype="int8")`` gives the dequantized HF
  model's greedy tokens.
"""
from __future__ import annotations

import pytest
import torch

from ferry.checkpoint import load_hf_config
from ferry.config import EngineConfig
from ferry.distributed.state import ParallelContext, RankLayout
from ferry.kernels.quant_reference import dequantize_wna16, quantize_rtn
from ferry.models.loader import get_model
from ferry.models.parallel_model import build_rank_model
from ferry.quant.on_load_rtn import RtnWeightMethods
from ferry.quant.registry import resolve_quantization
from test_models import PagedRunner, assert_logits_close, hf_logits

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class Unquantized:
    quantization_config = None


def _round_trip(weight: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    k = weight.shape[1]
    gs = group_size if k % group_size == 0 else k
    q, s, z = quantize_rtn(weight, bits, gs, True)
    return dequantize_wna16(q, s, z, bits, gs)


def _hf_reference(path, bits: int, head: str):
    """HF's float model holding what ferry stores: RTN projections (group 128, per channel
    on the tiny model) and the head in ``head``'s precision, dequantized."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.rsplit(".", 1)[-1] in PROJECTIONS:
                module.weight.data = _round_trip(module.weight.data, bits, 128)
        w = model.lm_head.weight.data
        if head != "auto":
            model.lm_head.weight.data = (w.to(torch.bfloat16).float() if head == "bfloat16"
                                         else _round_trip(w, 8, 128))
    return model


def _ferry_model(path, quant_type: str, head: str):
    methods = resolve_quantization(load_hf_config(path), quant_type,
                                   lm_head_dtype=head).weight_methods
    return get_model(path, load_hf_config(path), torch.float32, torch.device("cpu"),
                     weight_methods=methods)


def test_the_key_reaches_the_weight_methods():
    assert EngineConfig.from_flat(model="m").model.lm_head_dtype == "auto"
    assert EngineConfig.from_flat(model="m", lm_head_dtype="int8").model.lm_head_dtype == "int8"
    with pytest.raises(ValueError):
        EngineConfig.from_flat(model="m", lm_head_dtype="float16")
    for head, dtype in (("auto", None), ("bfloat16", torch.bfloat16), ("int8", torch.int8)):
        for quant_type in ("int8", "int4"):
            methods = resolve_quantization(Unquantized(), quant_type, lm_head_dtype=head)
            assert methods.weight_methods.head_dtype == dtype


@pytest.mark.parametrize("quant_type", ["auto", "none", "fp8"])
def test_refused_where_the_head_is_not_quantized_on_load(quant_type):
    with pytest.raises(ValueError, match="lm_head_dtype=int8 applies to quant_type int8 or int4"):
        resolve_quantization(Unquantized(), quant_type, lm_head_dtype="int8")
    with pytest.raises(ValueError, match="is not one of"):
        resolve_quantization(Unquantized(), "int8", lm_head_dtype="fp16")


def test_refused_on_a_quantized_checkpoint():
    class Gptq:
        quantization_config = {"quant_method": "gptq", "bits": 4, "group_size": 128,
                               "sym": True, "desc_act": False}

    with pytest.raises(ValueError, match="not to a gptq checkpoint"):
        resolve_quantization(Gptq(), "auto", lm_head_dtype="bfloat16")


@pytest.mark.parametrize("bits,head", [(8, "int8"), (4, "int8"), (4, "bfloat16")])
def test_logits_match_hf_holding_the_same_head(tiny_model_dir, bits, head):
    path = tiny_model_dir("llama")                        # untied head (32000 x 64)
    model = _ferry_model(path, f"int{bits}", head)
    lm_head = model.lm_head
    if head == "int8":
        assert lm_head.qweight.dtype == torch.uint8 and not hasattr(lm_head, "weight")
    else:
        assert lm_head.weight.dtype == torch.bfloat16
    hf = _hf_reference(str(path), bits, head)
    prompt = torch.randint(3, 300, (12,), generator=torch.Generator().manual_seed(bits)).tolist()
    runner = PagedRunner(model)
    assert_logits_close(runner.step([(0, prompt, 0, 7)])[0], hf_logits(hf, prompt[:7]), "chunk 1")
    assert_logits_close(runner.step([(0, prompt, 7, 5)])[0], hf_logits(hf, prompt)[7:], "chunk 2")
    tokens = list(prompt)
    for step in range(3):
        tokens.append(int(hf_logits(hf, tokens)[-1].argmax()))
        got = runner.step([(0, tokens, len(tokens) - 1, 1)])[0]
        assert_logits_close(got, hf_logits(hf, tokens)[-1:], f"decode {step}")
    # the head's rounding is real: the float-head model's logits differ
    float_head = _ferry_model(path, f"int{bits}", "auto")
    assert float((PagedRunner(float_head).step([(0, prompt, 0, 12)])[0]
                  - hf_logits(hf, prompt)).abs().max()) > 1e-4


def test_a_rank_holds_its_rows_of_the_int8_head(tiny_model_dir):
    path = tiny_model_dir("llama")
    hf_config = load_hf_config(path)

    def head_of(rank: int, tp_size: int):
        # body groups of 32: a row-parallel rank of the tiny model holds whole groups
        methods = RtnWeightMethods(8, group_size=32, head_dtype=torch.int8)
        ctx = ParallelContext(RankLayout(rank=rank, tp_size=tp_size))
        model = build_rank_model(path, hf_config, torch.float32, torch.device("cpu"), ctx,
                                 methods)
        return model.lm_head

    single = head_of(0, 1)
    hidden = torch.randn(3, hf_config.hidden_size, generator=torch.Generator().manual_seed(0))
    want = single.weight_method.apply(single, hidden)                   # (3, V)
    start = 0
    for rank in (0, 1):
        head = head_of(rank, 2)
        inner = getattr(head.weight_method, "inner", head.weight_method)
        part = inner.apply(head, hidden)                                # this rank's columns
        rows = head.qweight.shape[0]
        assert torch.equal(head.qweight, single.qweight[start:start + rows])
        assert torch.equal(head.scales, single.scales[start:start + rows])
        width = min(rows, want.shape[1] - start)
        torch.testing.assert_close(part[:, :width], want[:, start:start + width])
        start += rows
    assert start >= want.shape[1]


def test_llm_generates_the_dequantized_models_greedy_tokens(tiny_model_dir):
    from ferry import LLM, SamplingParams
    path = tiny_model_dir("llama")
    hf = _hf_reference(str(path), 8, "int8")
    prompt = list(range(5, 17))
    want = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                       min_new_tokens=8)[0, len(prompt):].tolist()
    llm = LLM(model=str(path), quant_type="int8", lm_head_dtype="int8", dtype="float32",
              device="cpu", kv_cache_memory="16MiB")
    out = llm.generate([{"prompt_token_ids": prompt}],
                       SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    assert out[0].outputs[0].token_ids == want


def test_a_tied_head_stays_as_loaded_and_says_so(caplog):
    class Tied(Unquantized):
        tie_word_embeddings = True

    with caplog.at_level("WARNING", logger="ferry.quant.registry"):
        resolve_quantization(Tied(), "int8", lm_head_dtype="int8")
    assert "tied to its embeddings" in caplog.text


def test_a_tied_model_keeps_its_head(tiny_model_dir):
    path = tiny_model_dir("llama", tie_word_embeddings=True)
    model = _ferry_model(path, "int8", "int8")
    assert model.model.embed_tokens.weight.dtype == torch.float32
    hf = _hf_reference(str(path), 8, "auto")     # RTN projections, the float tied head
    prompt = list(range(5, 17))
    got = PagedRunner(model).step([(0, prompt, 0, len(prompt))])[0]
    assert_logits_close(got, hf_logits(hf, prompt), "tied head")
