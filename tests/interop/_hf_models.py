"""Tiny random transformers models of every supported type, saved to a directory."""
import torch
import transformers as tf

TINY = {
    "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=40, bos_token_id=96, eos_token_id=96)),
    "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                        num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64,
                                                        bos_token_id=1, eos_token_id=2, pad_token_id=0)),
    "qwen2": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                        num_key_value_heads=1, intermediate_size=48, max_position_embeddings=64,
                                                        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)),
    "bert": lambda: tf.BertForMaskedLM(tf.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                     intermediate_size=48, max_position_embeddings=40)),
    "roberta": lambda: tf.RobertaForMaskedLM(tf.RobertaConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                              intermediate_size=48, max_position_embeddings=42)),
    "t5": lambda: tf.T5ForConditionalGeneration(tf.T5Config(vocab_size=97, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2,
                                                            num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=20)),
    "bart": lambda: tf.BartForConditionalGeneration(tf.BartConfig(vocab_size=97, d_model=32, encoder_layers=2, decoder_layers=2,
                                                                  encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48,
                                                                  decoder_ffn_dim=48, max_position_embeddings=40, forced_eos_token_id=None)),
    "bert-cls": lambda: tf.BertForSequenceClassification(tf.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2,
                                                                       num_attention_heads=4, intermediate_size=48,
                                                                       max_position_embeddings=40, num_labels=3)),
    "roberta-cls": lambda: tf.RobertaForSequenceClassification(tf.RobertaConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2,
                                                                             num_attention_heads=4, intermediate_size=48,
                                                                             max_position_embeddings=42, num_labels=3)),
}


def make(model_type: str, path, seed: int = 0):
    """A tiny random transformers model, with non-trivial norms and biases, saved to path."""
    torch.manual_seed(seed)
    model = TINY[model_type]().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower() or name.endswith("bias") or "relative_attention_bias" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    return model
