"""Section 4: self-supervised pretraining of the three architectures on the world's corpus, with
fusedlm.training's objectives and Trainer: CLM on the decoder, MLM on the encoder, T5 span
corruption on the encoder-decoder."""
from __future__ import annotations

import torch

from ...training import lm_loss, objectives, pad_collate
from ..context import Context
from ..data import pack
from ..models import decoder_config, encoder_config, new_model, seq2seq_config
from ..report import Section, Table, plot
from ..train import exact_match, fit, mean_loss

# Cloze prompts in the corpus' own phrasing: the model completes a fact.
CLOZE = {"city": "The birthplace of {name} is", "year": "The birth year of {name} is", "job": "By trade, {name} is a"}


def cloze_accuracy(ctx: Context, model, people) -> float:
    tok = ctx.tok
    prompts = [tok.encode(CLOZE[a].format(name=p.name)) for p in people for a in CLOZE]
    answers = [tok.encode(p.value(a)) for p in people for a in CLOZE]
    return exact_match(model, prompts, answers, tok.pad_id).float().mean().item()


def _rows(ctx: Context) -> list[dict]:
    return [{"input_ids": r} for r in pack(ctx.tok, ctx.world.corpus, ctx.sizes.seq_len).tolist()]


def train_decoder(ctx: Context, sec: Section) -> list[dict]:
    s, w = ctx.sizes, ctx.world
    model = new_model(decoder_config(ctx), ctx.seed)
    people = w.seen[: s.n_eval // 3 * 2], w.unseen[: s.n_eval // 3]
    before = [cloze_accuracy(ctx, model, p) for p in people]

    def collate(examples):
        ids, labels = objectives.clm(pad_collate(examples)["input_ids"])
        return {"input_ids": ids, "labels": labels}

    history = fit(ctx, model, lm_loss, _rows(ctx), steps=s.pretrain_steps, lr=3e-3, salt=1, collate=collate).history
    after = [cloze_accuracy(ctx, model, p) for p in people]
    ctx.models["decoder"] = model
    sec.check("decoder CLM loss (first vs last 10 steps)", mean_loss(history, True), mean_loss(history, False), "down")
    sec.check("decoder: seen facts completed (cloze)", before[0], after[0], "up")
    sec.tables.append(Table("Decoder: does it know the facts? (cloze completion, exact)",
                            ["people", "before pretraining", "after"],
                            [["seen (facts in the corpus)", before[0], after[0]],
                             ["unseen (facts only in the store)", before[1], after[1]]]))
    return history





def train_denoiser(ctx: Context, sec: Section, model, loss_fn, transform, salt: int, what: str, metric: str) -> list[dict]:
    """Trains `model` on corpus rows through `transform` (ids (B, N) -> batch: the objective) and
    checks its loss and its token accuracy on one fixed transformed batch, before and after."""
    rows = _rows(ctx)
    probe = transform(torch.tensor([r["input_ids"] for r in rows[: ctx.sizes.batch]]))

    def accuracy() -> float:
        with torch.no_grad():
            return loss_fn(model.eval(), probe)[1]["accuracy"]

    before = accuracy()
    history = fit(ctx, model, loss_fn, rows, steps=ctx.sizes.encoder_steps, lr=2e-3, salt=salt,
                  collate=lambda ex: transform(pad_collate(ex)["input_ids"])).history
    sec.check(f"{what} loss", mean_loss(history, True), mean_loss(history, False), "down")
    sec.check(f"{what}: {metric}", before, accuracy(), "up")
    return history


def train_encoder(ctx: Context, sec: Section) -> list[dict]:
    tok, g = ctx.tok, ctx.generator(2)
    special = torch.tensor(sorted(tok.special_ids()))

    def masked(ids: torch.Tensor) -> dict:
        inputs, labels = objectives.mlm(ids, mask_token_id=tok.mask_id, vocab_size=tok.vocab_size,
                                        special_tokens_mask=torch.isin(ids, special), generator=g)
        return {"input_ids": inputs, "labels": labels}

    model = new_model(encoder_config(ctx), ctx.seed)
    return train_denoiser(ctx, sec, model, lm_loss, masked, 2, "encoder MLM", "masked tokens recovered")


def train_seq2seq(ctx: Context, sec: Section) -> list[dict]:
    tok, g = ctx.tok, ctx.generator(3)

    def corrupt(ids: torch.Tensor) -> dict:
        inputs, targets = objectives.span_corruption(ids, vocab_size=tok.vocab_size, eos_token_id=tok.eos_id, generator=g)
        return {"input_ids": inputs, "labels": targets}

    model = new_model(seq2seq_config(ctx), ctx.seed)
    history = train_denoiser(ctx, sec, model, lm_loss, corrupt, 3, "encoder-decoder span corruption",
                             "dropped spans restored (token accuracy)")
    ctx.models["seq2seq"] = model
    return history


def run(ctx: Context) -> Section:
    sec = Section("pretraining", "Pretraining: CLM, MLM, span corruption")
    curves = {"decoder, CLM": train_decoder(ctx, sec), "encoder, MLM (15%, 80/10/10)": train_encoder(ctx, sec),
              "encoder-decoder, T5 span corruption": train_seq2seq(ctx, sec)}
    sec.text.append(f"Corpus: the {len(ctx.world.corpus)} documents packed into rows of {ctx.sizes.seq_len} tokens. "
                    "Objectives from `fusedlm.training.objectives`, trained by `fusedlm.training.Trainer` "
                    "(AdamW, cosine schedule with warmup, gradient clipping at 1).")
    sec.tables.append(Table("Training", ["model", "steps", "loss first 10", "loss last 10", "tokens/s (median)"],
                            [[k, len(h), mean_loss(h, True), mean_loss(h, False),
                              sorted(r["tokens_per_s"] for r in h)[len(h) // 2]] for k, h in curves.items()]))

    def draw(fig):
        ax = fig.add_subplot(1, 1, 1)
        for name, h in curves.items():
            ax.plot([r["step"] for r in h], [r["loss"] for r in h], label=name)
        ax.set_yscale("log")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("training loss (log)")
        ax.set_title("Pretraining loss")
        ax.legend()

    sec.plots.append(plot(ctx.path("pretraining_loss.png"), draw))
    return sec
