"""``python -m fusedlm.training``: causal-LM training and (tensor-parallel) generation from the
command line, in one process or under torchrun (the commands are in the package docstring).

Data: --data FILE, a 1-D array of token ids (.npy or a torch .pt tensor) cut into rows of --seq
tokens; without it, a synthetic task (rows counting up by a random step) to try the machinery.
"""
from __future__ import annotations

import argparse
import sys

import torch

from . import Trainer, distributed, lm_loss


def _model(args):
    from ..models import build, get_config

    if args.hf:
        from ..interop import hf

        return hf.from_pretrained(args.hf)
    torch.manual_seed(args.seed)
    return build(get_config(args.preset))


def _rows(args, vocab_size: int) -> list[dict]:
    if args.data:
        tokens = torch.from_numpy(__import__("numpy").load(args.data)) if args.data.endswith(".npy") else torch.load(args.data)
        tokens = tokens.long().flatten()
        n = tokens.numel() // args.seq
        if n == 0:
            raise SystemExit(f"{args.data} holds {tokens.numel()} tokens, fewer than one row of --seq {args.seq}")
        rows = tokens[: n * args.seq].view(n, args.seq)
    else:
        g = torch.Generator().manual_seed(args.seed)
        start, step = torch.randint(0, vocab_size, (4096, 1), generator=g), torch.randint(1, 4, (4096, 1), generator=g)
        rows = (start + step * torch.arange(args.seq)) % vocab_size
    return [{"input_ids": r, "labels": r} for r in rows]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fusedlm.training", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("clm", "generate"))
    parser.add_argument("--preset", default="llama-tiny", help="a fusedlm.models preset (default: %(default)s)")
    parser.add_argument("--hf", help="a Hugging Face checkpoint folder instead of a preset")
    parser.add_argument("--weights", help="model.safetensors of a training checkpoint to start from")
    parser.add_argument("--data", help="token ids (.npy / .pt, 1-D)")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--strategy", default="auto", choices=("auto", *distributed.STRATEGIES))
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8, help="per rank")
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--out", help="checkpoints and metrics.jsonl")
    parser.add_argument("--save-every", type=int, default=0)
    parser.add_argument("--resume", help="a checkpoint folder to resume from")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tp", action="store_true", help="generate: shard the model over the ranks (tensor parallel)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args(argv)

    rank, world = distributed.init()
    if args.command == "generate" and args.tp and args.weights and not args.hf:
        from ..models import get_config

        model = distributed.load_tensor_parallel(get_config(args.preset), args.weights)  # each rank reads its shards
    else:
        model = _model(args)
    if args.weights and not (args.command == "generate" and args.tp and not args.hf):
        from safetensors.torch import load_file

        model.load_state_dict(load_file(args.weights), strict=False)
    if args.command == "clm":
        trainer = Trainer(model, lm_loss, _rows(args, model.config.vocab_size), strategy=args.strategy, max_steps=args.steps,
                          batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
                          warmup_steps=min(args.warmup, args.steps), bf16=args.bf16, out_dir=args.out,
                          save_every=args.save_every, seed=args.seed)
        hist = trainer.fit(resume_from=args.resume)
        if rank == 0:
            print(f"step {hist[-1]['step']}: loss {hist[-1]['loss']:.4f} ({world} rank(s), {trainer.strategy})")
    else:
        from ..generation import generate

        model.eval()
        if args.tp and not args.weights:
            distributed.tensor_parallel(model)
        prompt = torch.tensor([r["input_ids"][: args.seq // 2].tolist() for r in _rows(args, model.config.vocab_size)[:2]])
        ids = generate(model, prompt, max_new_tokens=args.max_new_tokens)
        if rank == 0:
            for row in ids.tolist():
                print(" ".join(map(str, row)))
    if world > 1:
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
