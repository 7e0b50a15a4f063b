"""Training steps on the CPU: a LLaMA-shaped model in fusedlm's Trainer vs the same weights in
transformers' LlamaForCausalLM (attn_implementation="sdpa") driven by the same AdamW loop, and vs
trl's SFTTrainer / DPOTrainer (offline: a word-level tokenizer built in memory), fp32.

Cases (one optimizer step each, fused AdamW (transformers' and trl's default) lr 1e-5, gradient clipping at 1.0, batch B sequences of N
tokens; tok_per_s = B·N / step time):
- SFT: each sequence a prompt of N/2 tokens and a response of N/2 (the last one EOS); the loss on
  the response only (fusedlm: lm_loss; transformers: labels -100 on the prompt; trl:
  prompt/completion dataset, completion_only_loss).
- DPO: B/2 preference pairs (prompt N/2 tokens, chosen and rejected N/2 each), the reference a
  frozen copy run every step (fusedlm: DPO(frozen_copy(model)); trl: DPOTrainer with ref_model).

Shapes: the quick set uses 2 layers, d=256, N=128, B=4, fp32; ``--full`` the issue's 8 layers,
d=512, 8 heads, d_ff=1408, N=512, B=4, in fp32 and in bf16 autocast (fp32 master weights; trl's
default, which its configs turn on unless told otherwise); vocab 32000 in both. Every implementation of a case is timed in
alternating rounds (trl's trainers in their own loop: one train() per round, a callback times
each step), so the ratios of a run are measured under the same machine load; quote those.

Columns besides the time: ``peak_MiB`` (fusedlm's Trainer and the transformers loop; not measured
inside trl's train()) = the bytes of the model, its gradients and the AdamW state when a step
starts plus the peak of torch's live allocations during one step (torch.profiler memory events,
as bench_peft). ``GFLOP/s`` = the case's FLOP floor / step time and ``x_floor`` = step time / the
floor's time, the floor being a full fine-tuning step's 6·P·T FLOPs (forward 2·P·T, input and
weight gradients 4·P·T), plus the frozen reference's forward 2·P·T for DPO (8·P·T), with
T = batch · seq tokens (every token through the whole model and the head, though the loss covers the
responses only: fusedlm's fused head + loss skips the prompt rows, so it can come below this floor's
head share) and P = the weights of every GEMM: n_layers · (4·d² + 3·d·d_ff) + d·V (the LM head;
embeddings, attention scores, norms and AdamW not counted). The floor's time is those FLOPs at the
same-run GEMM peak (bench_peft.gemm_peak: a 2048³ torch matmul, fp32 or bf16 as the case, the
fastest call, before and after the cases, the faster of the two).
"""
from __future__ import annotations

import copy
import os
import statistics
import tempfile
import time

import torch

from ._harness import Row

SUITE = "training"
V = 32000


def _shape(full: bool) -> dict:
    if full:
        return dict(n_layers=8, d_model=512, n_heads=8, d_ff=1408, seq=512, batch=4)
    return dict(n_layers=2, d_model=256, n_heads=4, d_ff=704, seq=128, batch=4)


def _models(s: dict):
    from fusedlm.interop import hf
    from fusedlm.models import DecoderLM, get_config

    torch.manual_seed(0)
    cfg = get_config("llama-7b", d_model=s["d_model"], n_layers=s["n_layers"], n_heads=s["n_heads"], n_kv_heads=s["n_heads"],
                     d_ff=s["d_ff"], vocab_size=V, max_seq_len=4096, eos_token_id=2, pad_token_id=0)
    ours = DecoderLM(cfg)
    try:
        import transformers
    except ImportError:
        return ours, None
    with tempfile.TemporaryDirectory() as path:
        hf.save_pretrained(ours, path)
        peer = transformers.LlamaForCausalLM.from_pretrained(path, attn_implementation="sdpa", dtype=torch.float32)
    return ours, peer


def _data(s: dict, n_examples: int):
    """Token ids of SFT examples and preference pairs: prompt N/2, responses N/2 (EOS last)."""
    g = torch.Generator().manual_seed(0)
    half = s["seq"] // 2
    ids = lambda n: torch.randint(3, V, (n,), generator=g).tolist()  # noqa: E731
    sft = [(ids(half), ids(half - 1)) for _ in range(n_examples)]
    pairs = [(ids(half), ids(half - 1), ids(half - 1)) for _ in range(n_examples)]
    return sft, pairs


