"""Hugging Face checkpoints in and out.

    from fusedlm.interop import hf
    model = hf.from_pretrained("path/to/checkpoint")   # config.json + model.safetensors | pytorch_model.bin
    hf.save_pretrained(model, "out/")                    # transformers' from_pretrained loads it back

Supported model types: gpt2, llama, qwen2, bert, roberta, t5, bart. Nothing is downloaded: the path
is a local directory. Each model type has two small functions: its config.json -> ModelConfig
(and back), and the table of fusedlm parameter <- Hugging Face tensor names. fusedlm's projections
are separate (q_proj, k_proj, v_proj, o_proj; gate_proj, up_proj, down_proj), so loading is a copy,
except GPT-2, whose c_attn stacks q, k and v (split at load, stacked again at save) and whose
Conv1D weights are stored transposed.
"""
from __future__ import annotations

import json
import math
import os
import re

import torch

from ..models import ModelConfig, build

SUPPORTED = ("gpt2", "llama", "qwen2", "bert", "roberta", "t5", "bart")

# Checkpoint tensors that are not parameters or that duplicate a tied one: ignored when loading.
_IGNORED = re.compile(r"(position_ids|attn\.bias|attn\.masked_bias|rotary_emb\.inv_freq|embed_tokens\.weight|"
                      r"lm_head\.weight|cls\.predictions\.decoder\.(weight|bias)|lm_head\.decoder\.(weight|bias))$")


# ---------------------------------------------------------------------------------------------
# config.json <-> ModelConfig
# ---------------------------------------------------------------------------------------------
def _rope_theta(c: dict) -> float:
    params = c.get("rope_parameters") or c.get("rope_scaling") or {}
    if params.get("rope_type", "default") != "default":
        raise ValueError(f"rope scaling {params.get('rope_type')!r} is not supported (only the default RoPE)")
    return float(params.get("rope_theta", c.get("rope_theta", 10000.0)))


def _encoder_head(arch: str, c: dict) -> dict:
    if arch.endswith("ForMaskedLM"):
        return dict(head="lm", pooler=False)
    if arch.endswith("ForSequenceClassification"):
        n_labels = len(c["id2label"]) if c.get("id2label") else c.get("num_labels", 2)
        return dict(head="classifier", pooler=True, n_labels=n_labels)
    if arch.endswith("Model"):
        return dict(head="none", pooler=True)
    raise ValueError(f"unsupported architecture {arch!r}; supported: *ForMaskedLM, *ForSequenceClassification, *Model")


# The config.json keys (with transformers' defaults) of ModelConfig's dropout, attn_dropout and
# mlp_dropout for each model type; None where the model has no such dropout.
_DROPOUT_KEYS = {
    "gpt2": (("resid_pdrop", 0.1), ("attn_pdrop", 0.1), None),
    "llama": (None, ("attention_dropout", 0.0), None),
    "qwen2": (None, ("attention_dropout", 0.0), None),
    "bert": (("hidden_dropout_prob", 0.1), ("attention_probs_dropout_prob", 0.1), None),
    "roberta": (("hidden_dropout_prob", 0.1), ("attention_probs_dropout_prob", 0.1), None),
    "t5": (("dropout_rate", 0.1), ("dropout_rate", 0.1), ("dropout_rate", 0.1)),
    "bart": (("dropout", 0.1), ("attention_dropout", 0.0), ("activation_dropout", 0.0)),
}
_DROPOUT_FIELDS = ("dropout", "attn_dropout", "mlp_dropout")


def _dropout_from_hf(c: dict, model_type: str) -> dict:
    return {field: float(c.get(key[0], key[1])) for field, key in zip(_DROPOUT_FIELDS, _DROPOUT_KEYS[model_type]) if key}


def _dropout_to_hf(cfg: ModelConfig, model_type: str) -> dict:
    return {key[0]: getattr(cfg, field) for field, key in zip(_DROPOUT_FIELDS, _DROPOUT_KEYS[model_type]) if key}


