"""How big the tour's world and models are, and how long each stage trains, per mode.

smoke: seconds per stage, for CI (the metrics still have to move); quick: the default, under ten
minutes on 2 cores; full: a larger world and longer training (tens of minutes).
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Sizes:
    # world and tokenizer
    n_seen: int
    n_unseen: int
    bios_per_person: int
    vocab_size: int
    # the models (decoder, encoder and encoder-decoder share these)
    d_model: int
    n_layers: int
    n_heads: int
    seq_len: int
    batch: int
    # steps per stage
    pretrain_steps: int  # CLM on the decoder
    encoder_steps: int  # MLM on the encoder, span corruption on the encoder-decoder
    sft_steps: int
    reward_steps: int
    dpo_steps: int
    ppo_steps: int  # rollout batches
    finetune_steps: int  # per fine-tuning method
    # evaluation
    n_eval: int  # questions per test split (decoding, hallucination, alignment)
    k_passages: int  # passages in a RAG prompt (retrieved, or the gold one among distractors when reading)
    bench: bool  # the inference section runs a short subset of `fusedlm bench`


MODES = {
    "smoke": Sizes(n_seen=24, n_unseen=12, bios_per_person=3, vocab_size=320, d_model=64, n_layers=2, n_heads=4,
                   seq_len=48, batch=16, pretrain_steps=120, encoder_steps=40, sft_steps=60, reward_steps=30,
                   dpo_steps=20, ppo_steps=4, finetune_steps=20, n_eval=24, k_passages=1, bench=False),
    "quick": Sizes(n_seen=80, n_unseen=40, bios_per_person=6, vocab_size=640, d_model=128, n_layers=4, n_heads=4,
                   seq_len=64, batch=32, pretrain_steps=300, encoder_steps=100, sft_steps=300, reward_steps=60,
                   dpo_steps=40, ppo_steps=8, finetune_steps=60, n_eval=60, k_passages=1, bench=True),
    "full": Sizes(n_seen=200, n_unseen=100, bios_per_person=8, vocab_size=1024, d_model=256, n_layers=6, n_heads=8,
                  seq_len=64, batch=32, pretrain_steps=1500, encoder_steps=600, sft_steps=600, reward_steps=200,
                  dpo_steps=150, ppo_steps=30, finetune_steps=200, n_eval=200, k_passages=2, bench=True),
}
