"""Section 2: the architectures built, and parameter counts against the textbook formula."""
from __future__ import annotations

import torch

from ...models import build, count_parameters, get_config
from ..context import Context
from ..models import decoder_config, encoder_config, seq2seq_config
from ..report import Section, Table

# GPT-3 (Brown et al. 2020), Table 2.1: name, n_layers, d_model, n_heads, d_head, the size it quotes.
GPT3 = (("GPT-3 Small", 12, 768, 12, 64, "125M"), ("GPT-3 Medium", 24, 1024, 16, 64, "350M"),
        ("GPT-3 Large", 24, 1536, 16, 96, "760M"), ("GPT-3 XL", 24, 2048, 24, 128, "1.3B"),
        ("GPT-3 2.7B", 32, 2560, 32, 80, "2.7B"), ("GPT-3 6.7B", 32, 4096, 32, 128, "6.7B"),
        ("GPT-3 13B", 40, 5140, 40, 128, "13B"), ("GPT-3 175B", 96, 12288, 96, 128, "175B"))


def exact_count(config) -> int:
    """Parameters of the model built on the meta device (no memory), counted one by one."""
    with torch.device("meta"):
        return sum(p.numel() for p in build(config).parameters())


def textbook(config) -> int:
    """12 · L · d² + V · d: attention 4d², MLP 8d² (d_ff = 4d) per layer, one embedding matrix."""
    layers = config.n_layers + (config.n_decoder_layers if config.arch == "encoder-decoder" else 0)
    return 12 * layers * config.d_model**2 + config.vocab_size * config.d_model


def run(ctx: Context) -> Section:
    sec = Section("architectures", "Architectures and parameter counts")
    tok = ctx.tok
    built = []
    for name, cfg, call in (
        ("decoder-only (causal)", decoder_config(ctx), lambda m, ids: m(ids)),
        ("prefix-LM (decoder, prefix bidirectional)", decoder_config(ctx, attn_mode="prefix"), lambda m, ids: m(ids, prefix_len=4)),
        ("encoder-only (MLM head)", encoder_config(ctx), lambda m, ids: m(ids)),
        ("encoder-decoder", seq2seq_config(ctx), lambda m, ids: m(ids, decoder_input_ids=ids[:, :5])),
    ):
        torch.manual_seed(ctx.seed)
        model = build(cfg)
        ids = torch.tensor([tok.encode(ctx.world.store[0])[:12]])
        with torch.no_grad():
            out = call(model, ids)
        n = sum(p.numel() for p in model.parameters())
        built.append([name, type(model).__name__, cfg.n_layers, cfg.d_model, n, count_parameters(cfg)["total"] == n,
                      f"{list(ids.shape)} -> {list(out.logits.shape)}"])
    sec.tables.append(Table("The tour's models (built and run once)", ["model", "class", "layers", "d", "parameters",
                                                                         "= count_parameters", "ids -> logits"], built))

    rows = []
    for name in ("gpt2", "gpt3-175b", "llama-7b", "qwen2-0.5b", "bert-base", "roberta-base", "t5-small", "bart-base"):
        cfg = get_config(name)
        exact, book = exact_count(cfg), textbook(cfg)
        rows.append([name, cfg.n_layers, cfg.d_model, cfg.d_ff, cfg.vocab_size, book, exact, f"{100 * (book / exact - 1):+.1f}%"])
    sec.tables.append(Table("Presets: the textbook formula 12·L·d² + V·d against the exact count",
                            ["preset", "L", "d", "d_ff", "V", "12·L·d² + V·d", "exact", "formula error"], rows))
    sec.text.append("The formula assumes d_ff = 4d, 4d² of attention and one V·d matrix; it misses biases, norms, "
                    "position tables and untied heads, and overcounts GQA (Qwen2's 2 key/value heads) and "
                    "undercounts SwiGLU's three d×d_ff matrices when d_ff ≠ 8d/3.")

    rows = []
    for name, layers, d, heads, d_head, quoted in GPT3:
        # the count depends on the attention width heads·d_head only; the quoted sizes take it = d
        # (XL and 13B list heads·d_head = 3,072 and 5,120 against d = 2,048 and 5,140)
        cfg = get_config("gpt3-175b", n_layers=layers, d_model=d, n_heads=1, head_dim=d, d_ff=4 * d)
        exact = count_parameters(cfg)["total"]
        rows.append([name, layers, d, heads, d_head, quoted, textbook(cfg), exact])
    sec.tables.append(Table("GPT-3's Table 2.1 (V = 50,257, context 2,048, d_ff = 4d, attention width d)",
                            ["model", "L", "d", "heads", "d_head", "quoted", "12·L·d² + V·d", "exact"], rows))
    sec.text.append("GPT-3's table lists heads × d_head ≠ d for XL (24 × 128) and 13B (40 × 128 vs 5,140); its quoted "
                    "sizes match attention of width d, which is what the exact count uses.")
    gpt3 = rows[-1][-1]
    sec.check("GPT-3 175B exact parameters (billions)", None, gpt3 / 1e9, "175 ± 1%", passed=abs(gpt3 / 175e9 - 1) < 0.01)

    llama = get_config("llama-7b")
    total = exact_count(llama)
    sec.check("LLaMA-7B parameters", None, total, "6,738,415,616", passed=total == 6_738_415_616)
    try:
        from ...peft import count_lora_parameters
    except ImportError:
        sec.missing("fusedlm.peft missing (the LoRA count)")
        return sec
    lora = count_lora_parameters(llama, r=8, targets="all")
    sec.tables.append(Table("LoRA r = 8 on the seven targets (q, k, v, o, gate, up, down) of LLaMA-7B",
                            ["LoRA parameters", "base parameters", "share"], [[lora, total, f"{100 * lora / total:.3f}%"]]))
    sec.check("LLaMA-7B LoRA r=8, 7 targets", None, lora, "19,988,480", passed=lora == 19_988_480)
    return sec
