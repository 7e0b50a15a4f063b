"""PEFT on fusedlm models against peft on the transformers model with the same weights (issue #11).

Cases (CPU, fp32, torch's threads; LLaMA-shaped model, MHA, RoPE, SwiGLU):
  * one fine-tuning step (forward + backward + AdamW over the trainable parameters), LoRA r=16 on all
    seven targets: fusedlm vs peft ``get_peft_model`` on ``LlamaForCausalLM``; the adapter is peft's,
    written by ``save_pretrained`` and read by ``fusedlm.interop.peft.load_adapter`` (same weights;
    ``loss_diff`` checks it);
  * the same step with QLoRA: fusedlm ``apply_qlora`` (NF4, blocksize 64, double quantisation) holding
    the bytes of the bitsandbytes model (``load_bnb_state_dict``) vs peft on transformers +
    bitsandbytes ``load_in_4bit`` (nf4, double quant, fp32 compute);
  * mixed-adapter greedy decoding, 8 sequences each with its own adapter (8 LoRA r=16 adapters, all
    seven targets): decode tokens/s, fusedlm ``adapter_ids`` (one ``lora_linear`` call per layer) vs
    peft ``generate(adapter_names=...)``; decode time = time(prompt + n tokens) - time(prompt + 1);
  * every method on the same model: step time, trainable parameters, peak memory.
Peak memory (``peak_MiB``) = the bytes of the model's tensors, the optimizer state and the gradients
when the step starts, plus the peak of torch allocations during one step (torch.profiler memory
events). Times are medians of alternating runs of the two implementations; ``x_paired`` = the ratio
of their minima (steadier while other processes share the cores).
Quick set: d=512, 4 layers, vocab 8000, seq 128, batch 2; ``--full``: the issue's d=1024, 8 layers,
vocab 32000, seq 256, batch 4.
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time
import warnings

import torch

from ._harness import Row

SUITE = "peft"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
R = 16
QUICK = dict(d=512, layers=4, heads=8, d_ff=1408, vocab=8000, seq=128, batch=2, new_tokens=8, prompt=16)
FULL = dict(d=1024, layers=8, heads=16, d_ff=2816, vocab=32000, seq=256, batch=4, new_tokens=32, prompt=64)


def _checkpoint(shape: dict) -> str:
    """A random LlamaForCausalLM of `shape` saved to a temporary directory."""
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=shape["vocab"], hidden_size=shape["d"], num_hidden_layers=shape["layers"],
                            num_attention_heads=shape["heads"], num_key_value_heads=shape["heads"],
                            intermediate_size=shape["d_ff"], max_position_embeddings=2 * shape["seq"], pad_token_id=0)
    path = tempfile.mkdtemp(prefix="fusedlm-bench-peft-")
    tf.LlamaForCausalLM(config).save_pretrained(path)
    return path


def _hf(path: str, quantised: bool = False):
    import transformers as tf

    kw = {}
    if quantised:
        kw["quantization_config"] = tf.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                          bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    return tf.AutoModelForCausalLM.from_pretrained(path, device_map="cpu", dtype=torch.float32, **kw)


def _peft(hf_model, n_adapters: int = 1):
    import peft

    pm = peft.get_peft_model(hf_model, peft.LoraConfig(r=R, lora_alpha=2 * R, target_modules=TARGETS), adapter_name="a0")
    for i in range(1, n_adapters):
        pm.add_adapter(f"a{i}", peft.LoraConfig(r=R, lora_alpha=2 * R, target_modules=TARGETS))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a trained-looking adapter: B != 0
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    return pm


def _save_adapters(pm, n_adapters: int) -> list[str]:
    root = tempfile.mkdtemp(prefix="fusedlm-bench-adapter-")
    pm.save_pretrained(root, selected_adapters=[f"a{i}" for i in range(n_adapters)])
    return [os.path.join(root, f"a{i}") for i in range(n_adapters)]  # peft writes a named adapter in its own folder


def _batch(shape: dict):
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, shape["vocab"], (shape["batch"], shape["seq"]), generator=g)
    return ids, ids.clone()


def _trainer(model, ids, labels, hf: bool):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step():
        out = model(input_ids=ids, labels=labels) if hf else model(ids, labels=labels)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)  # gradients stay allocated, as in a training loop
        return float(out.loss)

    return step, opt


def _resident_bytes(model, opt) -> int:
    """Bytes of the model's tensors (state dict: 4-bit bytes and quantisation state included), the
    optimizer state and the gradients, each storage once."""
    seen = {}
    tensors = list(model.state_dict().values()) + [p.grad for p in model.parameters() if p.grad is not None]
    tensors += [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    for t in tensors:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def _peak_mib(fn, model, opt) -> float:
    from torch.profiler import ProfilerActivity, profile

    resident = _resident_bytes(model, opt)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return (resident + peak) / 2**20


def _alternate(fns: dict, n: int) -> tuple[dict, dict]:
    """Median ms of each fn over n alternating rounds (after one warm-up each), and the minima."""
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(n):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(1e3 * (time.perf_counter() - t0))
    return {k: statistics.median(v) for k, v in times.items()}, {k: min(v) for k, v in times.items()}


def _shape_name(s: dict) -> str:
    return f"d={s['d']} L={s['layers']} V={s['vocab']} seq={s['seq']} B={s['batch']}"


def _fine_tuning(shape: dict, path: str, quantised: bool, reps: int) -> list[Row]:
    from fusedlm import peft as fpeft
    from fusedlm.interop import hf, peft as peft_files

    ids, labels = _batch(shape)
    pm = _peft(_hf(path, quantised))
    pm.train()
    adapter = _save_adapters(pm, 1)[0]
    if quantised:
        ours = fpeft.quantize(hf.from_pretrained(path))  # NF4 layers (blocksize 64, double quant) to receive bnb's bytes
        base = {k.removeprefix("base_model.model.").replace(".base_layer", ""): v for k, v in pm.state_dict().items() if "lora_" not in k}
        ours = peft_files.load_adapter(hf.load_bnb_state_dict(ours, base), adapter)
    else:
        ours = peft_files.load_adapter(hf.from_pretrained(path), adapter)
    ours.train()
    step_ours, opt_ours = _trainer(ours, ids, labels, hf=False)
    step_peft, opt_peft = _trainer(pm, ids, labels, hf=True)
    loss_diff = abs(step_ours() - step_peft())  # same weights before any update
    med, mins = _alternate({"ours": step_ours, "peft": step_peft}, reps)
    method = "QLoRA" if quantised else "LoRA"
    case = f"{method} r={R} all 7, fwd+bwd+AdamW, {_shape_name(shape)} fp32"
    peer = "peft + bitsandbytes 4-bit" if quantised else "peft on transformers"
    trainable = fpeft.trainable_parameters(ours)[0]
    return [
        Row(SUITE, case, f"fusedlm {method}", med["ours"], {
            "x_paired": mins["peft"] / mins["ours"], "peak_MiB": _peak_mib(step_ours, ours, opt_ours), "trainable": trainable,
            "loss_diff": loss_diff}),
        Row(SUITE, case, peer, med["peft"], {"peak_MiB": _peak_mib(step_peft, pm, opt_peft),
                                             "trainable": pm.get_nb_trainable_parameters()[0]}),
    ]


def _greedy(model, ids, mask, n: int, adapter_ids):
    """Cached greedy decoding of n tokens (the fusedlm generation contract)."""
    cache = model.new_cache(ids.shape[0], ids.shape[1] + n)
    logits = model(ids, attention_mask=mask, cache=cache, last_logits_only=True, adapter_ids=adapter_ids).logits
    out = []
    for i in range(n):
        out.append(logits[:, -1].argmax(-1, keepdim=True))
        if i < n - 1:
            logits = model(out[-1], cache=cache, last_logits_only=True, adapter_ids=adapter_ids).logits
    return torch.cat(out, dim=1)


def _mixed_generation(shape: dict, path: str, reps: int) -> list[Row]:
    from fusedlm.interop import hf, peft as peft_files

    n_adapters, n = 8, shape["new_tokens"]
    pm = _peft(_hf(path), n_adapters).eval()
    ours = hf.from_pretrained(path)
    for i, adapter in enumerate(_save_adapters(pm, n_adapters)):
        peft_files.load_adapter(ours, adapter, name=f"a{i}")
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, shape["vocab"], (n_adapters, shape["prompt"]), generator=g)
    mask = torch.ones_like(ids)
    adapter_ids, names = torch.arange(n_adapters), [f"a{i}" for i in range(n_adapters)]

    def hf_gen(k):
        return pm.generate(input_ids=ids, attention_mask=mask, adapter_names=names, max_new_tokens=k, min_new_tokens=k,
                           do_sample=False, pad_token_id=0)[:, ids.shape[1]:]

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        same = bool(torch.equal(_greedy(ours, ids, mask, n, adapter_ids), hf_gen(n)))
        med, _ = _alternate({"ours_n": lambda: _greedy(ours, ids, mask, n, adapter_ids), "ours_1": lambda: _greedy(ours, ids, mask, 1, adapter_ids),
                             "peft_n": lambda: hf_gen(n), "peft_1": lambda: hf_gen(1)}, reps)
    tok = n_adapters * (n - 1)
    ours_ms, peft_ms = med["ours_n"] - med["ours_1"], med["peft_n"] - med["peft_1"]
    case = f"mixed-adapter greedy decode, {n_adapters} seqs x own adapter (r={R} all 7), prompt {shape['prompt']}, {n} tokens, d={shape['d']} L={shape['layers']}"
    return [Row(SUITE, case, "fusedlm adapter_ids", ours_ms, {"tokens_per_s": 1e3 * tok / ours_ms, "same_tokens_as_peft": same}),
            Row(SUITE, case, "peft adapter_names", peft_ms, {"tokens_per_s": 1e3 * tok / peft_ms})]


def _methods(shape: dict, path: str, reps: int) -> list[Row]:
    from fusedlm import peft as fpeft
    from fusedlm.interop import hf

    ids, labels = _batch(shape)
    methods = {
        "full fine-tuning": lambda m: m,
        f"LoRA r={R} all 7": lambda m: fpeft.apply_lora(m, r=R, alpha=2 * R, targets="all"),
        f"QLoRA r={R} all 7": lambda m: fpeft.apply_qlora(m, r=R, alpha=2 * R),
        "prompt tuning 20": lambda m: fpeft.apply_prompt_tuning(m, n_virtual_tokens=20),
        "P-tuning MLP 20": lambda m: fpeft.apply_p_tuning(m, n_virtual_tokens=20),
        "prefix tuning 20 (MLP)": lambda m: fpeft.apply_prefix_tuning(m, n_virtual_tokens=20, projection=True),
        "AdaPtLoRA 4 tasks, 8 tokens, r=16 q,v": lambda m: fpeft.apply_adaptplora(m, n_tasks=4, n_prompt_tokens=8, r=R),
        "Pfeiffer adapters": lambda m: fpeft.apply_adapters(m, kind="pfeiffer"),
        "Houlsby adapters": lambda m: fpeft.apply_adapters(m, kind="houlsby"),
    }
    case = f"every method, fwd+bwd+AdamW, {_shape_name(shape)} fp32"
    rows = []
    for name, apply in methods.items():
        model = apply(hf.from_pretrained(path)).train()
        if isinstance(model, fpeft.AdaPtLoRAModel):
            task_ids = torch.arange(ids.shape[0]) % 4
            params = [p for p in model.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=1e-4)

            def step(model=model, opt=opt, task_ids=task_ids):
                model(ids, labels=labels, task_ids=task_ids).loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=False)
        else:
            step, opt = _trainer(model, ids, labels, hf=False)
        med, _ = _alternate({"step": step}, reps)
        trainable, total = fpeft.trainable_parameters(model)
        rows.append(Row(SUITE, case, f"fusedlm {name}", med["step"], {
            "trainable": trainable, "trainable%": 100 * trainable / total, "peak_MiB": _peak_mib(step, model, opt)}))
    return rows


def run(full: bool = False) -> list[Row]:
    shape = FULL if full else QUICK
    path = _checkpoint(shape)
    reps = 5 if full else 3
    return (_fine_tuning(shape, path, False, reps) + _fine_tuning(shape, path, True, reps)
            + _mixed_generation(shape, path, reps) + _methods(shape, path, 3 if full else 2))
