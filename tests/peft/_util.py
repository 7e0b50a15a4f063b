"""Small fusedlm models and batches shared by the PEFT tests."""
import torch

from fusedlm.models import build, get_config

PRESETS = ("llama-tiny", "gpt2-tiny", "t5-tiny", "bert-tiny")


def model(name: str, seed: int = 0, **overrides):
    """A tiny random model in eval mode, with non-trivial norms."""
    torch.manual_seed(seed)
    m = build(get_config(name, **overrides)).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    return m


def batch(b: int = 3, n: int = 9, vocab: int = 128, seed: int = 1):
    """ids (B, N) and a bool mask with left padding in rows 1 and 2."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, n), generator=g)
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[1 % b, :3] = False
    mask[2 % b, :1] = False
    return ids, mask


def run(m, ids, mask, **kw):
    """Logits of a decoder / encoder (ids, mask) or of a seq2seq (source ids, mask; fixed decoder ids)."""
    if m.config.arch == "encoder-decoder":
        dec = torch.arange(5).remainder(m.config.vocab_size).expand(ids.shape[0], 5)
        return m(ids, attention_mask=mask, decoder_input_ids=dec, **kw).logits
    return m(ids, attention_mask=mask, **kw).logits


def randomize(m, pattern: str = "lora_", std: float = 0.1, seed: int = 5):
    """Fills the parameters whose name contains `pattern` with N(0, std) (an adapter that does something)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if pattern in n:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def assert_close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5):
    """max |a - b| <= rel · max(1, max |b|): float32 rounding, measured against the tensor's scale."""
    a, b = a.detach(), b.detach()
    err, scale = float((a - b).abs().max()), max(1.0, float(b.abs().max()))
    assert err <= rel * scale, f"max abs difference {err:.3g} > {rel:g} x scale {scale:.3g}"
