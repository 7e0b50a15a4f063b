"""fusedlm's kernels inside Hugging Face transformers, peft and bitsandbytes models."""
