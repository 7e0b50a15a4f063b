"""The tour's synthetic world: invented people with a birth city, a birth year and a job, generated
from a seed (nothing downloaded), and every text the tour trains or tests on, made from them.

    w = make_world(n_seen=120, n_unseen=60, seed=0)
    w.corpus          # pretraining text: biographies of the seen people only (several paraphrases each)
    w.store           # the document store: one passage per person, seen and unseen
    w.qa["train"]     # question/answer pairs (SFT); also "valid" (calibration), "seen", "unseen" (tests)
    w.preferences     # (prompt, chosen = the true answer, rejected = a fabricated one of the same kind)

People are split into *seen* (their facts are in the pretraining corpus) and *unseen* (their facts are
only in the store): a model can know the first and can only retrieve the second. Names are made of
syllables, so they are new to every model, and :func:`fresh_people` makes more, never equal to the
world's, for tasks that must be solved from the context alone (reading, extraction).
"""
from __future__ import annotations

import dataclasses
import random

CITIES = ("Arvela", "Brindor", "Calmuth", "Dorvane", "Elsmere", "Fennick", "Galdra", "Hollin",
          "Istrava", "Jorrow", "Kelmar", "Lunden", "Morvik", "Nesset", "Oskara", "Pellin")
COUNTRIES = ("Norland", "Estmark", "Sudria", "Wenlow")
JOBS = ("baker", "pilot", "painter", "farmer", "doctor", "teacher", "sailor", "weaver",
        "miner", "singer", "tailor", "lawyer")
YEARS = tuple(range(1920, 2000))
ATTRIBUTES = ("city", "year", "job")

# Name parts: every first name is two syllables, every last name two or three, from disjoint lists,
# so a name never equals a city or a job.
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "tr", "st")
_NUCLEI = ("a", "e", "i", "o", "u", "ai", "ou")
_CODAS = ("", "", "n", "r", "s", "l", "th")

# Paraphrases of each fact (the corpus' biographies draw from them).
FACT_TEMPLATES = {
    "city": ("{name} was born in {city}.", "{name} comes from the city of {city}.", "The birthplace of {name} is {city}."),
    "year": ("{name} was born in {year}.", "{name} came into the world in {year}.", "The birth year of {name} is {year}."),
    "job": ("{name} works as a {job}.", "{name} earns a living as a {job}.", "By trade, {name} is a {job}."),
}
PASSAGE = "{name} was born in {city} in {year} and works as a {job}."
QUESTIONS = {"city": "Where was {name} born?", "year": "In which year was {name} born?", "job": "What is the job of {name}?"}


@dataclasses.dataclass(frozen=True)
class Person:
    name: str
    city: str
    year: int
    job: str

    def value(self, attribute: str) -> str:
        return str(getattr(self, attribute))

    def passage(self) -> str:
        """The store's passage: every fact about the person in one sentence."""
        return PASSAGE.format(**dataclasses.asdict(self))


@dataclasses.dataclass(frozen=True)
class QA:
    question: str
    answer: str
    person: str  # the name the question is about
    attribute: str  # city | year | job
    seen: bool  # the person's facts are in the pretraining corpus


@dataclasses.dataclass
class World:
    seed: int
    seen: list[Person]
    unseen: list[Person]
    city_country: dict[str, str]
    corpus: list[str]  # pretraining documents (biographies of seen people, city facts)
    store: list[str]  # the document store: one passage per person (seen and unseen)
    qa: dict[str, list[QA]]  # train | valid | seen | unseen
    instructions: list[tuple[str, str]]  # (prompt, response): "Tell me about X." -> a biography
    preferences: list[tuple[str, str, str]]  # (question, chosen, rejected)

    @property
    def people(self) -> list[Person]:
        return self.seen + self.unseen

    def names(self) -> set[str]:
        """Every name the world uses (to keep fresh people apart from it)."""
        return {p.name for p in self.seen + self.unseen}

    def texts(self) -> list[str]:
        """Every text of the world (what the tokenizer is trained on)."""
        qa = [f"{q.question} {q.answer}" for split in self.qa.values() for q in split]
        return self.corpus + self.store + qa + [f"{p} {r}" for p, r in self.instructions]


def _syllable(rng: random.Random) -> str:
    return rng.choice(_ONSETS) + rng.choice(_NUCLEI) + rng.choice(_CODAS)


