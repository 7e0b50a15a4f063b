"""Records transformers 4.55.4's contrastive search on the tiny models of tests/tiny_models.py (crc32 weights).

transformers 4.56 moved contrastive search out of its core into a hub repository (it no longer runs
offline), so the reference outputs come from the last release that had it in core, run once here:

    python3 -m venv /tmp/tf455 && /tmp/tf455/bin/pip install torch==2.13.0 transformers==4.55.4
    /tmp/tf455/bin/python tests/generation/make_contrastive_fixture.py   # writes contrastive_fixture.json

Each case is the kwargs of one generate call (eos_token_id [] = none) and the token ids it returned.
Cases with a repetition penalty use unpadded prompts: 4.55.4 penalises left-pad tokens of the
prompt, 5.24 (whose processors fusedlm follows) skips them.
"""
import json
import pathlib
import sys

import torch
import transformers

sys.path.insert(0, str(pathlib.Path(__file__).parent.parent))
from tiny_models import GENERATION, SEQ2SEQ, checksum, hf, prompts  # noqa: E402

OUT = pathlib.Path(__file__).parent / "contrastive_fixture.json"


def run(model, ids, mask, kwargs):
    kw = dict(kwargs)
    eos = kw.pop("eos_token_id")
    model.generation_config.eos_token_id = eos if eos else None
    out = model.generate(ids, attention_mask=mask, do_sample=False, **kw)
    return out.tolist()


def main():
    assert transformers.__version__ == "4.55.4", f"run this with transformers 4.55.4, not {transformers.__version__}"
    torch.set_num_threads(1)
    fixture = {"transformers": transformers.__version__, "torch": torch.__version__, "models": {}}
    for name in GENERATION:
        model = hf(name, weights="crc32")
        pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
        cases = []
        base = dict(penalty_alpha=0.6, top_k=4, max_new_tokens=12, eos_token_id=[], pad_token_id=pad)
        ids, mask = prompts(name, padded=True)
        first = run(model, ids, mask, base)
        eos = first[0][ids.shape[1] + 3] if name not in SEQ2SEQ else first[0][4]  # a token it does produce
        eos2 = first[1][-2]
        specs = [
            (True, 3, base),
            (True, 3, dict(base, penalty_alpha=0.3, top_k=3, max_new_tokens=10, eos_token_id=[eos])),
            (True, 3, dict(base, penalty_alpha=1.0, top_k=2, eos_token_id=[eos, eos2])),
            (False, 3, dict(base, repetition_penalty=1.3, no_repeat_ngram_size=2, min_new_tokens=5, eos_token_id=[eos])),
            (False, 1, dict(base, penalty_alpha=0.5, top_k=6, max_new_tokens=15)),
        ]
        for padded, b, kwargs in specs:
            ids, mask = prompts(name, padded, b=b)
            cases.append(dict(input_ids=ids.tolist(), attention_mask=mask.tolist(), kwargs=kwargs,
                              sequences=run(model, ids, mask, kwargs)))
        fixture["models"][name] = dict(checksum=checksum(model), cases=cases)
        print(name, [len(c["sequences"][0]) for c in cases])
    OUT.write_text(json.dumps(fixture, indent=None, separators=(",", ":")) + "\n")
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