def config_from_hf(c: dict) -> ModelConfig:
    """A ModelConfig from the dict of a Hugging Face config.json."""
    model_type = c.get("model_type")
    if model_type not in SUPPORTED:
        raise ValueError(f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED)}")
    arch = (c.get("architectures") or [""])[0]
    special = dict(pad_token_id=c.get("pad_token_id"), bos_token_id=c.get("bos_token_id"), eos_token_id=c.get("eos_token_id"),
                   **_dropout_from_hf(c, model_type))
    if model_type == "gpt2":
        act = c.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu"):
            raise ValueError(f"gpt2 activation {act!r} is not supported")
        return ModelConfig(
            arch="decoder", vocab_size=c["vocab_size"], d_model=c["n_embd"], n_layers=c["n_layer"], n_heads=c["n_head"],
            d_ff=c.get("n_inner") or 4 * c["n_embd"], max_seq_len=c["n_positions"], norm="layernorm",
            norm_eps=c.get("layer_norm_epsilon", 1e-5), mlp="gelu" if act == "gelu" else "gelu_tanh", qkv_bias=True,
            out_bias=True, mlp_bias=True, positions="learned", pad_aware_positions=True,
            tie_embeddings=c.get("tie_word_embeddings", True), **special)
    if model_type in ("llama", "qwen2"):
        if c.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{model_type} activation {c.get('hidden_act')!r} is not supported (only silu)")
        if model_type == "qwen2" and c.get("use_sliding_window"):
            raise ValueError("qwen2 with use_sliding_window=True is not supported")
        qwen = model_type == "qwen2"
        return ModelConfig(
            arch="decoder", vocab_size=c["vocab_size"], d_model=c["hidden_size"], n_layers=c["num_hidden_layers"],
            n_heads=c["num_attention_heads"], n_kv_heads=c.get("num_key_value_heads") or c["num_attention_heads"],
            head_dim=c.get("head_dim"), d_ff=c["intermediate_size"], max_seq_len=c["max_position_embeddings"],
            norm="rmsnorm", norm_eps=c.get("rms_norm_eps", 1e-6), mlp="swiglu", positions="rope", rope_base=_rope_theta(c),
            pad_aware_positions=True, qkv_bias=qwen or c.get("attention_bias", False),
            out_bias=(not qwen) and c.get("attention_bias", False), mlp_bias=c.get("mlp_bias", False),
            tie_embeddings=c.get("tie_word_embeddings", qwen), **special)
    if model_type in ("bert", "roberta"):
        if c.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"{model_type} position_embedding_type {c['position_embedding_type']!r} is not supported")
        if c.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"{model_type} activation {c.get('hidden_act')!r} is not supported (only gelu)")
        offset = (c.get("pad_token_id", 1) + 1) if model_type == "roberta" else 0
        return ModelConfig(
            arch="encoder", vocab_size=c["vocab_size"], d_model=c["hidden_size"], n_layers=c["num_hidden_layers"],
            n_heads=c["num_attention_heads"], d_ff=c["intermediate_size"],
            max_seq_len=c["max_position_embeddings"] - offset, position_offset=offset, pad_aware_positions=offset > 0,
            type_vocab_size=c.get("type_vocab_size", 2), norm="layernorm", norm_eps=c.get("layer_norm_eps", 1e-12),
            pre_norm=False, embed_norm=True, final_norm=False, mlp="gelu", qkv_bias=True, out_bias=True, mlp_bias=True,
            positions="learned", tie_embeddings=c.get("tie_word_embeddings", True), mask="bidirectional",
            **_encoder_head(arch, c), **special)
    if model_type == "t5":
        if c.get("feed_forward_proj", "relu") != "relu":
            raise ValueError(f"t5 feed_forward_proj {c['feed_forward_proj']!r} is not supported (only relu)")
        tied = c.get("tie_word_embeddings", True)
        return ModelConfig(
            arch="encoder-decoder", vocab_size=c["vocab_size"], d_model=c["d_model"], n_layers=c["num_layers"],
            n_decoder_layers=c.get("num_decoder_layers") or c["num_layers"], n_heads=c["num_heads"], head_dim=c["d_kv"],
            d_ff=c["d_ff"], max_seq_len=c.get("n_positions", 512), norm="rmsnorm", norm_eps=c.get("layer_norm_epsilon", 1e-6),
            mlp="relu", attn_scale=1.0, positions="t5", rel_buckets=c.get("relative_attention_num_buckets", 32),
            rel_max_distance=c.get("relative_attention_max_distance", 128), tie_embeddings=tied, rescale_tied_head=tied,
            decoder_start_token_id=c.get("decoder_start_token_id", 0), **special)
    # bart
    act = c.get("activation_function", "gelu")
    if act not in ("gelu", "relu"):
        raise ValueError(f"bart activation {act!r} is not supported")
    if c.get("normalize_before") or c.get("add_final_layer_norm"):
        raise ValueError("bart with normalize_before / add_final_layer_norm (mBART style) is not supported")
    if c.get("encoder_attention_heads") != c.get("decoder_attention_heads") or c.get("encoder_ffn_dim") != c.get("decoder_ffn_dim"):
        raise ValueError("bart with different encoder and decoder widths is not supported")
    return ModelConfig(
        arch="encoder-decoder", vocab_size=c["vocab_size"], d_model=c["d_model"], n_layers=c["encoder_layers"],
        n_decoder_layers=c["decoder_layers"], n_heads=c["encoder_attention_heads"], d_ff=c["encoder_ffn_dim"],
        max_seq_len=c["max_position_embeddings"], norm="layernorm", norm_eps=1e-5, pre_norm=False, embed_norm=True,
        final_norm=False, mlp=act, qkv_bias=True, out_bias=True, mlp_bias=True, positions="learned", position_offset=2,
        tie_embeddings=c.get("tie_word_embeddings", True), final_logits_bias=True,
        embed_scale=math.sqrt(c["d_model"]) if c.get("scale_embedding") else 1.0,
        decoder_start_token_id=c.get("decoder_start_token_id", 2), **special)


