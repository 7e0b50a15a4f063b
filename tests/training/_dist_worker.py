"""What test_distributed.py runs under torchrun (2 gloo processes):

    torchrun --standalone --nproc_per_node 2 tests/training/_dist_worker.py ddp,fsdp,tp OUT_DIR

ddp / fsdp: train the tiny CLM task with the Trainer (strategy ddp / fsdp); rank 0 writes the
final weights and the losses (fsdp: also resumes from its distributed checkpoint in a new
Trainer). tp: greedy and sampled generation before and after tensor_parallel(model); each rank
writes its tokens.
"""
import json
import os
import sys

import torch

sys.path[:0] = [os.path.dirname(__file__), os.path.dirname(os.path.dirname(__file__))]  # _tiny, tiny_models
import _tiny  # noqa: E402
from fusedlm.training import Trainer, distributed, lm_loss  # noqa: E402

TRAIN = dict(max_steps=6, batch_size=4, grad_accum=2, lr=3e-3, warmup_steps=1, progress=False, shuffle=True)


def main(modes: str, out: str) -> None:
    rank, world = distributed.init()
    torch.set_num_threads(1)
    for mode in modes.split(","):  # one torchrun for all: the processes start once
        run(mode, out, rank, world)
    torch.distributed.destroy_process_group()


def run(mode: str, out: str, rank: int, world: int) -> None:
    result = {"world": world, "rank": rank}
    if mode in ("ddp", "fsdp"):
        data = _tiny.clm_rows(64)
        trainer = Trainer(_tiny.model(), lm_loss, data, strategy=mode, out_dir=os.path.join(out, mode), save_every=3, **TRAIN)
        hist = trainer.fit()
        result["losses"] = [r["loss"] for r in hist]
        result["strategy"] = trainer.strategy
        if mode == "fsdp":
            from torch.distributed.tensor import DTensor

            result["sharded"] = all(isinstance(p, DTensor) for p in trainer.model.parameters())
            local = sum(p.to_local().numel() for p in trainer.model.parameters())
            result["local_fraction"] = local / sum(p.numel() for p in trainer.model.parameters())
            again = Trainer(_tiny.model(seed=7), lm_loss, data, strategy="fsdp", **TRAIN)
            result["resumed_losses"] = [r["loss"] for r in again.fit(resume_from=os.path.join(out, mode, "checkpoint-3"))]
    elif mode == "tp":
        for preset in ("llama-tiny", "gpt2-tiny"):
            model = _tiny.model(preset).eval()
            ids = torch.randint(4, _tiny.V, (3, 7), generator=torch.Generator().manual_seed(1))
            mask = torch.ones_like(ids, dtype=torch.bool)
            mask[0, :2] = False  # a left-padded row
            from fusedlm import generation

            def run():
                with torch.no_grad():
                    greedy = generation.generate(model, ids, attention_mask=mask, max_new_tokens=12)
                    sampled = generation.generate(model, ids, attention_mask=mask, max_new_tokens=12, do_sample=True,
                                                  top_k=20, generator=torch.Generator().manual_seed(3))
                    logits = model(ids, attention_mask=mask).logits
                return greedy, sampled, logits

            single = run()
            weights = os.path.join(out, f"{preset}.safetensors")
            if rank == 0:
                from safetensors.torch import save_file

                save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights)
            torch.distributed.barrier()
            distributed.tensor_parallel(model)
            tp = run()
            model = distributed.load_tensor_parallel(model.config, weights)  # sharded from the file, never whole
            loaded = run()
            result[preset] = {"greedy_equal": torch.equal(single[0], tp[0]), "sampled_equal": torch.equal(single[1], tp[1]),
                              "loaded_equal": torch.equal(single[0], loaded[0]) and torch.equal(single[1], loaded[1]),
                              "max_logit_diff": (single[2] - tp[2]).abs().max().item(), "tokens": tp[0].tolist(),
                              "q_proj_local_rows": model.decoder.blocks[0].attn.q_proj.weight.to_local().shape[0]}
    with open(os.path.join(out, f"{mode}-rank{rank}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    # Leave without running C++ static destructors: with torch 2.13 + gloo a worker sometimes aborts
    # after main() has returned ("terminate called without an active exception", no Python frame;
    # ~1 run in 12 on 2 cores), when every result file is already written and the process group
    # destroyed. That teardown is torch's, not what these tests check.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
