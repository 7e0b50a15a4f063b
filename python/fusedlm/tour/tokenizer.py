"""The tour's tokenizer: a BPE trained with the `tokenizers` library on the world's texts.

    tok = train_tokenizer(world.texts(), vocab_size=512, n_sentinels=16)
    ids = tok.encode("Where was Vira Doltas born?")        # list[int]
    tok.decode(ids)
    tok.save("out/tokenizer.json")                           # a standard tokenizers JSON file

Special tokens: <pad> 0, <unk> 1, <s> 2 (bos), </s> 3 (eos), <mask> 4, <sep> 5; T5's sentinels
<extra_id_k> take the top ids (<extra_id_0> = vocab_size - 1), as span corruption expects.
"""
from __future__ import annotations

import dataclasses

SPECIALS = ("<pad>", "<unk>", "<s>", "</s>", "<mask>", "<sep>")
PAD, UNK, BOS, EOS, MASK, SEP = range(len(SPECIALS))


@dataclasses.dataclass
class Tokenizer:
    """A trained `tokenizers.Tokenizer` and the ids of the tour's special tokens."""

    backend: object  # tokenizers.Tokenizer
    n_sentinels: int

    pad_id, unk_id, bos_id, eos_id, mask_id, sep_id = PAD, UNK, BOS, EOS, MASK, SEP

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text).ids

    def decode(self, ids) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=True)

    def special_ids(self) -> set[int]:
        return set(range(len(SPECIALS))) | set(range(self.vocab_size - self.n_sentinels, self.vocab_size))

    def save(self, path: str) -> None:
        """The tokenizers JSON file (what ``tokenizers.Tokenizer.save`` writes), written atomically."""
        from .. import _io

        _io.write_text(path, self.backend.to_str(pretty=True))


def train_tokenizer(texts: list[str], *, vocab_size: int = 512, n_sentinels: int = 16) -> Tokenizer:
    """A BPE of `vocab_size` ids in all (specials and sentinels included), trained on `texts`.

    Words are split on spaces (kept as a leading "▁", SentencePiece's Metaspace) and punctuation
    first, so a merge never crosses a word and "Morvik." ends in the same token as "Morvik". No
    continuing-subword prefix: with one, tokenizers' BPE trainer numbers those tokens in hash-map
    order and the vocabulary changes from run to run (huggingface/tokenizers#1794)."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < len(SPECIALS) + n_sentinels + 64:
        raise ValueError(f"vocab_size must leave room for the base alphabet, got {vocab_size}")
    tok = HFTokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Metaspace(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - n_sentinels, special_tokens=list(SPECIALS), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    # sentinels appended in reverse so that <extra_id_0> gets the top id
    tok.add_special_tokens([f"<extra_id_{k}>" for k in reversed(range(n_sentinels))])
    return Tokenizer(tok, n_sentinels)
