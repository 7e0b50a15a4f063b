"""``python -m fusedlm.training``: causal-LM training and (tensor-parallel) generation from the
command line, in one process or under torchrun (the commands are in the package docstring).

Data: --data FILE, a 1-D array of token ids (.npy or a torch .pt tensor) cut into rows of --seq
tokens; without it, a synthetic task (rows counting up by a random step) to try the machinery.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from .. import _validate as check
from . import Trainer, checkpoint, distributed, lm_loss


def _arg(parse, check_value, kind: str):
    """An argparse type: `parse` the text, then check the value with fusedlm._validate."""
    def convert(text: str):
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind}, got {text!r}") from None
        try:
            return check_value(value)
        except (TypeError, ValueError) as e:
            raise argparse.ArgumentTypeError(str(e).removeprefix("value ")) from None
    return convert


def _int(low: int):
    return _arg(int, lambda v: check.integer("value", v, low=low), "an integer")


_lr = _arg(float, lambda v: check.number("value", v, low=0, low_open=True), "a number")


def _existing(kind: str):
    def parse(text: str) -> str:
        if kind == "folder" and not os.path.isdir(text):
            raise argparse.ArgumentTypeError(f"{text} is not a folder")
        if kind == "file" and not os.path.isfile(text):
            raise argparse.ArgumentTypeError(f"{text} is not a file")
        return text
    return parse


def _model(args):
    from ..models import build, get_config

    if args.hf:
        from ..interop import hf

        return hf.from_pretrained(args.hf)
    torch.manual_seed(args.seed)
    return build(get_config(args.preset))


def _tokens(path: str) -> torch.Tensor:
    """The 1-D token ids of a .npy or torch .pt file (ValueError naming the file otherwise)."""
    from .. import _io

    if path.endswith(".npy"):
        import numpy as np

        try:
            tokens = torch.from_numpy(np.load(path, allow_pickle=False))
        except (ValueError, OSError, EOFError) as e:
            raise ValueError(f"--data {path} is not a readable .npy array: {e}") from None
    else:
        tokens = _io.read_torch(path, "--data file")
    if not isinstance(tokens, torch.Tensor) or tokens.is_floating_point() or tokens.is_complex():
        raise ValueError(f"--data {path} must hold an integer tensor of token ids, got "
                         f"{tokens.dtype if isinstance(tokens, torch.Tensor) else type(tokens).__name__}")
    return tokens.long().flatten()


def _rows(args, vocab_size: int) -> list[dict]:
    if args.data:
        tokens = _tokens(args.data)
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size):
            raise ValueError(f"--data {args.data} holds ids in [{int(tokens.min())}, {int(tokens.max())}], outside the "
                             f"model's vocabulary [0, {vocab_size})")
        n = tokens.numel() // args.seq
        if n == 0:
            raise ValueError(f"--data {args.data} holds {tokens.numel()} tokens, fewer than one row of --seq {args.seq}")
        rows = tokens[: n * args.seq].view(n, args.seq)
    else:
        g = torch.Generator().manual_seed(args.seed)
        start, step = torch.randint(0, vocab_size, (4096, 1), generator=g), torch.randint(1, 4, (4096, 1), generator=g)
        rows = (start + step * torch.arange(args.seq)) % vocab_size
    return [{"input_ids": r, "labels": r} for r in rows]


def _parser() -> argparse.ArgumentParser:
    from ..models.config import PRESETS

    parser = argparse.ArgumentParser(prog="python -m fusedlm.training", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("clm", "generate"))
    parser.add_argument("--preset", default="llama-tiny", choices=sorted(PRESETS), metavar="PRESET",
                        help="a fusedlm.models preset (default: %(default)s)")
    parser.add_argument("--hf", type=_existing("folder"), help="a Hugging Face checkpoint folder instead of a preset")
    parser.add_argument("--weights", type=_existing("file"), help="model.safetensors of a training checkpoint to start from")
    parser.add_argument("--data", type=_existing("file"), help="token ids (.npy / .pt, 1-D)")
    parser.add_argument("--seq", type=_int(2), default=64, help="tokens per row (>= 2: a causal LM predicts the next one)")
    parser.add_argument("--strategy", default="auto", choices=("auto", *distributed.STRATEGIES))
    parser.add_argument("--steps", type=_int(1), default=100)
    parser.add_argument("--batch-size", type=_int(1), default=8, help="per rank")
    parser.add_argument("--grad-accum", type=_int(1), default=1)
    parser.add_argument("--lr", type=_lr, default=3e-4)
    parser.add_argument("--warmup", type=_int(0), default=10)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--out", help="checkpoints and metrics.jsonl")
    parser.add_argument("--save-every", type=_int(0), default=0)
    parser.add_argument("--resume", type=_existing("folder"), help="a checkpoint folder to resume from")
    parser.add_argument("--seed", type=_int(0), default=0)
    parser.add_argument("--tp", action="store_true", help="generate: shard the model over the ranks (tensor parallel)")
    parser.add_argument("--max-new-tokens", type=_int(1), default=32)
    return parser


def _check(parser: argparse.ArgumentParser, args) -> None:
    """What argparse cannot check alone, before any work starts."""
    from .. import _io

    torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if args.strategy in ("ddp", "fsdp") and not torchrun:
        parser.error(f"--strategy {args.strategy} needs several processes: start it with torchrun (see --help)")
    if args.tp and args.command != "generate":
        parser.error("--tp is for the generate command")
    if args.tp and not torchrun:
        parser.error("--tp needs several processes: start it with torchrun (see --help)")
    if args.command == "clm":
        if args.save_every and not args.out:
            parser.error("--save-every needs --out (the folder the checkpoints go to)")
        if args.out:
            try:
                _io.check_writable_folder(args.out, "--out")
            except ValueError as e:
                parser.error(str(e))
        if args.resume:
            from . import checkpoint

            if not _io.is_complete(args.resume):
                newest = checkpoint.latest(args.resume)
                parser.error(f"--resume {args.resume} is not a complete fusedlm training checkpoint"
                             + (f" (its newest complete checkpoint is {newest})" if newest else ""))
    elif args.resume or args.out or args.save_every:
        parser.error("--resume, --out and --save-every are for the clm command")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    _check(parser, args)

    rank, world = distributed.init()
    try:
        if args.command == "generate" and args.tp and args.weights and not args.hf:
            from ..models import get_config

            model = distributed.load_tensor_parallel(get_config(args.preset), args.weights)  # each rank reads its shards
        else:
            model = _model(args)
            if args.weights:
                checkpoint.load_weights(model, args.weights)  # every name and shape, or an error naming the file
        if args.seq > model.config.max_seq_len:
            raise ValueError(f"--seq {args.seq} is longer than the model's max_seq_len={model.config.max_seq_len}")
        rows = _rows(args, model.config.vocab_size)
    except (ValueError, FileNotFoundError, TypeError) as e:
        parser.error(str(e))
    if args.command == "clm":
        trainer = Trainer(model, lm_loss, rows, strategy=args.strategy, max_steps=args.steps,
                          batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
                          warmup_steps=min(args.warmup, args.steps), bf16=args.bf16, out_dir=args.out,
                          save_every=args.save_every, seed=args.seed)
        hist = trainer.fit(resume_from=args.resume)
        if rank == 0:
            last = hist[-1] if hist else {"step": trainer.step, "loss": None}
            loss = "nothing left to train" if not hist else ("skipped" if last["loss"] is None else f"{last['loss']:.4f}")
            print(f"step {last['step']}: loss {loss} ({world} rank(s), {trainer.strategy})")
    else:
        from ..generation import generate

        model.eval()
        if args.tp and not args.weights:
            distributed.tensor_parallel(model)
        prompt = torch.tensor([r["input_ids"][: args.seq // 2].tolist() for r in rows[:2]])
        try:
            ids = generate(model, prompt, max_new_tokens=args.max_new_tokens)
        except ValueError as e:
            parser.error(str(e))
        if rank == 0:
            for row in ids.tolist():
                print(" ".join(map(str, row)))
    if world > 1:
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
