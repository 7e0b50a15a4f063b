"""fusedlm inside transformers / peft / bitsandbytes models on the CPU (issue #14), batch 1, fp32.

Model: transformers' LlamaForCausalLM, random weights from a config (8 layers, d=512, 8 heads,
d_ff=1408, vocab 32000), the shape of the models suite.

  * prefill of a 512-token prompt into a DynamicCache (logits of the last position), and greedy
    decoding of new tokens after it (tokens/s): attn_implementation "fusedlm" vs "sdpa", the
    same weights (target >= 1.2x prefill, >= 1.0x decode);
  * peft LoRA (r=16 on q, k, v, o, gate, up, down) forward + backward of a causal-LM loss on a
    256-token sequence: ``integrations.apply`` (attention + LoRA) vs the unpatched peft model
    with sdpa (target >= 1.1x);
  * bitsandbytes 4-bit NF4 (``from_pretrained`` with ``BitsAndBytesConfig``, double quantisation,
    compute fp32) greedy decode after a 64-token prompt: ``apply`` vs bitsandbytes as it runs
    (on an avx512_bf16 CPU it repacks layers for its own kernel, rounding scales to bf16) and
    bitsandbytes' exact path (that repacking off) (target >= 10x).

Implementations of a case are timed in alternating rounds (bench_models._interleaved).
``--full`` adds 1024/2048-token prompts and longer decodes.
"""
from __future__ import annotations

import copy
import tempfile

import torch

from .bench_models import _hf_fns, _interleaved
from ._harness import Row, timeit

SUITE = "integrations"
SHAPE = dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
             intermediate_size=1408, vocab_size=32000, max_position_embeddings=4096)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _llama(attn_implementation: str = "sdpa"):
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(**SHAPE, attn_implementation=attn_implementation)
    return transformers.LlamaForCausalLM(config).eval()


def _prompt(n: int) -> torch.Tensor:
    return torch.randint(0, SHAPE["vocab_size"], (1, n), generator=torch.Generator().manual_seed(n))


def _attention_cases(rows: list[Row], model, prompts, n_new: int) -> None:
    from fusedlm.integrations import transformers as fused_attention

    fused_attention.register()
    fused = copy.deepcopy(model)
    fused.set_attn_implementation("fusedlm")
    with torch.inference_mode():
        for n in prompts:
            prompt = _prompt(n)
            impls = {"fusedlm attention": _hf_fns(fused, prompt, n_new), "transformers sdpa": _hf_fns(model, prompt, n_new)}
            for name, ms in _interleaved({k: fns[0] for k, fns in impls.items()}, rounds=3).items():
                rows.append(Row(SUITE, f"prefill {n} tok, HF llama 8L d512 fp32", name, ms, {"tok_per_s": n / ms * 1e3}))
            for fns in impls.values():
                fns[0]()  # the cache holds the prompt
            for name, ms in _interleaved({k: fns[1] for k, fns in impls.items()}, rounds=2).items():
                rows.append(Row(SUITE, f"greedy decode {n_new} tok after {n}, HF llama 8L d512 fp32", name, ms,
                                {"tok_per_s": n_new / ms * 1e3}))


def _lora_case(rows: list[Row], model, n: int) -> None:
    import peft

    from fusedlm import integrations

    config = peft.LoraConfig(r=16, lora_alpha=32, target_modules=LORA_TARGETS, init_lora_weights=False)
    plain = peft.get_peft_model(copy.deepcopy(model), config)
    patched = copy.deepcopy(plain)
    integrations.apply(patched)
    ids = _prompt(n)

    def step(m):
        def fn():
            m.zero_grad(set_to_none=True)
            m(input_ids=ids, labels=ids).loss.backward()
        return fn

    times = _interleaved({"fusedlm apply (attention + LoRA)": step(patched), "peft + sdpa": step(plain)}, rounds=2)
    for name, ms in times.items():
        rows.append(Row(SUITE, f"peft LoRA r=16 all linears fwd+bwd {n} tok, HF llama 8L d512 fp32", name, ms))


def _bnb_model(model):
    import bitsandbytes as bnb
    import transformers

    with tempfile.TemporaryDirectory() as path:
        model.save_pretrained(path)
        quant = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                                bnb_4bit_compute_dtype=torch.float32)
        q = transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, device_map="cpu").eval()
    return q, bnb


def _bnb_case(rows: list[Row], model, n: int, n_new: int) -> None:
    from fusedlm import integrations

    plain, bnb = _bnb_model(model)
    exact = copy.deepcopy(plain)  # before any forward: bitsandbytes repacks at the first inference call
    patched = copy.deepcopy(plain)
    for module in exact.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    integrations.apply(patched)
    prompt = _prompt(n)
    impls = {"fusedlm apply (NF4 + attention)": _hf_fns(patched, prompt, n_new),
             "bitsandbytes (as it runs)": _hf_fns(plain, prompt, n_new),
             "bitsandbytes (exact path)": _hf_fns(exact, prompt, n_new)}
    with torch.inference_mode():
        for fns in impls.values():
            fns[0]()
        times = {name: timeit(fns[1], warmup=1, min_repeat=2, min_seconds=0.0) for name, fns in impls.items()}
    for name, ms in times.items():
        rows.append(Row(SUITE, f"bnb NF4 greedy decode {n_new} tok after {n}, HF llama 8L d512", name, ms,
                        {"tok_per_s": n_new / ms * 1e3}))


def run(full: bool = False) -> list[Row]:
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("transformers not installed: suite skipped")
        return []
    rows: list[Row] = []
    model = _llama()
    _attention_cases(rows, model, (512, 1024, 2048) if full else (512,), 128 if full else 16)
    try:
        import peft  # noqa: F401
        _lora_case(rows, model, 512 if full else 256)
    except ImportError:
        print("peft not installed: LoRA case skipped")
    try:
        import bitsandbytes  # noqa: F401
        _bnb_case(rows, model, 64, 32 if full else 8)
    except ImportError:
        print("bitsandbytes not installed: NF4 case skipped")
    return rows