def _name(rng: random.Random) -> str:
    first = _syllable(rng) + _syllable(rng)
    last = "".join(_syllable(rng) for _ in range(rng.choice((2, 3))))
    return f"{first.capitalize()} {last.capitalize()}"


def _person(rng: random.Random, name: str) -> Person:
    return Person(name, rng.choice(CITIES), rng.choice(YEARS), rng.choice(JOBS))


def fresh_people(n: int, seed: int, exclude: set[str] = frozenset()) -> list[Person]:
    """n new people (seeded), none named as any in `exclude` nor as each other, and no name the
    start of another ("Vira Dol" vs "Vira Doltas"), so a name found in a text means that person."""
    rng, out = random.Random(f"fresh-{seed}"), []
    taken: dict[str, list[str]] = {}  # first name -> last names
    for name in exclude:
        first, _, last = name.partition(" ")
        taken.setdefault(first, []).append(last)
    while len(out) < n:
        name = _name(rng)
        first, _, last = name.partition(" ")
        lasts = taken.setdefault(first, [])
        if not any(last.startswith(x) or x.startswith(last) for x in lasts):
            lasts.append(last)
            out.append(_person(rng, name))
    return out


def biography(p: Person, rng: random.Random) -> str:
    """The person's three facts, each in a random paraphrase, in a random order."""
    facts = [rng.choice(FACT_TEMPLATES[a]).format(**dataclasses.asdict(p)) for a in ATTRIBUTES]
    rng.shuffle(facts)
    return " ".join(facts)


def fabricate(p: Person, attribute: str, rng: random.Random) -> str:
    """A wrong value of the same kind (another city, year or job)."""
    pool = {"city": CITIES, "year": YEARS, "job": JOBS}[attribute]
    return str(rng.choice([v for v in pool if str(v) != p.value(attribute)]))


def questions(people: list[Person], seen: bool) -> list[QA]:
    return [QA(QUESTIONS[a].format(name=p.name), p.value(a), p.name, a, seen) for p in people for a in ATTRIBUTES]


def make_world(n_seen: int = 120, n_unseen: int = 60, *, bios_per_person: int = 4, train_fraction: float = 0.5,
               seed: int = 0) -> World:
    """A world of n_seen + n_unseen people, the same for the same arguments.

    Seen people are split by person: `train_fraction` of them give the SFT questions ("train"),
    the rest the test questions ("seen"); unseen people are split in two, half for calibration
    ("valid", with an equal number of seen-test people's questions held back from "seen"), half for
    the test ("unseen"). So no test question is trained on or calibrated on."""
    if n_seen < 4 or n_unseen < 2:
        raise ValueError(f"a world needs n_seen >= 4 and n_unseen >= 2, got {n_seen} and {n_unseen}")
    if bios_per_person < 1:
        raise ValueError(f"bios_per_person must be >= 1, got {bios_per_person}")
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
    rng = random.Random(seed)
    people = fresh_people(n_seen + n_unseen, seed)
    seen, unseen = people[:n_seen], people[n_seen:]
    city_country = {c: rng.choice(COUNTRIES) for c in CITIES}

    corpus = [biography(p, rng) for _ in range(bios_per_person) for p in seen]
    corpus += [f"{c} is a city in {k}." for c, k in city_country.items()]
    rng.shuffle(corpus)
    store = [p.passage() for p in people]

    n_train = max(1, round(n_seen * train_fraction))
    seen_test = seen[n_train:]
    n_valid_seen = len(seen_test) // 2
    half = len(unseen) // 2
    qa = {
        "train": questions(seen[:n_train], True),
        "valid": questions(seen_test[:n_valid_seen], True) + questions(unseen[:half], False),
        "seen": questions(seen_test[n_valid_seen:], True),
        "unseen": questions(unseen[half:], False),
    }
    instructions = [(f"Tell me about {p.name}.", biography(p, rng)) for p in seen[:n_train]]
    preferences = [(q.question, q.answer, fabricate(_by_name(seen, q.person), q.attribute, rng)) for q in qa["train"]]
    return World(seed, seen, unseen, city_country, corpus, store, qa, instructions, preferences)


def _by_name(people: list[Person], name: str) -> Person:
    return next(p for p in people if p.name == name)
