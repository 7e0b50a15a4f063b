"""Section 7: decoding strategies on the SFT model, through fusedlm.generation.generate: greedy,
sampling (temperature, top-k, top-p), beam search with several length penalties, contrastive search.

Two prompts sets: the seen test questions (short answers: accuracy) and "Tell me about X." for the
seen test people (biographies: mean length, distinct-2, repetition, and how many of the person's
three facts come out right)."""
from __future__ import annotations

import re

from tqdm.auto import tqdm

from ..context import Context
from ..data import accuracy, distinct_2, generate_text, instruction_prompt, qa_prompt, repetition_rate
from ..report import Section, Table, plot


def strategies() -> dict[str, dict]:
    """name -> generate's keyword arguments (transformers' names)."""
    return {
        "greedy": {},
        "sampling T=0.7": dict(do_sample=True, temperature=0.7),
        "sampling T=1.0": dict(do_sample=True, temperature=1.0),
        "sampling T=1.5": dict(do_sample=True, temperature=1.5),
        "top-k=5 (T=1)": dict(do_sample=True, top_k=5),
        "top-p=0.9 (T=1)": dict(do_sample=True, top_p=0.9),
        "beam 4, length_penalty=0": dict(num_beams=4, length_penalty=0.0),
        "beam 4, length_penalty=1": dict(num_beams=4, length_penalty=1.0),
        "beam 4, length_penalty=2": dict(num_beams=4, length_penalty=2.0),
        "contrastive α=0.6 k=4": dict(penalty_alpha=0.6, top_k=4),
    }


def facts_right(text: str, person) -> float:
    """Share of the person's three facts that the text states (each value appears in it)."""
    words = set(re.findall(r"\w+", text))
    return sum(str(person.value(a)) in words for a in ("city", "year", "job")) / 3


def run(ctx: Context) -> Section:
    sec = Section("decoding", "Decoding strategies")
    (model,) = ctx.need("sft")
    w, n = ctx.world, ctx.sizes.n_eval
    questions = w.qa["seen"][:n]
    by_name = {p.name: p for p in w.people}
    people = [by_name[name] for name in dict.fromkeys(q.person for q in questions)]
    qa_prompts = [qa_prompt(q.question) for q in questions]
    bio_prompts = [instruction_prompt(f"Tell me about {p.name}.") for p in people]
    results = {}
    for i, (name, kwargs) in enumerate(tqdm(strategies().items(), desc="decoding", leave=False)):
        if kwargs.get("do_sample"):
            kwargs = dict(kwargs, generator=ctx.generator(100 + i))
        answers = generate_text(model, ctx.tok, qa_prompts, **kwargs)
        if kwargs.get("do_sample"):
            kwargs["generator"] = ctx.generator(200 + i)
        bios = generate_text(model, ctx.tok, bio_prompts, max_new_tokens=48, **kwargs)
        results[name] = {"QA accuracy": accuracy(answers, [q.answer for q in questions]),
                         "facts right in bios": sum(facts_right(b, p) for b, p in zip(bios, people)) / len(people),
                         "mean bio length (words)": sum(len(b.split()) for b in bios) / len(bios),
                         "distinct-2": distinct_2(bios), "repetition (3-grams)": repetition_rate(bios)}
        results[name]["example"] = bios[0]
    metrics = [k for k in next(iter(results.values())) if k != "example"]
    sec.text.append(f"The SFT model, {len(questions)} seen test questions and biographies of {len(people)} seen test "
                    f"people (whose biographies were never an SFT target). `fusedlm.generation.generate` with "
                    "transformers' argument names; sampling seeded. Example biography prompt: "
                    f"`{bio_prompts[0]!r}`, the person's facts: {people[0].passage()}")
    sec.tables.append(Table("Decoding strategies", ["strategy", *metrics, "first biography"],
                            [[k, *(v[m] for m in metrics), v["example"]] for k, v in results.items()]))
    r = results
    sec.claim("higher temperature, more diverse text (distinct-2, T=1.5 vs 0.7)", r["sampling T=0.7"]["distinct-2"],
              r["sampling T=1.5"]["distinct-2"], "up")
    sec.claim("higher temperature, fewer right answers (QA, T=1.5 vs greedy)", r["greedy"]["QA accuracy"],
              r["sampling T=1.5"]["QA accuracy"], "down")
    sec.claim("truncation (top-k=5) keeps more facts right than plain T=1", r["sampling T=1.0"]["facts right in bios"],
              r["top-k=5 (T=1)"]["facts right in bios"], "up")
    sec.claim("a larger length penalty favours longer beams (bio words, 2 vs 0)",
              r["beam 4, length_penalty=0"]["mean bio length (words)"], r["beam 4, length_penalty=2"]["mean bio length (words)"],
              "up")
    sec.claim("contrastive search repeats less than greedy", r["greedy"]["repetition (3-grams)"],
              r["contrastive α=0.6 k=4"]["repetition (3-grams)"], "down")

    def draw(fig):
        names = list(results)
        for i, m in enumerate(("QA accuracy", "facts right in bios", "distinct-2", "repetition (3-grams)")):
            ax = fig.add_subplot(1, 4, i + 1)
            ax.barh(names, [results[k][m] for k in names], color=f"C{i}")
            ax.set_title(m, fontsize=9)
            ax.invert_yaxis()
            ax.tick_params(labelsize=7)
            if i:
                ax.set_yticks([])

    sec.plots.append(plot(ctx.path("decoding.png"), draw, figsize=(13, 4)))
    return sec
