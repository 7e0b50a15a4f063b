"""Section 3: the attention masks, drawn from what ops.attention sees.

With q = k = 0 every visible key gets the same score, and with v = the identity (key j's value is
the one-hot e_j) the output row i *is* query i's probability row: p[i, j] = 1 / (visible keys) where
key j is visible, 0 where it is masked. So the picture is read off the kernel, not redrawn from
the rules.
"""
from __future__ import annotations

import torch

from ... import ops
from ..context import Context
from ..report import Section, plot

N = 10


def visible(nq: int = N, nk: int = N, **kwargs) -> torch.Tensor:
    """(nq, nk) bool: which keys each query attends to under ops.attention(**kwargs)."""
    q = torch.zeros(1, 1, nq, nk)
    k = torch.zeros(1, 1, nk, nk)
    v = torch.eye(nk)[None, None]  # (1, 1, Nk, D = Nk)
    return ops.attention(q, k, v, **kwargs)[0, 0] > 0


CASES = (
    ("causal", dict(mask="causal")),
    ("prefix-LM (prefix_len=4)", dict(mask="prefix", prefix_len=4)),
    ("bidirectional", dict(mask="bidirectional")),
    ("causal + left padding (2 pads)", dict(mask="causal", key_padding_mask=torch.arange(N)[None] >= 2)),
    ("decode: 3 new queries, 10 cached keys", dict(mask="causal", nq=3)),
)


def run(ctx: Context) -> Section:
    sec = Section("masks", "Attention masks, as ops.attention sees them")
    drawn = [(title, visible(nq=kw.pop("nq", N), **kw)) for title, kw in ((t, dict(k)) for t, k in CASES)]

    def draw(fig):
        for i, (title, m) in enumerate(drawn):
            ax = fig.add_subplot(1, len(drawn), i + 1)
            ax.imshow(m.float().numpy(), cmap="Blues", vmin=0, vmax=1.3)
            ax.set_title(title, fontsize=8)
            ax.set_xlabel("key", fontsize=7)
            ax.set_ylabel("query", fontsize=7)
            ax.tick_params(labelsize=6)

    sec.plots.append(plot(ctx.path("masks.png"), draw, figsize=(14, 3.2)))
    sec.text.append(f"Backend: {ops.attention.__module__.split('.')[-1]} dispatch (available: {', '.join(ops.available_backends())}). "
                    "Causal is aligned bottom-right: 3 new queries against 10 cached keys see all past keys.")
    tri = torch.ones(N, N).tril().bool()
    prefix = tri.clone()
    prefix[:, :4] = True
    expected = [tri, prefix, torch.ones(N, N, dtype=torch.bool), tri & (torch.arange(N)[None] >= 2), tri[-3:]]
    held = [bool((m == e).all()) for (_, m), e in zip(drawn, expected)]
    sec.check("masks equal to their definition", None, sum(held), f"{len(held)} of {len(held)}", passed=all(held))
    return sec