def _stepper(step):
    """A one-step function as a round function: n -> the n step times (s)."""
    def run(n: int) -> list[float]:
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        return times

    run.warm_up = step
    return run


def _with_memory(run, step, model, optimizer):
    """The round function `run` with .peak_mib(): the peak memory of one more step (see the module docstring)."""
    from .bench_peft import _peak_mib

    run.peak_mib = lambda: _peak_mib(step, model, optimizer)
    return run


def floor_flops(s: dict, kind: str) -> tuple[float, int]:
    """(FLOPs, P) of one step's floor: 6·P·T (SFT) or 8·P·T (DPO: + the reference's forward), see the module docstring."""
    d, f = s["d_model"], s["d_ff"]
    p = s["n_layers"] * (4 * d * d + 3 * d * f) + d * V
    return (6 if kind == "sft" else 8) * p * s["batch"] * s["seq"], p


def _rows(case: str, kind: str, times: dict, fns: dict, s: dict, peak: dict, bf16: bool) -> list[Row]:
    """One case's rows: each implementation's time with tok/s, GFLOP/s, x_floor and (where
    measured) peak memory, then the FLOP floor at the same-run GEMM peak."""
    flops, p = floor_flops(s, kind)
    rate = peak["bf16" if bf16 else "fp32"].extra["GFLOP/s"]
    floor_ms = flops / rate / 1e6
    rows = []
    for name, ms in times.items():
        extra = {"tok_per_s": s["batch"] * s["seq"] / ms * 1e3, "GFLOP/s": flops / ms / 1e6, "x_floor": ms / floor_ms}
        if hasattr(fns[name], "peak_mib"):
            extra["peak_MiB"] = fns[name].peak_mib()
        rows.append(Row(SUITE, case, name, ms, extra))
    rows.append(Row(SUITE, case, f"FLOP floor {6 if kind == 'sft' else 8}·P·T at the {'bf16' if bf16 else 'fp32'} GEMM peak",
                    floor_ms, {"P": p, "GFLOP": flops / 1e9, "GEMM GFLOP/s": rate}, floor=True))
    return rows


def _alternating(fns: dict, rounds: int, per_round: int) -> dict[str, float]:
    """Median step time (ms) of each round function (n -> n step times), timed in alternating
    rounds after one warm-up step each, so every implementation sees the same machine load."""
    for fn in fns.values():
        fn.warm_up()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name] += fn(per_round)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


# ---------------------------------------------------------------------------------------------
def _fusedlm_sft(model, sft, s, bf16):
    from fusedlm.training import Trainer, lm_loss
    from fusedlm.training.sft import sft_example

    data = [sft_example(p, r, eos_token_id=2) for p, r in sft]
    trainer = Trainer(model, lm_loss, data, batch_size=s["batch"], max_steps=10**9, lr=1e-5, schedule="constant",
                      max_grad_norm=1.0, bf16=bf16, progress=False)
    return _with_memory(_stepper(trainer.train_step), trainer.train_step, trainer.model, trainer.optimizer)


