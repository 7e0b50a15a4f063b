"""PEFT on fusedlm models against peft on the transformers model with the same weights (issues #11, #24).

Cases (CPU, torch's threads; LLaMA-shaped model, MHA, RoPE, SwiGLU):
  * one fine-tuning step (forward + backward + AdamW over the trainable parameters), LoRA r=16 on all
    seven targets: fusedlm vs peft ``get_peft_model`` on ``LlamaForCausalLM``; the adapter is peft's,
    written by ``save_pretrained`` and read by ``fusedlm.interop.peft.load_adapter`` (same weights;
    ``loss_diff`` checks it), same data. In fp32, and in bf16 autocast (``torch.autocast("cpu",
    torch.bfloat16)`` around the forward and the loss, fp32 master weights and AdamW state) on both
    sides;
  * the same step with QLoRA: fusedlm ``quantize`` (NF4, blocksize 64, double quantisation) holding
    the bytes of the bitsandbytes model (``load_bnb_state_dict``) vs peft on transformers +
    bitsandbytes ``load_in_4bit`` (nf4, double quant), at equal precision: fusedlm's default
    ``compute_dtype="auto"`` (bf16 operands where the CPU has avx512_bf16) against bitsandbytes'
    ``bnb_4bit_compute_dtype=bfloat16``, and float32 compute on both sides;
  * mixed-adapter greedy decoding, 8 sequences each with its own adapter (8 LoRA r=16 adapters, all
    seven targets): decode tokens/s, fusedlm ``adapter_ids`` (one ``lora_linear`` call per layer) vs
    peft ``generate(adapter_names=...)``; decode time = time(prompt + n tokens) - time(prompt + 1);
  * every method on the same model: step time, trainable parameters, peak memory.

Each loop runs as that library's user writes it: fusedlm ``model(ids, labels=labels,
return_logits=False)`` (the fused LM head + loss, ``ops.linear_cross_entropy``: the [tokens, vocab]
logits are never stored), peft ``model(input_ids=ids, labels=labels)`` (transformers builds the
logits); then ``loss.backward()``, ``AdamW.step()``, ``zero_grad(set_to_none=False)``. The bf16
cases (LoRA autocast, QLoRA "auto") run only where fusedlm's kernels have bf16 dot products
(avx512_bf16): elsewhere bf16 is emulated and fp32 is the mode to use (with ``--isa avx2`` QLoRA
"auto" is the fp32 case).

Columns. Times are medians of alternating runs of the two implementations (A B A B, after one
warm-up step each: the step whose losses give ``loss_diff``); ``--full`` times 3 rounds, the quick set 5; ``x_paired`` = the ratio of their minima (steadier while other processes share the cores).
``peak_MiB`` = the bytes of the model's tensors (4-bit bytes and quantisation state included), the
optimizer state and the gradients when a step starts, each storage once, plus the peak of the live
bytes torch allocates during one step (torch.profiler memory events); ``peak_vs_peer`` is that over
the peer's. ``GFLOP/s`` = the step's FLOP floor / step time and ``x_floor`` = step time / the floor's
time, where the floor is 4·P·T FLOPs for a LoRA / QLoRA step (forward 2·P·T plus the input gradients
2·P·T; the frozen weights get no weight gradient) with T = batch · seq tokens and P = the weights of
every GEMM with frozen base weights: the seven projections of each layer (4·d² + 3·d·d_ff) plus the LM
head (d·V). Not counted: the adapters' own FLOPs (r·(d_in + d_out) per target, ~3% at r=16), the
attention scores (4·N·d per token and layer forward, ~4% at d=1024, N=256), norms, RoPE, SwiGLU
and AdamW. The floor's time is those FLOPs at the **same-run GEMM peak**: a 2048³ torch matmul in
fp32 (fp32 cases) or bf16 (the bf16 cases), the fastest of 8 calls, at the start of the suite and again
after the fine-tuning cases, the faster of the two (the ``GEMM peak`` rows);
a case's ``FLOP floor`` row is that limit, and its ratio is how close fusedlm comes to it.
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


def _hf(path: str, quantised: bool = False, compute_dtype: torch.dtype = torch.float32):
    import transformers as tf

    kw = {}
    if quantised:
        kw["quantization_config"] = tf.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                          bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute_dtype)
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


def _trainer(model, ids, labels, hf: bool, bf16: bool = False):
    """One training step as that library's user writes it (see the module docstring); returns
    (step, optimizer); step() returns the loss of the step."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(input_ids=ids, labels=labels) if hf else model(ids, labels=labels, return_logits=False)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)  # gradients stay allocated, as in a training loop
        return float(out.loss.detach())

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


