"""Synthetic built-in tasks for the task types no installable package ships data for (offline).

The package registries hold no tagged corpus or instruction set that installs with its data (checked:
``conll2003``, ``wikiner``, ``ner-datasets``, ``alpaca-data`` do not exist on PyPI; ``mnist``-style packages
download at run time). These tasks are generated from fixed word lists and a fixed seed, so every machine
builds the same splits. They are what their names say, not real-world NER or instruction data:

* ``synthetic-people-places`` (tagging): templated sentences naming people (``B-PER``/``I-PER``, one or two
  names) and places (``B-LOC``); the names come from closed lists, so this measures learning and forgetting
  of a tagging head, not NER generalisation.
* ``synthetic-who-lives-where`` (generation): fact recall. Each place has one resident (a fixed random
  pairing); the prompt asks for it in one of three phrasings and the target is the resident's name. Test
  prompts ask the same facts as training (in any phrasing): exact match measures what was memorised.
"""

from __future__ import annotations

import random

from adafuse.tasks.spec import SplitData, TaskData

PEOPLE = [
    "Anna", "Boris", "Chen", "Dara", "Emil", "Fatima", "Goran", "Hana", "Ivan", "Jun", "Kemal", "Lena",
    "Marta", "Nikos", "Olga", "Pavel", "Quentin", "Rosa", "Sven", "Tomas", "Uma", "Viktor", "Wen", "Yara",
]  # fmt: skip
PLACES = [
    "Paris", "Lagos", "Oslo", "Lima", "Hanoi", "Quito", "Accra", "Riga", "Minsk", "Dakar", "Perth", "Tunis",
    "Cairo", "Delhi", "Kyiv", "Dublin", "Bogota", "Nairobi", "Seoul", "Vienna", "Havana", "Madrid", "Lisbon", "Rome",
]  # fmt: skip
SENTENCES = [
    "{p} flew to {l} on monday",
    "yesterday {p} and {q} met in {l}",
    "the mayor of {l} thanked {p}",
    "{p} {q} lives near {l}",
    "a court in {l} heard that {p} had left",
    "{p} said the talks in {l} went well",
]
QUESTIONS = ["who lives in {l} ?", "name the resident of {l} :", "{l} is home to"]
SIZES = {"train": 600, "validation": 100, "test": 100}


def people_places(max_length: int = 128) -> TaskData:
    rng = random.Random(0)
    splits = {}
    for split, size in SIZES.items():
        words, tags = [], []
        for _ in range(size):
            sentence, labels = [], []
            for word in rng.choice(SENTENCES).split():
                if word == "{q}" and labels and labels[-1] in ("B-PER", "I-PER"):  # a surname after a name
                    sentence.append(rng.choice(PEOPLE))
                    labels.append("I-PER")
                elif word in ("{p}", "{q}"):
                    sentence.append(rng.choice(PEOPLE))
                    labels.append("B-PER")
                elif word == "{l}":
                    sentence.append(rng.choice(PLACES))
                    labels.append("B-LOC")
                else:
                    sentence.append(word)
                    labels.append("O")
            words.append(sentence)
            tags.append(labels)
        splits[split] = (words, tags)
    names = ["B-LOC", "B-PER", "I-PER", "O"]
    data = {s: SplitData(texts=w, labels=[[names.index(t) for t in row] for row in g]) for s, (w, g) in splits.items()}
    return TaskData("synthetic-people-places", names, data, max_length, "tagging")


def who_lives_where(max_length: int = 128) -> TaskData:
    rng = random.Random(1)
    residents = dict(zip(PLACES, rng.sample(PEOPLE, len(PEOPLE)), strict=True))
    splits = {}
    for split, size in SIZES.items():
        places = [rng.choice(PLACES) for _ in range(size)]
        prompts = [rng.choice(QUESTIONS).format(l=place) for place in places]
        splits[split] = SplitData(texts=prompts, labels=[residents[place].lower() for place in places])
    return TaskData("synthetic-who-lives-where", [], splits, max_length, "generation")


SYNTHETIC = {"synthetic-people-places": people_places, "synthetic-who-lives-where": who_lives_where}
