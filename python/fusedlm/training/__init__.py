"""fusedlm.training: every training stage of a model's life on one Trainer, and its scale-out on
torch.distributed.

    from fusedlm.training import Trainer, lm_loss, objectives, sft, reward, dpo, ppo, losses

Stages (a stage is a loss function ``(model, batch) -> loss | (loss, metrics)``; data are
sequences of examples batched by ``pad_collate`` or a collate of your own):

- pretraining: ``objectives`` (clm, prefix_lm, mlm, span_corruption, text_infilling,
  sentence_permutation, bart_denoising) in the collate, ``lm_loss`` as the stage;
- SFT: ``sft.sft_example`` / ``sft.chat_example`` (loss on the response / assistant turns),
  ``sft.pack``; ``lm_loss``;
- reward model: ``reward.RewardModel(decoder)``, ``reward.reward_step`` on
  ``preference.preference_example`` pairs;
- DPO: ``dpo.DPO(reference, beta=0.1, loss_type="sigmoid"|"ipo"|"hinge"|"robust")`` with
  ``dpo.frozen_copy(model)``, ``dpo.precomputed()`` (+ ``dpo.precompute_reference``) or
  ``dpo.adapters_disabled()`` (PEFT);
- PPO: ``ppo.PolicyAndValue``, ``ppo.PPORollouts`` (the data: rollouts sampled with
  fusedlm.generation), ``ppo.PPOLoss``;
- the formulas alone: ``losses`` (dpo_loss, reward_loss, gae, masked_whiten, kl_penalty,
  ppo_policy_loss, ppo_value_loss), trl's.

Full fine-tuning trains every parameter; after ``fusedlm.peft.apply_lora(model, ...)`` (or any
PEFT method) the same Trainer trains only the adapters (AdamW gets the trainable parameters).

Scale-out. The Trainer picks up torch.distributed from torchrun's environment (gloo on CPU, NCCL
on GPUs; ``distributed.init()``), wraps the model in DDP (``strategy="ddp"``, the default with
2+ ranks) or shards it with FSDP2 (``strategy="fsdp"``: ``fully_shard`` per block, then the
root), and gives every rank its slice of each global batch (batch_size per rank). Checkpoints:
rank 0 writes model.safetensors and optimizer.pt; FSDP writes a distributed checkpoint (dcp/,
every rank its shards) plus the gathered model.safetensors; a checkpoint folder is swapped in
whole with its completion marker, and ``checkpoint.latest(out_dir)`` finds the newest complete one. The exact commands (``-m
fusedlm.training`` is the small CLI in __main__.py; your own script works the same way):

    # DDP, 2 processes on one machine (CPU: gloo)
    torchrun --standalone --nproc_per_node 2 -m fusedlm.training clm --strategy ddp --steps 200 --out runs/ddp
    # FSDP2, then resume from its distributed checkpoint
    torchrun --standalone --nproc_per_node 2 -m fusedlm.training clm --strategy fsdp --steps 200 --save-every 100 --out runs/fsdp
    torchrun --standalone --nproc_per_node 2 -m fusedlm.training clm --strategy fsdp --steps 300 --out runs/fsdp \\
        --resume runs/fsdp/checkpoint-200
    # two machines, 8 processes each (run on both; MASTER = the first machine's address)
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint MASTER:29500 \\
        -m fusedlm.training clm --strategy fsdp --out runs/big
    # tensor-parallel generation over 2 processes (the same tokens as one process)
    torchrun --standalone --nproc_per_node 2 -m fusedlm.training generate --tp --weights runs/ddp/checkpoint-200/model.safetensors

Tensor parallelism (``distributed.tensor_parallel(model)``) shards q/k/v and gate/up column-wise,
o and down row-wise (one all-reduce after each: two per block) with
``torch.distributed.tensor.parallel``; generation then runs unchanged on every rank.
``distributed.load_tensor_parallel(config, "model.safetensors")`` builds the model on the meta
device, shards it and reads each rank's slices from the file (what ``generate --tp --weights``
does), so no rank ever holds the whole model.
"""
from . import checkpoint, data, distributed, dpo, losses, objectives, ppo, preference, reward, sft
from .data import Loader, pad_collate
from .lm import lm_loss
from .trainer import TrainConfig, Trainer, lr_factor

__all__ = ["losses", "objectives", "sft", "preference", "reward", "dpo", "ppo", "data", "checkpoint", "distributed",
           "Trainer", "TrainConfig", "lr_factor", "lm_loss", "Loader", "pad_collate"]
