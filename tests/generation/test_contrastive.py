"""Contrastive search token for token against transformers 4.55.4's in-core implementation, recorded in
contrastive_fixture.json by make_contrastive_fixture.py (same version-independent weights)."""
import json
import pathlib

import pytest
import torch

from tiny_models import checksum
from fusedlm.generation import generate
from fusedlm.generation.contrastive import degeneration_penalty

FIXTURE = json.loads((pathlib.Path(__file__).parent / "contrastive_fixture.json").read_text())
CASES = [(name, i) for name, m in FIXTURE["models"].items() for i in range(len(m["cases"]))]


@pytest.mark.parametrize("name,i", CASES)
def test_contrastive_search_matches_transformers_4_55(load_pair, name, i):
    ref, ours = load_pair(name)
    assert checksum(ref) == pytest.approx(FIXTURE["models"][name]["checksum"], abs=1e-9)  # the fixture's weights
    case = FIXTURE["models"][name]["cases"][i]
    got = generate(ours, torch.tensor(case["input_ids"]), attention_mask=torch.tensor(case["attention_mask"]), **case["kwargs"])
    assert got.tolist() == case["sequences"]


def test_tiny_alpha_is_greedy(load_pair):
    """alpha -> 0: the most probable candidate wins, as greedy picks it."""
    _, ours = load_pair("llama")
    ids = torch.tensor(FIXTURE["models"]["llama"]["cases"][0]["input_ids"])
    mask = torch.tensor(FIXTURE["models"]["llama"]["cases"][0]["attention_mask"])
    got = generate(ours, ids, attention_mask=mask, max_new_tokens=8, penalty_alpha=1e-7, top_k=3, eos_token_id=[])
    assert got.tolist() == generate(ours, ids, attention_mask=mask, max_new_tokens=8, eos_token_id=[]).tolist()


def test_degeneration_penalty_by_hand():
    context = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]]])  # (1, 3, 2)
    cand = torch.tensor([[0.0, 1.0]])
    mask = torch.tensor([[True, True, True]])
    assert degeneration_penalty(context, cand, mask).item() == pytest.approx(1.0)  # parallel to position 1
    mask = torch.tensor([[True, False, True]])
    assert degeneration_penalty(context, cand, mask).item() == pytest.approx(2**-0.5)  # position 1 is padding


def test_output_scores_are_the_processed_logits(load_pair):
    _, ours = load_pair("t5")
    case = FIXTURE["models"]["t5"]["cases"][3]
    out = generate(ours, torch.tensor(case["input_ids"]), attention_mask=torch.tensor(case["attention_mask"]),
                   output_scores=True, **case["kwargs"])
    assert out.sequences.tolist() == case["sequences"]
    assert len(out.scores) == out.sequences.shape[1] - 1
    # min_new_tokens=5: eos banned for the first 5 steps only
    eos = case["kwargs"]["eos_token_id"][0]
    assert all(bool((s[:, eos] == float("-inf")).all()) for s in out.scores[:5])
    assert not bool((out.scores[5][:, eos] == float("-inf")).any())
