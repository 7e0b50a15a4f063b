"""The tour's synthetic world and tokenizer: deterministic for a seed, seen/unseen disjoint, test
questions never trained or calibrated on."""
import dataclasses

import pytest

from fusedlm.tour.world import ATTRIBUTES, CITIES, JOBS, YEARS, fresh_people, make_world


@pytest.fixture(scope="module")
def world():
    return make_world(40, 20, bios_per_person=3, seed=7)


def test_same_seed_same_world(world):
    again = make_world(40, 20, bios_per_person=3, seed=7)
    assert dataclasses.asdict(again) == dataclasses.asdict(world)


def test_other_seed_other_world(world):
    other = make_world(40, 20, bios_per_person=3, seed=8)
    assert {p.name for p in other.people} != {p.name for p in world.people}
    assert other.corpus != world.corpus


def test_seen_and_unseen_are_disjoint(world):
    seen, unseen = {p.name for p in world.seen}, {p.name for p in world.unseen}
    assert len(seen) == 40 and len(unseen) == 20
    assert not seen & unseen
    assert all(p.name not in doc for p in world.unseen for doc in world.corpus)
    assert all(any(p.name in doc for doc in world.corpus) for p in world.seen)


def test_corpus_states_the_true_facts(world):
    for p in world.seen:
        bios = [d for d in world.corpus if p.name in d]
        assert len(bios) == 3
        assert all(p.city in d and str(p.year) in d and p.job in d for d in bios)


def test_store_has_one_passage_per_person(world):
    assert len(world.store) == 60
    for p, passage in zip(world.people, world.store):
        assert passage.startswith(p.name) and p.city in passage and str(p.year) in passage and p.job in passage


def test_question_splits_are_disjoint_by_person(world):
    people = {k: {q.person for q in v} for k, v in world.qa.items()}
    for a in people:
        for b in people:
            if a < b:
                assert not people[a] & people[b], (a, b)
    seen_names = {p.name for p in world.seen}
    assert people["train"] <= seen_names and people["seen"] <= seen_names
    assert not people["unseen"] & seen_names
    assert {q.seen for q in world.qa["unseen"]} == {False} and {q.seen for q in world.qa["seen"]} == {True}
    assert {q.seen for q in world.qa["valid"]} == {True, False}  # calibration sees both kinds


def test_answers_and_preferences(world):
    by_name = {p.name: p for p in world.people}
    for split in world.qa.values():
        for q in split:
            assert q.attribute in ATTRIBUTES and q.answer == by_name[q.person].value(q.attribute)
    pools = {"city": set(CITIES), "year": {str(y) for y in YEARS}, "job": set(JOBS)}
    for (question, chosen, rejected), q in zip(world.preferences, world.qa["train"]):
        assert question == q.question and chosen == q.answer
        assert rejected != chosen and rejected in pools[q.attribute]


def test_fresh_people_avoid_the_world(world):
    names = world.names()
    assert names == {p.name for p in world.people}
    fresh = fresh_people(200, seed=1, exclude=names)
    assert len({p.name for p in fresh}) == 200 and not names & {p.name for p in fresh}
    assert fresh == fresh_people(200, seed=1, exclude=names)


@pytest.mark.parametrize("kwargs", [dict(n_seen=3), dict(n_unseen=1), dict(bios_per_person=0), dict(train_fraction=1.0)])
def test_bad_sizes(kwargs):
    args = dict(n_seen=10, n_unseen=4) | kwargs
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        make_world(**args)


def test_tokenizer_is_deterministic_and_round_trips(world, tmp_path):
    pytest.importorskip("tokenizers", reason="the tour's tokenizer needs the tokenizers package")
    from fusedlm.tour.tokenizer import EOS, MASK, PAD, train_tokenizer

    a = train_tokenizer(world.texts(), vocab_size=320, n_sentinels=8)
    b = train_tokenizer(world.texts(), vocab_size=320, n_sentinels=8)
    assert a.backend.to_str() == b.backend.to_str()
    assert a.vocab_size == 320
    assert [a.backend.id_to_token(i) for i in (PAD, EOS, MASK)] == ["<pad>", "</s>", "<mask>"]
    assert a.backend.id_to_token(319) == "<extra_id_0>" and a.backend.id_to_token(312) == "<extra_id_7>"
    for text in world.store + [q.question for q in world.qa["unseen"]]:
        assert a.decode(a.encode(text)) == text
    a.save(str(tmp_path / "tokenizer.json"))
    assert (tmp_path / "tokenizer.json").stat().st_size > 0
