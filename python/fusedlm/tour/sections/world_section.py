"""Section 1: the synthetic world and its tokenizer."""
from __future__ import annotations

from ..context import Context
from ..report import Section, Table
from ..tokenizer import train_tokenizer
from ..world import make_world


def prompt_texts(w) -> list[str]:
    """The prompt templates the later sections use, rendered once (their words and newlines)."""
    try:
        from ..data import instruction_prompt, qa_prompt

        q = w.qa["train"][0]
        return [qa_prompt(q.question), qa_prompt(q.question, w.store[:2]), instruction_prompt(w.instructions[0][0])]
    except ImportError:  # fusedlm.generation missing: the sections that prompt will say so
        return []


def run(ctx: Context) -> Section:
    s = ctx.sizes
    sec = Section("world", "A synthetic world, and a tokenizer trained on it")
    w = make_world(s.n_seen, s.n_unseen, bios_per_person=s.bios_per_person, seed=ctx.seed)
    tok = train_tokenizer(w.texts() + prompt_texts(w), vocab_size=s.vocab_size)
    tok.save(ctx.path("tokenizer.json"))
    ctx.world, ctx.tok = w, tok

    n_tokens = sum(len(tok.encode(t)) + 1 for t in w.corpus)
    sec.text += [f"Generated from seed {ctx.seed}, nothing downloaded: invented people with a birth city, a birth year "
                 "and a job. *Seen* people's facts are in the pretraining corpus (several paraphrased biographies each); "
                 "*unseen* people's facts are only in the document store. Test questions are about people whose "
                 "questions were never trained on.",
                 f"Tokenizer: a BPE of {tok.vocab_size} ids trained with the `tokenizers` library on the world's texts, "
                 "saved as `tokenizer.json` beside this report."]
    sec.tables.append(Table("The world", ["what", "count"], [
        ["people seen / unseen", f"{len(w.seen)} / {len(w.unseen)}"],
        ["pretraining documents (tokens)", f"{len(w.corpus)} ({n_tokens:,d})"],
        ["store passages", len(w.store)],
        ["questions: train / valid / seen test / unseen test", " / ".join(str(len(w.qa[k])) for k in ("train", "valid", "seen", "unseen"))],
        ["instructions", len(w.instructions)],
        ["preference pairs", len(w.preferences)],
    ]))
    q, pref = w.qa["seen"][0], w.preferences[0]
    sec.tables.append(Table("Examples", ["kind", "text"], [
        ["pretraining document", w.corpus[0]],
        ["store passage", w.store[-1]],
        ["question -> answer", f"{q.question} -> {q.answer}"],
        ["instruction -> response", f"{w.instructions[0][0]} -> {w.instructions[0][1]}"],
        ["preference", f"{pref[0]} chosen: {pref[1]}, rejected: {pref[2]}"],
        ["tokens of a question", " ".join(tok.backend.encode(q.question).tokens)],
    ]))
    seen_names, unseen_names = {p.name for p in w.seen}, {p.name for p in w.unseen}
    in_corpus = sum(any(n in doc for doc in w.corpus) for n in unseen_names)
    sec.check("unseen people named in the corpus", None, in_corpus, "0", passed=not (seen_names & unseen_names) and in_corpus == 0)
    sec.check("store passages that decode back exactly", None, sum(tok.decode(tok.encode(t)) == t for t in w.store) / len(w.store),
              "1", passed=all(tok.decode(tok.encode(t)) == t for t in w.store))
    return sec
