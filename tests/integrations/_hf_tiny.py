"""Tiny random transformers models built from configs (no hub), with every dropout at zero."""
import torch
import transformers as tf

V = 97
_DEC = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
_ENC = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=42, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)

CONFIGS = {
    "llama": lambda: tf.LlamaConfig(**_DEC, num_key_value_heads=2),  # GQA 4 -> 2
    # bitsandbytes' CPU 4-bit kernel needs in_features >= its blocksize (64)
    "llama-64": lambda: tf.LlamaConfig(**{**_DEC, "hidden_size": 64, "intermediate_size": 128}, num_key_value_heads=2),
    "qwen2": lambda: tf.Qwen2Config(**_DEC, num_key_value_heads=1),  # MQA, q/k/v biases
    # layer 0 full attention, layer 1 a sliding window of 4 (prompts are longer)
    "qwen2-sliding": lambda: tf.Qwen2Config(**_DEC, num_key_value_heads=2, use_sliding_window=True, sliding_window=4,
                                            max_window_layers=1),
    "mistral": lambda: tf.MistralConfig(**_DEC, num_key_value_heads=2, sliding_window=64),  # window hides nothing
    "mistral-sliding": lambda: tf.MistralConfig(**_DEC, num_key_value_heads=2, sliding_window=4),
    "gpt2": lambda: tf.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64, attn_pdrop=0.0,
                                  resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=1, eos_token_id=2, pad_token_id=0),
    "bert": lambda: tf.BertConfig(**_ENC),
    "roberta": lambda: tf.RobertaConfig(**_ENC, pad_token_id=1),
}
CAUSAL_LM = {"llama": tf.LlamaForCausalLM, "qwen2": tf.Qwen2ForCausalLM, "qwen2-sliding": tf.Qwen2ForCausalLM,
             "mistral": tf.MistralForCausalLM, "mistral-sliding": tf.MistralForCausalLM, "gpt2": tf.GPT2LMHeadModel}
MASKED_LM = {"bert": tf.BertForMaskedLM, "roberta": tf.RobertaForMaskedLM}
CLASSES = {**CAUSAL_LM, **MASKED_LM, "llama-64": tf.LlamaForCausalLM}


def make(name: str, seed: int = 0, attn_implementation: str = "sdpa"):
    """The tiny model `name` in eval mode, with non-trivial norms and biases."""
    torch.manual_seed(seed)
    config = CONFIGS[name]()
    config._attn_implementation = attn_implementation
    model = CLASSES[name](config).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname.lower() or pname.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def batch(seed: int = 1, b: int = 3, n: int = 9, left: bool = True):
    """input_ids [b, n] and an attention mask with b - 1 padded rows (left or right padding)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (b, n), generator=g)
    mask = torch.ones(b, n, dtype=torch.long)
    for row, pad in zip(range(1, b), (3, 5, 1, 2)):
        if left:
            mask[row, :pad] = 0
        else:
            mask[row, n - pad:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return ids, mask