def guess_model_type(cfg: ModelConfig) -> str:
    """The Hugging Face model type a ModelConfig corresponds to (for save_pretrained)."""
    if cfg.positions in ("sinusoidal", "none"):
        raise ValueError(f"positions={cfg.positions!r} has no counterpart among the supported Hugging Face models ({', '.join(SUPPORTED)})")
    if cfg.arch == "encoder-decoder":
        return "t5" if cfg.positions == "t5" else "bart"
    if cfg.arch == "encoder":
        return "roberta" if cfg.position_offset else "bert"
    if cfg.positions == "learned":
        return "gpt2"
    return "qwen2" if cfg.qkv_bias and not cfg.out_bias else "llama"


def config_to_hf(cfg: ModelConfig, model_type: str) -> dict:
    """The config.json dict of the Hugging Face model matching cfg."""
    special = dict(pad_token_id=cfg.pad_token_id, bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
                   tie_word_embeddings=cfg.tie_embeddings, **_dropout_to_hf(cfg, model_type))
    if model_type == "gpt2":
        return dict(architectures=["GPT2LMHeadModel"], vocab_size=cfg.vocab_size, n_embd=cfg.d_model, n_layer=cfg.n_layers,
                    n_head=cfg.n_heads, n_inner=cfg.d_ff, n_positions=cfg.max_seq_len, layer_norm_epsilon=cfg.norm_eps,
                    activation_function="gelu_new" if cfg.mlp == "gelu_tanh" else "gelu", **special)
    if model_type in ("llama", "qwen2"):
        arch = "LlamaForCausalLM" if model_type == "llama" else "Qwen2ForCausalLM"
        out = dict(architectures=[arch], vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
                   num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
                   intermediate_size=cfg.d_ff, max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
                   rope_theta=cfg.rope_base, rope_parameters=dict(rope_type="default", rope_theta=cfg.rope_base),
                   hidden_act="silu", **special)
        if model_type == "llama":
            out.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
        return out
    if model_type in ("bert", "roberta"):
        prefix = "Bert" if model_type == "bert" else "Roberta"
        arch = {"lm": "ForMaskedLM", "classifier": "ForSequenceClassification", "none": "Model"}[cfg.head]
        out = dict(architectures=[prefix + arch], vocab_size=cfg.vocab_size, hidden_size=cfg.d_model,
                   num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, intermediate_size=cfg.d_ff,
                   max_position_embeddings=cfg.max_seq_len + cfg.position_offset, type_vocab_size=cfg.type_vocab_size,
                   layer_norm_eps=cfg.norm_eps, hidden_act="gelu", position_embedding_type="absolute", **special)
        if cfg.head == "classifier":
            out.update(id2label={str(i): f"LABEL_{i}" for i in range(cfg.n_labels)},
                       label2id={f"LABEL_{i}": i for i in range(cfg.n_labels)})
        return out
    if model_type == "t5":
        return dict(architectures=["T5ForConditionalGeneration"], vocab_size=cfg.vocab_size, d_model=cfg.d_model,
                    d_kv=cfg.head_dim, d_ff=cfg.d_ff, num_layers=cfg.n_layers, num_decoder_layers=cfg.n_decoder_layers,
                    num_heads=cfg.n_heads, relative_attention_num_buckets=cfg.rel_buckets,
                    relative_attention_max_distance=cfg.rel_max_distance, layer_norm_epsilon=cfg.norm_eps,
                    feed_forward_proj="relu", n_positions=cfg.max_seq_len, is_encoder_decoder=True,
                    decoder_start_token_id=cfg.decoder_start_token_id, **special)
    return dict(architectures=["BartForConditionalGeneration"], vocab_size=cfg.vocab_size, d_model=cfg.d_model,
                encoder_layers=cfg.n_layers, decoder_layers=cfg.n_decoder_layers, encoder_attention_heads=cfg.n_heads,
                decoder_attention_heads=cfg.n_heads, encoder_ffn_dim=cfg.d_ff, decoder_ffn_dim=cfg.d_ff,
                max_position_embeddings=cfg.max_seq_len, activation_function=cfg.mlp, scale_embedding=cfg.embed_scale != 1.0,
                is_encoder_decoder=True, decoder_start_token_id=cfg.decoder_start_token_id, forced_eos_token_id=None,
                **special)


