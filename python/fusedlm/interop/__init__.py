"""Files in and out: Hugging Face checkpoints (:mod:`.hf`, by the tables of
``fusedlm.models.families``; also bitsandbytes 4-bit state dicts) and peft adapter directories
(:mod:`.peft`). ``fusedlm.integrations``, beside it, patches those libraries' live models instead."""