def _alternate(fns: dict, n: int, warm_up: bool = True) -> tuple[dict, dict]:
    """Median ms of each fn over n alternating rounds (after one warm-up each, unless the caller ran
    them already), and the minima."""
    for fn in fns.values() if warm_up else ():
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


def gemm_peak(calls: int = 8, suite: str = SUITE, bf16: bool = True) -> dict[str, Row]:
    """The same-run GEMM peak: a 2048³ torch matmul in fp32 and (if `bf16`) in bf16, the fastest of
    `calls` calls each (a peak: the best the BLAS reaches now), one Row each (GFLOP/s in extra).
    Ask for bf16 only where bf16 cases run: emulated (e.g. capped at AVX2) one call takes ~40 s."""
    n, rows = 2048, {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))[: 2 if bf16 else 1]:
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        a @ b  # warm-up
        times = []
        for _ in range(calls):
            t0 = time.perf_counter()
            a @ b
            times.append(1e3 * (time.perf_counter() - t0))
        rows[name] = Row(suite, "GEMM peak (same run): torch 2048^3 matmul, fastest call", f"torch {name} matmul", min(times),
                         {"GFLOP/s": 2 * n**3 / min(times) / 1e6}, floor=True)
    return rows


def floor_flops(shape: dict) -> tuple[float, int]:
    """(4·P·T, P) of a LoRA / QLoRA step on `shape` (P: the frozen weights of the seven projections of
    every layer and of the LM head; T: batch · seq tokens) — see the module docstring."""
    d, f, v = shape["d"], shape["d_ff"], shape["vocab"]
    p = shape["layers"] * (4 * d * d + 3 * d * f) + d * v
    return 4.0 * p * shape["batch"] * shape["seq"], p