# ---------------------------------------------------------------------------------------------
# Parameter name tables: (fusedlm name, Hugging Face name, how, part) with how in "" (copy),
# "T" (a transposed Conv1D weight) or "flat" (reshaped), and part None or (i, n): the i-th of n
# equal row blocks of the Hugging Face tensor (GPT-2's c_attn stacks q, k and v).
# ---------------------------------------------------------------------------------------------
def _wb(ours: str, theirs: str, how: str = "", bias: bool = True, part: tuple[int, int] | None = None) -> list[tuple]:
    """weight (and bias) entries of one linear layer or norm."""
    rows = [(f"{ours}.weight", f"{theirs}.weight", how, part)]
    if bias:
        rows.append((f"{ours}.bias", f"{theirs}.bias", "", part))
    return rows


def _attn(ours: str, q: str, k: str, v: str, o: str, bias: bool = True, out_bias: bool | None = None) -> list[tuple]:
    """The four projections of one attention block."""
    out_bias = bias if out_bias is None else out_bias
    return (_wb(f"{ours}.q_proj", q, bias=bias) + _wb(f"{ours}.k_proj", k, bias=bias) + _wb(f"{ours}.v_proj", v, bias=bias)
            + _wb(f"{ours}.o_proj", o, bias=out_bias))


