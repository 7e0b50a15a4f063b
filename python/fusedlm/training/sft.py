"""Supervised fine-tuning data: prompt/response pairs and chat conversations as token ids with
labels on the response only (-100 on the prompt), and optional packing. The stage's loss is
``lm.lm_loss`` (logits only where there are labels).

    ex = sft_example(prompt_ids, response_ids, eos_token_id=2)            # {"input_ids", "labels"}
    ex = chat_example([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
                      tokenize=tok.encode, eos_token_id=2)                  # loss on assistant turns
    rows = pack(examples, seq_len=512, pad_token_id=0)                      # + "position_ids"
    Trainer(model, lm_loss, rows or examples, collate=pad_collate, ...)
"""
from __future__ import annotations

from typing import Callable, Sequence

from .. import _validate as check
from ..models.logprobs import IGNORE_INDEX as IGNORE

# one turn: a role header, the content, an end marker. The header is prompt; an assistant's
# content and end marker are what the model learns to produce.
CHAT_TEMPLATE = ("<|{role}|>\n", "{content}<|end|>\n")
ROLES = ("system", "user", "assistant")


def sft_example(prompt_ids: Sequence[int], response_ids: Sequence[int], *, eos_token_id: int | None = None,
                bos_token_id: int | None = None, max_len: int | None = None, loss_on_prompt: bool = False) -> dict:
    """[bos] + prompt + response + [eos] with labels = the ids on the response (and eos), -100 on
    the prompt (unless loss_on_prompt); cut to max_len tokens from the right."""
    prompt, response = check.token_ids("prompt_ids", prompt_ids), check.token_ids("response_ids", response_ids)
    if not response:
        raise ValueError("response_ids is empty: an SFT example needs a response to learn")
    prompt = ([bos_token_id] if bos_token_id is not None else []) + prompt
    response = response + ([eos_token_id] if eos_token_id is not None else [])
    ids = prompt + response
    labels = (ids[: len(prompt)] if loss_on_prompt else [IGNORE] * len(prompt)) + response
    if max_len is not None:
        ids, labels = ids[:max_len], labels[:max_len]
    return {"input_ids": ids, "labels": labels}


def chat_example(messages: Sequence[dict], tokenize: Callable[[str], list[int]], *, template=CHAT_TEMPLATE,
                 eos_token_id: int | None = None, bos_token_id: int | None = None, max_len: int | None = None) -> dict:
    """A conversation rendered with `template` (header, body) per turn and tokenized piece by
    piece; labels on the assistant turns' bodies only (trl's assistant_only_loss). eos_token_id,
    if given, ends the conversation (learned when the last turn is the assistant's)."""
    if not messages:
        raise ValueError("messages is empty")
    header_t, body_t = template
    ids = [bos_token_id] if bos_token_id is not None else []
    labels = [IGNORE] * len(ids)
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}] must be {{'role': one of {ROLES}, 'content': str}}, got {m!r}")
        header = tokenize(header_t.format(role=m["role"]))
        body = tokenize(body_t.format(content=m["content"]))
        ids += header + body
        labels += [IGNORE] * len(header) + (body if m["role"] == "assistant" else [IGNORE] * len(body))
    if eos_token_id is not None:
        ids.append(eos_token_id)
        labels.append(eos_token_id if messages[-1]["role"] == "assistant" else IGNORE)
    if all(t == IGNORE for t in labels):
        raise ValueError("the conversation has no assistant turn: nothing to learn")
    if max_len is not None:
        ids, labels = ids[:max_len], labels[:max_len]
    return {"input_ids": ids, "labels": labels}


def pack(examples: Sequence[dict], seq_len: int, *, pad_token_id: int = 0) -> list[dict]:
    """Concatenates examples ({"input_ids", "labels"}) into rows of seq_len tokens (the last one
    padded), trl's "wrapped" packing: no padding is computed on. Each row gets "position_ids" that
    restart at 0 with every example, and the first token of an example gets no label (it is not
    predicted from the previous example). Attention is still causal over the whole row, so a
    token sees the examples packed before it in its row."""
    check.integer("seq_len", seq_len, low=2)
    if not examples:
        raise ValueError("pack needs at least one example")
    ids, labels, positions = [], [], []
    for ex in examples:
        n = len(ex["input_ids"])
        if len(ex["labels"]) != n:
            raise ValueError(f"an example's labels ({len(ex['labels'])}) and input_ids ({n}) differ in length")
        ids += list(ex["input_ids"])
        labels += [IGNORE] + list(ex["labels"])[1:]
        positions += list(range(n))
    rows = []
    for start in range(0, len(ids), seq_len):
        row = {"input_ids": ids[start : start + seq_len], "labels": labels[start : start + seq_len],
               "position_ids": positions[start : start + seq_len]}
        pad = seq_len - len(row["input_ids"])
        if pad:
            row = {"input_ids": row["input_ids"] + [pad_token_id] * pad, "labels": row["labels"] + [IGNORE] * pad,
                   "position_ids": row["position_ids"] + [0] * pad,
                   "attention_mask": [1] * (seq_len - pad) + [0] * pad}
        else:
            row["attention_mask"] = [1] * seq_len
        rows.append(row)
    return rows