def _fine_tuning(shape: dict, path: str, method: str, precision: str, peak: dict, reps: int) -> list[Row]:
    """One fine-tuning case: method "LoRA" or "QLoRA", precision "fp32" or "bf16" (LoRA: autocast;
    QLoRA: fusedlm compute_dtype "auto" against bitsandbytes' bf16 compute dtype)."""
    from fusedlm import peft as fpeft
    from fusedlm.interop import hf, peft as peft_files

    quantised, bf16 = method == "QLoRA", precision == "bf16"
    ids, labels = _batch(shape)
    pm = _peft(_hf(path, quantised, torch.bfloat16 if quantised and bf16 else torch.float32))
    pm.train()
    adapter = _save_adapters(pm, 1)[0]
    if quantised:  # NF4 layers (blocksize 64, double quant) to receive bnb's bytes
        ours = fpeft.quantize(hf.from_pretrained(path), compute_dtype="auto" if bf16 else None)
        base = {k.removeprefix("base_model.model.").replace(".base_layer", ""): v for k, v in pm.state_dict().items() if "lora_" not in k}
        ours = peft_files.load_adapter(hf.load_bnb_state_dict(ours, base), adapter)
    else:
        ours = peft_files.load_adapter(hf.from_pretrained(path), adapter)
    ours.train()
    autocast = bf16 and not quantised
    step_ours, opt_ours = _trainer(ours, ids, labels, hf=False, bf16=autocast)
    step_peft, opt_peft = _trainer(pm, ids, labels, hf=True, bf16=autocast)
    loss_diff = abs(step_ours() - step_peft())  # same weights before any update; also the warm-up step
    med, mins = _alternate({"ours": step_ours, "peft": step_peft}, reps, warm_up=False)
    mem_ours, mem_peft = _peak_mib(step_ours, ours, opt_ours), _peak_mib(step_peft, pm, opt_peft)
    if quantised:
        mode = "bf16 compute (fusedlm 'auto', bnb bfloat16)" if bf16 else "fp32 compute"
    else:
        mode = "bf16 autocast, fp32 master weights" if bf16 else "fp32"
    case = f"{method} r={R} all 7, fwd+bwd+AdamW, {_shape_name(shape)} {mode}"
    peer = "peft + bitsandbytes 4-bit" if quantised else "peft on transformers"
    flops, p = floor_flops(shape)
    gemm = peak["bf16" if bf16 else "fp32"]
    floor_ms = flops / gemm.extra["GFLOP/s"] / 1e6
    rate = lambda ms: {"GFLOP/s": flops / ms / 1e6, "x_floor": ms / floor_ms}  # noqa: E731
    return [
        Row(SUITE, case, f"fusedlm {method}", med["ours"], {
            "x_paired": mins["peft"] / mins["ours"], "peak_MiB": mem_ours, "peak_vs_peer": mem_ours / mem_peft, **rate(med["ours"]),
            "trainable": fpeft.trainable_parameters(ours)[0], "loss_diff": loss_diff}),
        Row(SUITE, case, peer, med["peft"], {"peak_MiB": mem_peft, **rate(med["peft"]),
                                             "trainable": pm.get_nb_trainable_parameters()[0]}),
        Row(SUITE, case, f"FLOP floor 4·P·T at the {'bf16' if bf16 else 'fp32'} GEMM peak", floor_ms,
            {"P": p, "GFLOP": flops / 1e9, "GEMM GFLOP/s": gemm.extra["GFLOP/s"]}, floor=True),
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


def _refloor(rows: list[Row], peak: dict) -> list[Row]:
    """A fine-tuning case's rows (fusedlm, peer, floor) with the floor at the GEMM rate of `peak`."""
    *timed, floor = rows
    rate = peak["bf16" if "bf16" in floor.impl else "fp32"].extra["GFLOP/s"]
    floor.ms = floor.extra["GFLOP"] * 1e3 / rate
    floor.extra["GEMM GFLOP/s"] = rate
    for r in timed:
        r.extra["x_floor"] = r.ms / floor.ms
    return rows


def run(full: bool = False) -> list[Row]:
    from fusedlm.ops import _gemm

    shape = FULL if full else QUICK
    path = _checkpoint(shape)
    reps = 3 if full else 5
    try:
        bf16 = _gemm.native_bf16()
    except RuntimeError:  # no fusedlm._C
        bf16 = False
    peak = gemm_peak(bf16=bf16)  # measured again after the fine-tuning cases below; the floors use the faster of the two
    if not bf16:
        print("peft suite: no bf16 dot products at this SIMD level: the bf16 fine-tuning cases are skipped (fp32 is the mode here)")
    cases = []
    for method in ("LoRA", "QLoRA"):
        for precision in ("fp32", "bf16") if bf16 else ("fp32",):
            cases.append(_fine_tuning(shape, path, method, precision, peak, reps))
    again = gemm_peak(bf16=bf16)
    if any(again[k].ms < peak[k].ms for k in peak):  # a faster peak: every floor at it (the floor rows are built from `peak`)
        peak = {k: min(peak[k], again[k], key=lambda r: r.ms) for k in peak}
        cases = [_refloor(rows, peak) for rows in cases]
    rows = list(peak.values()) + [r for rows in cases for r in rows]
    return rows + _mixed_generation(shape, path, 3) + _methods(shape, path, 1 if full else 2)