def _hf_sft(peer, sft, s, bf16):
    from fusedlm.training import pad_collate
    from fusedlm.training.sft import sft_example

    batch = pad_collate([sft_example(p, r, eos_token_id=2) for p, r in sft[: s["batch"]]])
    opt = torch.optim.AdamW(peer.parameters(), lr=1e-5, fused=True)  # the Trainer's and transformers' default

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = peer(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(peer.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return _with_memory(_stepper(step), step, peer, opt)


def _fusedlm_dpo(model, pairs, s, bf16):
    from fusedlm.training import Trainer
    from fusedlm.training.dpo import DPO, frozen_copy
    from fusedlm.training.preference import preference_example

    data = [preference_example(p, c, r, eos_token_id=2) for p, c, r in pairs]
    trainer = Trainer(model, DPO(frozen_copy(model)), data, batch_size=s["batch"] // 2, max_steps=10**9, lr=1e-5,
                      schedule="constant", max_grad_norm=1.0, bf16=bf16, progress=False)
    return _with_memory(_stepper(trainer.train_step), trainer.train_step, trainer.model, trainer.optimizer)


SPECIAL = {0: "<pad>", 1: "<unk>", 2: "<eos>"}  # never substrings of a word (special tokens match anywhere)


def _tokenizer():
    """A word-level tokenizer "t3" .. "t31999" -> 3 .. 31999 plus <pad> 0, <unk> 1, <eos> 2, built in memory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel(vocab={SPECIAL.get(i, f"t{i}"): i for i in range(V)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


def _text(ids) -> str:
    return " ".join(f"t{i}" for i in ids)


def _trl(kind: str, peer, examples, s, bf16: bool, out: str):
    """A round function running trl's SFTTrainer / DPOTrainer on the same model: each round is one
    ``trainer.train()`` of n + 1 steps in trl's own loop (a callback times each step; the first
    step of a round is dropped). Returns it, or why trl could not run (a str)."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    try:
        import trl
        from datasets import Dataset
        from transformers import TrainerCallback
    except ImportError as e:
        return f"not installed ({e.name})"

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self.start)

    timer = Timer()
    common = dict(output_dir=out, report_to=[], save_strategy="no", logging_steps=10**6, use_cpu=True, disable_tqdm=True,
                  dataloader_num_workers=0, learning_rate=1e-5, lr_scheduler_type="constant", max_grad_norm=1.0,
                  max_steps=2, max_length=s["seq"], bf16=bf16)
    # completions start with a space: the word-level tokenizer then splits prompt + completion as each alone
    if kind == "sft":
        ds = Dataset.from_list([{"prompt": _text(p), "completion": " " + _text(r)} for p, r in examples])
        trainer = trl.SFTTrainer(model=peer, processing_class=_tokenizer(), train_dataset=ds, callbacks=[timer],
                                 args=trl.SFTConfig(**common, per_device_train_batch_size=s["batch"]))
    else:
        ds = Dataset.from_list([{"prompt": _text(p), "chosen": " " + _text(c), "rejected": " " + _text(r)}
                                for p, c, r in examples])
        trainer = trl.DPOTrainer(model=peer, ref_model=copy.deepcopy(peer).eval(), processing_class=_tokenizer(),
                                 train_dataset=ds, callbacks=[timer],
                                 args=trl.DPOConfig(**common, per_device_train_batch_size=s["batch"] // 2))

    def run(n: int) -> list[float]:
        timer.times = []
        trainer.args.max_steps = n + 1
        trainer.train()
        return timer.times[1:]  # the first step of each train() warms up

    run.warm_up = lambda: run(0)
    return run


def _round_fns(fns: dict, kind: str, peer, examples, s, bf16: bool, out: str) -> dict:
    if peer is not None:
        fn = _trl(kind, copy.deepcopy(peer), examples, s, bf16, out)
        name = "trl SFTTrainer" if kind == "sft" else "trl DPOTrainer"
        if isinstance(fn, str):
            print(f"{name} skipped: {fn}")
        else:
            fns[name] = fn
    return fns


def run(full: bool = False) -> list[Row]:
    from .bench_peft import _refloor, gemm_peak

    s = _shape(full)
    ours, peer = _models(s)
    if peer is None:
        print("transformers not installed: peers skipped")
    sft, pairs = _data(s, 64)
    rounds, per_round = (3, 2) if full else (2, 2)
    peak = gemm_peak(suite=SUITE, bf16=full)  # the bf16 cases run in --full only
    cases = []
    for bf16 in (False, True) if full else (False,):
        tag = f"llama {s['n_layers']}L d{s['d_model']} N={s['seq']} B={s['batch']} {'bf16 autocast' if bf16 else 'fp32'}"
        with tempfile.TemporaryDirectory() as out:
            case = f"SFT step, loss on the response half, {tag}"
            fns = {"fusedlm Trainer": _fusedlm_sft(copy.deepcopy(ours), sft, s, bf16)}
            if peer is not None:
                fns["transformers + AdamW loop"] = _hf_sft(copy.deepcopy(peer), sft, s, bf16)
            fns = _round_fns(fns, "sft", peer, sft, s, bf16, out)
            cases.append(_rows(case, "sft", _alternating(fns, rounds, per_round), fns, s, peak, bf16))
            case = f"DPO step, {s['batch'] // 2} pairs, frozen-copy reference, {tag}"
            fns = _round_fns({"fusedlm Trainer + DPO": _fusedlm_dpo(copy.deepcopy(ours), pairs, s, bf16)}, "dpo", peer, pairs, s,
                             bf16, out)
            cases.append(_rows(case, "dpo", _alternating(fns, rounds, per_round), fns, s, peak, bf16))
    again = gemm_peak(suite=SUITE, bf16=full)
    if any(again[k].ms < peak[k].ms for k in peak):  # a faster peak: every floor at it
        peak = {k: min(peak[k], again[k], key=lambda r: r.ms) for k in peak}
        cases = [_refloor(rows, peak) for rows in cases]
    return list(peak.values()) + [r for rows in cases for r in rows]