def _table(cfg: ModelConfig, model_type: str) -> list[tuple]:
    rows: list[tuple] = []
    if model_type == "gpt2":
        rows += [("tok_embed.weight", "transformer.wte.weight", "", None), ("decoder.pos_embed.weight", "transformer.wpe.weight", "", None)]
        for i in range(cfg.n_layers):
            o, t = f"decoder.blocks.{i}", f"transformer.h.{i}"
            rows += _wb(f"{o}.attn_norm", f"{t}.ln_1")
            for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
                rows += _wb(f"{o}.attn.{name}", f"{t}.attn.c_attn", "T", part=(j, 3))
            rows += _wb(f"{o}.attn.o_proj", f"{t}.attn.c_proj", "T") + _wb(f"{o}.mlp_norm", f"{t}.ln_2")
            rows += _wb(f"{o}.mlp.up_proj", f"{t}.mlp.c_fc", "T") + _wb(f"{o}.mlp.down_proj", f"{t}.mlp.c_proj", "T")
        rows += _wb("decoder.final_norm", "transformer.ln_f")
    elif model_type in ("llama", "qwen2"):
        rows += [("tok_embed.weight", "model.embed_tokens.weight", "", None)]
        for i in range(cfg.n_layers):
            o, t = f"decoder.blocks.{i}", f"model.layers.{i}"
            a = f"{t}.self_attn"
            rows += _wb(f"{o}.attn_norm", f"{t}.input_layernorm", bias=False)
            rows += _attn(f"{o}.attn", f"{a}.q_proj", f"{a}.k_proj", f"{a}.v_proj", f"{a}.o_proj", cfg.qkv_bias, cfg.out_bias)
            rows += _wb(f"{o}.mlp_norm", f"{t}.post_attention_layernorm", bias=False)
            for name in ("gate_proj", "up_proj", "down_proj"):
                rows += _wb(f"{o}.mlp.{name}", f"{t}.mlp.{name}", bias=cfg.mlp_bias)
        rows += _wb("decoder.final_norm", "model.norm", bias=False)
        if not cfg.tie_embeddings:
            rows += [("lm_head.weight", "lm_head.weight", "", None)]
    elif model_type in ("bert", "roberta"):
        p = f"{model_type}."
        rows += [("tok_embed.weight", p + "embeddings.word_embeddings.weight", "", None),
                 ("encoder.pos_embed.weight", p + "embeddings.position_embeddings.weight", "", None),
                 ("encoder.type_embed.weight", p + "embeddings.token_type_embeddings.weight", "", None)]
        rows += _wb("encoder.embed_norm", p + "embeddings.LayerNorm")
        for i in range(cfg.n_layers):
            o, t = f"encoder.blocks.{i}", f"{p}encoder.layer.{i}"
            s = f"{t}.attention.self"
            rows += _attn(f"{o}.attn", f"{s}.query", f"{s}.key", f"{s}.value", f"{t}.attention.output.dense")
            rows += _wb(f"{o}.attn_norm", f"{t}.attention.output.LayerNorm")
            rows += _wb(f"{o}.mlp.up_proj", f"{t}.intermediate.dense") + _wb(f"{o}.mlp.down_proj", f"{t}.output.dense")
            rows += _wb(f"{o}.mlp_norm", f"{t}.output.LayerNorm")
        if cfg.head == "lm":
            h = "cls.predictions." if model_type == "bert" else "lm_head."
            rows += _wb("mlm_dense", h + ("transform.dense" if model_type == "bert" else "dense"))
            rows += _wb("mlm_norm", h + ("transform.LayerNorm" if model_type == "bert" else "layer_norm"))
            rows += [("mlm_bias", h + "bias", "", None)]
            if not cfg.tie_embeddings:
                rows += [("mlm_decoder.weight", h + "decoder.weight", "", None)]
        if model_type == "bert" or cfg.head == "none":
            rows += _wb("pooler", p + "pooler.dense") if cfg.pooler else []
            rows += _wb("classifier", "classifier") if cfg.head == "classifier" else []
        elif cfg.head == "classifier":  # RobertaClassificationHead: dense + tanh on <s>, then out_proj
            rows += _wb("pooler", "classifier.dense") + _wb("classifier", "classifier.out_proj")
    elif model_type == "t5":
        rows += [("tok_embed.weight", "shared.weight", "", None)]
        for side, n_layers in (("encoder", cfg.n_layers), ("decoder", cfg.n_decoder_layers)):
            rows += [(f"{side}.rel_bias.weight", f"{side}.block.0.layer.0.SelfAttention.relative_attention_bias.weight", "", None)]
            for i in range(n_layers):
                o, t = f"{side}.blocks.{i}", f"{side}.block.{i}.layer"
                a = f"{t}.0.SelfAttention"
                rows += _wb(f"{o}.attn_norm", f"{t}.0.layer_norm", bias=False)
                rows += _attn(f"{o}.attn", f"{a}.q", f"{a}.k", f"{a}.v", f"{a}.o", bias=False)
                ff = 1
                if side == "decoder":
                    c = f"{t}.1.EncDecAttention"
                    rows += _wb(f"{o}.cross_norm", f"{t}.1.layer_norm", bias=False)
                    rows += _attn(f"{o}.cross_attn", f"{c}.q", f"{c}.k", f"{c}.v", f"{c}.o", bias=False)
                    ff = 2
                rows += _wb(f"{o}.mlp_norm", f"{t}.{ff}.layer_norm", bias=False)
                rows += _wb(f"{o}.mlp.up_proj", f"{t}.{ff}.DenseReluDense.wi", bias=False)
                rows += _wb(f"{o}.mlp.down_proj", f"{t}.{ff}.DenseReluDense.wo", bias=False)
            rows += _wb(f"{side}.final_norm", f"{side}.final_layer_norm", bias=False)
        if not cfg.tie_embeddings:
            rows += [("lm_head.weight", "lm_head.weight", "", None)]
    else:  # bart
        rows += [("tok_embed.weight", "model.shared.weight", "", None), ("final_logits_bias", "final_logits_bias", "flat", None)]
        for side, n_layers in (("encoder", cfg.n_layers), ("decoder", cfg.n_decoder_layers)):
            m = f"model.{side}"
            rows += [(f"{side}.pos_embed.weight", f"{m}.embed_positions.weight", "", None)] + _wb(f"{side}.embed_norm", f"{m}.layernorm_embedding")
            for i in range(n_layers):
                o, t = f"{side}.blocks.{i}", f"{m}.layers.{i}"
                a = f"{t}.self_attn"
                rows += _attn(f"{o}.attn", f"{a}.q_proj", f"{a}.k_proj", f"{a}.v_proj", f"{a}.out_proj")
                rows += _wb(f"{o}.attn_norm", f"{t}.self_attn_layer_norm")
                if side == "decoder":
                    c = f"{t}.encoder_attn"
                    rows += _attn(f"{o}.cross_attn", f"{c}.q_proj", f"{c}.k_proj", f"{c}.v_proj", f"{c}.out_proj")
                    rows += _wb(f"{o}.cross_norm", f"{t}.encoder_attn_layer_norm")
                rows += _wb(f"{o}.mlp.up_proj", f"{t}.fc1") + _wb(f"{o}.mlp.down_proj", f"{t}.fc2") + _wb(f"{o}.mlp_norm", f"{t}.final_layer_norm")
        if not cfg.tie_embeddings:
            rows += [("lm_head.weight", "lm_head.weight", "", None)]
    return rows


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------
def _read_tensors(path: str) -> dict[str, torch.Tensor]:
    st, bin_ = os.path.join(path, "model.safetensors"), os.path.join(path, "pytorch_model.bin")
    if os.path.exists(st):
        from safetensors.torch import load_file

        return load_file(st)
    if os.path.exists(bin_):
        return torch.load(bin_, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{path} holds neither model.safetensors nor pytorch_model.bin (sharded checkpoints are not supported)")


def _lookup(tensors: dict, name: str, model_type: str):
    """The checkpoint tensor `name`, also found without the base-model prefix (BertModel files
    have no "bert." prefix, LlamaModel files no "model.")."""
    if name in tensors:
        return name
    for prefix in ("transformer.", "model.", f"{model_type}."):
        if name.startswith(prefix) and name[len(prefix):] in tensors:
            return name[len(prefix):]
    return None


def from_pretrained(path: str, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Loads a local Hugging Face checkpoint directory into the matching fusedlm model
    (DecoderLM, EncoderLM or Seq2SeqLM), in eval mode."""
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{config_path} does not exist")
    with open(config_path) as f:
        hf_config = json.load(f)
    cfg = config_from_hf(hf_config)
    model_type = hf_config["model_type"]
    tensors = _read_tensors(path)
    with torch.device("meta"):
        model = build(cfg)
    ours = dict(model.state_dict())
    state, used, missing = {}, set(), []
    for name, theirs, how, part in _table(cfg, model_type):
        key = _lookup(tensors, theirs, model_type)
        if key is None:
            missing.append(theirs)
            continue
        used.add(key)
        value = tensors[key].t() if how == "T" else tensors[key]
        if part is not None:
            value = value.chunk(part[1], dim=0)[part[0]]
        if how == "flat":
            value = value.reshape(-1)
        want = tuple(ours[name].shape)
        if tuple(value.shape) != want:
            raise ValueError(f"checkpoint tensor {key}{'' if part is None else f' (part {part[0] + 1} of {part[1]})'} has shape "
                             f"{list(value.shape)} but the config ({config_path}) makes fusedlm's {name} {list(want)}")
        state[name] = value.contiguous()
    if missing:
        raise ValueError(f"checkpoint {path} lacks tensors the config needs: {', '.join(missing[:8])}" + (" ..." if len(missing) > 8 else ""))
    unexpected = sorted(k for k in tensors if k not in used and not _IGNORED.search(k))
    if unexpected:
        raise ValueError(f"checkpoint {path} has tensors the config does not explain: {', '.join(unexpected[:8])}" + (" ..." if len(unexpected) > 8 else ""))
    model = model.to_empty(device=device)
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False)
    leftover = set(ours) - set(state)
    if leftover:  # buffers without a checkpoint tensor (e.g. sinusoidal tables) are rebuilt
        raise ValueError(f"no checkpoint tensor for fusedlm's {', '.join(sorted(leftover))}")
    return model.to(dtype).eval()


def save_pretrained(model, path: str, *, model_type: str | None = None) -> None:
    """Writes config.json and model.safetensors that transformers' from_pretrained loads."""
    cfg = model.config
    model_type = model_type or guess_model_type(cfg)
    if model_type not in SUPPORTED:
        raise ValueError(f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED)}")
    ours = model.state_dict()
    pieces: dict[str, list] = {}  # Hugging Face name -> [(part index, tensor)], transposed back at the end
    hows = {}
    for name, theirs, how, part in _table(cfg, model_type):
        value = ours[name].detach().cpu()
        pieces.setdefault(theirs, []).append((0 if part is None else part[0], value.reshape(1, -1) if how == "flat" else value))
        hows[theirs] = how
    tensors = {}
    for theirs, parts in pieces.items():
        value = torch.cat([t for _, t in sorted(parts, key=lambda item: item[0])], dim=0)
        tensors[theirs] = value.t() if hows[theirs] == "T" else value
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"model_type": model_type, **config_to_hf(cfg, model_type)}, f, indent=2)
    from safetensors.torch import save_file

    save_file({k: v.contiguous().clone() for k, v in tensors.items()}, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
