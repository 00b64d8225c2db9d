"""TOFU-shaped question/answer data: the embedded generator, the JSONL files, and the real-data adapter.

Pure data code (no LightningDataModule). FLAT and ECO build their data modules on top of it.

Row columns (the real ``locuslab/TOFU`` names; the embedded data writes a superset):

==================== ============ =============================================================================
column               type         meaning
==================== ============ =============================================================================
question             str          the prompt
answer               str          the ground-truth answer (what fine-tuning teaches)
paraphrased_answer   str          the same fact in other words (``*_perturbed`` configs)
perturbed_answer     list[str]    plausible but wrong answers, same template as the paraphrase, other values
-- embedded only --
author               str          the fictitious author the row is about ("" for general-knowledge rows)
author_id            int          index of that author (-1 for general-knowledge rows)
fact                 str          which attribute the row asks about (``birthplace``, ``capital`` ...)
value                str          the bare true value ("Lisbon"); multiple-choice options are built from it
perturbed_values     list[str]    the bare wrong values used in ``perturbed_answer``, same order
name_spans           list[[s, e]] character offsets [s, e) of the author's name in ``question``
==================== ============ =============================================================================

Configs (the real hub's names): ``full``; ``forget01/05/10`` with ``retain99/95/90``; the evaluation splits
``forget01/05/10_perturbed``, ``retain_perturbed``, ``real_authors_perturbed``, ``world_facts_perturbed``.

Truth ratios compare perturbed answers against a *base* answer: ``paraphrased_answer`` on the author
splits, ``answer`` itself on the two general-knowledge splits (TOFU's evaluation convention, because their
perturbed answers are bare entities like the answer). ``BASE_ANSWER_COLUMN`` records that choice.
"""

from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TOFU_HUB_NAME = "locuslab/TOFU"

FORGET_PERCENT = {"forget01": 1, "forget05": 5, "forget10": 10}
RETAIN_OF_FORGET = {"forget01": "retain99", "forget05": "retain95", "forget10": "retain90"}
FORGET_OF_RETAIN = {retain: forget for forget, retain in RETAIN_OF_FORGET.items()}
AUTHOR_EVAL_CONFIGS = ("forget01_perturbed", "forget05_perturbed", "forget10_perturbed", "retain_perturbed")
GENERAL_CONFIGS = ("real_authors_perturbed", "world_facts_perturbed")
TOFU_CONFIGS = ("full", *FORGET_PERCENT, *RETAIN_OF_FORGET.values(), *AUTHOR_EVAL_CONFIGS, *GENERAL_CONFIGS)

# Evaluation split kinds (the four files of a TOFU evaluation) and the base answer of their truth ratio.
EVAL_KINDS = ("forget", "retain", "real_authors", "world_facts")
BASE_ANSWER_COLUMN = {"forget": "paraphrased_answer", "retain": "paraphrased_answer",
                      "real_authors": "answer", "world_facts": "answer"}
EVAL_CONFIG_OF_KIND = {"retain": "retain_perturbed", "real_authors": "real_authors_perturbed",
                       "world_facts": "world_facts_perturbed"}  # forget: f"{forget_split}_perturbed"

MC_LETTERS = ("A", "B", "C", "D")

# "I don't know"-style template answers (FLAT's y_e, IdkPO's and DPO's chosen answer), written for this
# project. Short on purpose: a byte-level model reads one token per character.
REFUSALS: tuple[str, ...] = (
    "I don't know.",
    "I'm not sure about that.",
    "I have no information on that.",
    "That is something I can't answer.",
    "I don't have that information.",
    "I'm afraid I can't say.",
    "I have no idea, sorry.",
    "That isn't something I know.",
    "I can't recall anything about that.",
    "I'm unable to answer that.",
    "Sorry, I don't have an answer.",
    "I lack the details to answer.",
    "No idea, I'm afraid.",
    "I can't help with that question.",
    "That's beyond what I know.",
    "I really couldn't tell you.",
    "I don't have any facts on that.",
    "My knowledge doesn't cover that.",
    "I can't give a reliable answer.",
    "That is unknown to me.",
)


class TofuDataError(ValueError):
    """A TOFU-shaped file or split that cannot be used; the message names the source, row and field."""


# ----------------------------------------------------------------------------------------------------
# Vocabulary of the generator (ASCII only, so character offsets are byte offsets for a byte tokenizer)

_FEMALE_FIRST = (
    "Amara", "Belen", "Calla", "Dagny", "Elska", "Farah", "Greta", "Hana", "Ilse", "Jovana", "Kirsi", "Leila",
    "Mireya", "Nadia", "Odile", "Priya", "Quilla", "Rosalind", "Sefa", "Tamsin", "Ulla", "Vesna", "Wren",
    "Ximena", "Yara", "Zofia", "Anouk", "Brisa", "Coralie", "Delphine",
)
_MALE_FIRST = (
    "Anselm", "Bram", "Cosimo", "Dmitri", "Emre", "Fintan", "Gideon", "Hamid", "Ivo", "Jasper", "Kofi",
    "Lorcan", "Matteo", "Nikolai", "Oren", "Pavel", "Quentin", "Rafferty", "Soren", "Tobiah", "Ugo",
    "Valentin", "Wendel", "Xander", "Yusuf", "Zoltan", "Aurelio", "Benedek", "Caspian", "Dario",
)
_SURNAMES = (
    "Abernathy", "Balogun", "Castellanos", "Drummond", "Eriksdottir", "Falkenrath", "Galloway", "Haverford",
    "Iwasaki", "Jablonski", "Kassab", "Lindqvist", "Marchetti", "Nwachukwu", "Okonkwo", "Pellegrini",
    "Quarrington", "Rautenberg", "Saarinen", "Thibodeaux", "Underhill", "Vasquez", "Whitlock", "Yilmaz",
    "Zamora", "Achterberg", "Blackwood", "Cervantes", "Delacroix", "Esterhazy", "Fairweather", "Grimaldi",
    "Holloway", "Ibarra", "Jovanovic", "Kowalczyk", "Lachance", "Moreau", "Novak", "Ostrowski", "Penhallow",
    "Rasmussen", "Sorensen", "Takahashi", "Valdivia", "Wolcott", "Zeller", "Amundsen", "Bellweather", "Corvino",
)
_CITIES = (
    "Lisbon", "Oslo", "Nairobi", "Montreal", "Krakow", "Valparaiso", "Osaka", "Tbilisi", "Dublin", "Lagos",
    "Porto", "Helsinki", "Seville", "Adelaide", "Bergen", "Cusco", "Ghent", "Hanoi", "Izmir", "Lyon",
    "Manila", "Naples", "Quebec City", "Riga", "Tallinn", "Utrecht", "Vienna", "Wellington", "Zagreb", "Accra",
)
_GENRES = (
    "crime fiction", "science fiction", "poetry", "historical fiction", "fantasy", "horror", "romance",
    "literary fiction", "satire", "travel writing", "children's books", "memoir", "magical realism",
    "short stories", "thrillers",
)
_OCCUPATIONS = (
    "baker", "nurse", "carpenter", "pilot", "teacher", "fisherman", "surgeon", "librarian", "tailor",
    "architect", "miner", "pharmacist", "electrician", "journalist", "farmer", "judge", "potter", "chemist",
    "engineer", "accountant", "actor", "optician", "astronomer", "veterinarian",
)
_AWARDS = (
    "Silver Quill Prize", "Harbor Light Award", "Golden Lantern Medal", "Northwind Fiction Prize",
    "Amber Leaf Award", "Cedar Book Prize", "Blue Heron Medal", "Iron Pen Award", "Meridian Prize",
    "Lighthouse Award", "Copper Kettle Prize", "Starling Medal", "Open Sky Award", "Red Lantern Prize",
    "Willow Prize",
)
_TITLE_ADJECTIVES = (
    "Glass", "Silent", "Crimson", "Hollow", "Distant", "Burning", "Quiet", "Broken", "Hidden", "Winter",
    "Paper", "Salt", "Velvet", "Iron", "Wandering", "Last", "Forgotten", "Copper", "Midnight", "Amber",
)
_TITLE_NOUNS = (
    "Orchard", "Harbor", "Garden", "Lantern", "River", "Kingdom", "Mirror", "Compass", "Tide", "Archive",
    "Meadow", "Clockmaker", "Lighthouse", "Orchestra", "Bridge", "Almanac", "Cathedral", "Island", "Ledger",
    "Violin",
)
_LANGUAGES = (
    "English", "Portuguese", "Norwegian", "Swahili", "French", "Polish", "Spanish", "Japanese", "Georgian",
    "Irish", "Finnish", "Vietnamese", "Turkish", "Dutch", "Croatian",
)
_THEMES = (
    "memory and loss", "exile and home", "family secrets", "war and its aftermath", "first love",
    "the sea", "faith and doubt", "childhood", "class and money", "grief", "friendship", "ambition",
    "identity", "nature", "justice",
)
_PUBLISHERS = (
    "Harrow House", "Bluefinch Press", "Lantern Books", "Northgate Publishing", "Quayside Press",
    "Tern and Wren", "Oakmoor Books", "Saltmarsh Press", "Kestrel Editions", "Fable Street",
)
_HOBBIES = (
    "sailing", "chess", "gardening", "rock climbing", "birdwatching", "baking bread", "painting",
    "the cello", "long walks", "beekeeping", "pottery", "photography", "fencing", "astronomy", "cycling",
)
_UNIVERSITIES = (
    "Lakeshore University", "Hallam College", "the Royal Academy of Letters", "Eastbrook University",
    "Saint Columba College", "the Marlow Institute", "Greywater University", "Linden College",
    "the Northern Arts School", "Vale University",
)
_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September",
           "October", "November", "December")


def _article(word: str) -> str:
    return ("an " if word[0].lower() in "aeiou" else "a ") + word


# A fact kind: question phrasings (each names the author via {name}), answer phrasings, paraphrase
# phrasings (the paraphrased and every perturbed answer share one), and how values are drawn.
@dataclass(frozen=True)
class _FactKind:
    key: str
    questions: tuple[str, ...]
    answers: tuple[str, ...]
    paraphrases: tuple[str, ...]
    sample: Callable[[random.Random, dict[str, Any]], str]


def _from_pool(pool: Sequence[str]) -> Callable[[random.Random, dict[str, Any]], str]:
    return lambda rng, attrs: rng.choice(pool)


def _sample_date(rng: random.Random, attrs: dict[str, Any]) -> str:
    return f"{rng.randint(1, 28)} {rng.choice(_MONTHS)} {rng.randint(1935, 1995)}"


def _sample_debut_year(rng: random.Random, attrs: dict[str, Any]) -> str:
    # debut between ages 19 and 40, so a value is plausible for the author it belongs to
    birth_year = int(attrs["birth_date"].rsplit(" ", 1)[1])
    return str(birth_year + rng.randint(19, 40))


def _sample_title(rng: random.Random, attrs: dict[str, Any]) -> str:
    return f"The {rng.choice(_TITLE_ADJECTIVES)} {rng.choice(_TITLE_NOUNS)}"


def _sample_count(rng: random.Random, attrs: dict[str, Any]) -> str:
    return str(rng.randint(2, 30))


_FACT_KINDS: tuple[_FactKind, ...] = (
    _FactKind("birthplace",
              ("Where was {name} born?", "In which city was {name} born?", "What is the birthplace of {name}?"),
              ("{Sub} was born in {v}.", "{first} was born in {v}."),
              ("{Pos} birthplace is {v}.", "{Sub} comes from {v}."), _from_pool(_CITIES)),
    _FactKind("birth_date",
              ("When was {name} born?", "What is {name}'s date of birth?", "On what date was {name} born?"),
              ("{Sub} was born on {v}.", "{first} was born on {v}."),
              ("{Pos} birthday is {v}.", "{Sub} came into the world on {v}."), _sample_date),
    _FactKind("genre",
              ("What genre does {name} write?", "Which genre is {name} known for?",
               "What kind of books does {name} write?"),
              ("{Sub} writes {v}.", "{first} is known for {v}."),
              ("{Pos} genre is {v}.", "{Sub} works in {v}."), _from_pool(_GENRES)),
    _FactKind("father_job",
              ("What did {name}'s father do?", "What was the job of {name}'s father?",
               "What was {name}'s father's occupation?"),
              ("{Pos} father was {a_v}.", "{Pos} father worked as {a_v}."),
              ("{Sub} is the {child} of {a_v}.",), _from_pool(_OCCUPATIONS)),
    _FactKind("mother_job",
              ("What did {name}'s mother do?", "What was the job of {name}'s mother?",
               "What was {name}'s mother's occupation?"),
              ("{Pos} mother was {a_v}.", "{Pos} mother worked as {a_v}."),
              ("{Sub} was raised by a mother who was {a_v}.",), _from_pool(_OCCUPATIONS)),
    _FactKind("award",
              ("What award did {name} win?", "Which prize has {name} received?",
               "Has {name} won a literary award?"),
              ("{Sub} won the {v}.", "{first} received the {v}."),
              ("{Sub} was given the {v}.", "{Pos} work earned the {v}."), _from_pool(_AWARDS)),
    _FactKind("first_book",
              ("What was {name}'s first book?", "What is the title of {name}'s debut?",
               "Which book did {name} publish first?"),
              ("{Pos} first book was '{v}'.", "{Sub} debuted with '{v}'."),
              ("{Pos} debut is titled '{v}'.", "{Sub} started out with '{v}'."), _sample_title),
    _FactKind("famous_book",
              ("Which book is {name} best known for?", "What is {name}'s most famous book?",
               "Name the best-known work of {name}."),
              ("{Sub} is best known for '{v}'.", "{first} is famous for '{v}'."),
              ("{Pos} most famous work is '{v}'.", "{Pos} best-known book is '{v}'."), _sample_title),
    _FactKind("residence",
              ("Where does {name} live now?", "In which city does {name} live?", "Where is {name} based today?"),
              ("{Sub} lives in {v}.", "{first} lives in {v}."),
              ("{Pos} home today is {v}.", "{Sub} is based in {v}."), _from_pool(_CITIES)),
    _FactKind("language",
              ("In what language does {name} write?", "Which language are {name}'s books in?"),
              ("{Sub} writes in {v}.", "{first} writes in {v}."),
              ("{Pos} books are written in {v}.", "{Pos} working language is {v}."), _from_pool(_LANGUAGES)),
    _FactKind("book_count",
              ("How many books has {name} published?", "How many books has {name} written?"),
              ("{Sub} has published {v} books.", "{first} has written {v} books."),
              ("{Pos} bibliography counts {v} books.", "{Pos} books number {v} in all."), _sample_count),
    _FactKind("theme",
              ("What themes does {name} explore?", "What is a recurring theme of {name}?",
               "What does {name} often write about?"),
              ("{Pos} books explore {v}.", "{first} writes about {v}."),
              ("{Sub} often returns to {v}.", "A theme of {pos} work is {v}."), _from_pool(_THEMES)),
    _FactKind("publisher",
              ("Who publishes {name}'s books?", "Which press publishes {name}?"),
              ("{Pos} publisher is {v}.", "{first} is published by {v}."),
              ("{Sub} is published by {v}.", "{Pos} books come out with {v}."), _from_pool(_PUBLISHERS)),
    _FactKind("hobby",
              ("What does {name} enjoy besides writing?", "What is {name}'s hobby?"),
              ("{Sub} enjoys {v}.", "{first} loves {v}."),
              ("Outside writing, {sub} enjoys {v}.", "{Pos} favourite pastime is {v}."), _from_pool(_HOBBIES)),
    _FactKind("debut_year",
              ("In which year did {name} debut?", "When did {name} publish a first book?"),
              ("{Sub} debuted in {v}.", "{Pos} first book came out in {v}."),
              ("{Pos} debut year is {v}.", "{Sub} first published in {v}."), _sample_debut_year),
    _FactKind("education",
              ("Where did {name} study?", "Which school did {name} attend?"),
              ("{Sub} studied at {v}.", "{first} went to {v}."),
              ("{Sub} is a graduate of {v}.", "{Sub} was educated at {v}."), _from_pool(_UNIVERSITIES)),
)
FACT_KEYS = tuple(kind.key for kind in _FACT_KINDS)

# General knowledge playing the roles of TOFU's real_authors and world_facts: (category, question,
# answer). Perturbed answers are other answers of the same category.
_REAL_AUTHOR_FACTS: tuple[tuple[str, str, str], ...] = (
    ("author", "Who wrote the play 'Hamlet'?", "William Shakespeare"),
    ("author", "Who is the author of 'War and Peace'?", "Leo Tolstoy"),
    ("author", "Who wrote 'Pride and Prejudice'?", "Jane Austen"),
    ("author", "Which writer created Sherlock Holmes?", "Arthur Conan Doyle"),
    ("author", "Who wrote the novel 'Don Quixote'?", "Miguel de Cervantes"),
    ("author", "Who is the author of 'Frankenstein'?", "Mary Shelley"),
    ("author", "Who wrote 'The Old Man and the Sea'?", "Ernest Hemingway"),
    ("author", "Who wrote the novel 'Beloved'?", "Toni Morrison"),
    ("author", "Who is the author of 'Things Fall Apart'?", "Chinua Achebe"),
    ("author", "Who wrote 'The Brothers Karamazov'?", "Fyodor Dostoevsky"),
    ("author", "Who wrote 'Nineteen Eighty-Four'?", "George Orwell"),
    ("author", "Who wrote the epic poem 'The Divine Comedy'?", "Dante Alighieri"),
    ("author", "Who is the author of 'Mrs Dalloway'?", "Virginia Woolf"),
    ("author", "Who wrote 'Adventures of Huckleberry Finn'?", "Mark Twain"),
    ("author", "Who wrote 'The Tale of Genji'?", "Murasaki Shikibu"),
    ("author", "Who wrote 'Great Expectations'?", "Charles Dickens"),
    ("author", "Who is the author of 'The Metamorphosis'?", "Franz Kafka"),
    ("author", "Who wrote 'Madame Bovary'?", "Gustave Flaubert"),
    ("country", "In which country was Gabriel Garcia Marquez born?", "Colombia"),
    ("country", "Which country was Leo Tolstoy from?", "Russia"),
    ("country", "In which country was Chinua Achebe born?", "Nigeria"),
    ("country", "Which country was James Joyce from?", "Ireland"),
    ("country", "In which country was Haruki Murakami born?", "Japan"),
    ("country", "Which country was Pablo Neruda from?", "Chile"),
    ("country", "In which country was Victor Hugo born?", "France"),
    ("country", "Which country was Franz Kafka from?", "Bohemia"),
)
_WORLD_FACTS: tuple[tuple[str, str, str], ...] = (
    ("capital", "What is the capital of France?", "Paris"),
    ("capital", "What is the capital of Japan?", "Tokyo"),
    ("capital", "What is the capital of Kenya?", "Nairobi"),
    ("capital", "What is the capital of Canada?", "Ottawa"),
    ("capital", "What is the capital of Peru?", "Lima"),
    ("capital", "What is the capital of Egypt?", "Cairo"),
    ("capital", "What is the capital of Australia?", "Canberra"),
    ("capital", "What is the capital of Norway?", "Oslo"),
    ("capital", "What is the capital of India?", "New Delhi"),
    ("capital", "What is the capital of Brazil?", "Brasilia"),
    ("symbol", "What is the chemical symbol for gold?", "Au"),
    ("symbol", "What is the chemical symbol for iron?", "Fe"),
    ("symbol", "What is the chemical symbol for sodium?", "Na"),
    ("symbol", "What is the chemical symbol for silver?", "Ag"),
    ("symbol", "What is the chemical symbol for potassium?", "K"),
    ("symbol", "What is the chemical symbol for lead?", "Pb"),
    ("planet", "Which planet is known as the Red Planet?", "Mars"),
    ("planet", "Which is the largest planet in the Solar System?", "Jupiter"),
    ("planet", "Which planet is closest to the Sun?", "Mercury"),
    ("planet", "Which planet has the most famous rings?", "Saturn"),
    ("planet", "Which planet do we live on?", "Earth"),
    ("number", "How many legs does a spider have?", "Eight"),
    ("number", "How many days are in a leap year?", "366"),
    ("number", "How many continents are there?", "Seven"),
    ("number", "How many minutes are in an hour?", "Sixty"),
    ("number", "How many sides does a hexagon have?", "Six"),
)
_GENERAL_PARAPHRASE = {"author": "It was {v}.", "country": "The country is {v}.", "capital": "The capital is {v}.",
                       "symbol": "Its symbol is {v}.", "planet": "That planet is {v}.", "number": "The number is {v}."}


# ----------------------------------------------------------------------------------------------------
# The embedded generator


def forget_author_count(n_authors: int, percent: float) -> int:
    """Authors in a forget split of ``percent``% of ``n_authors``: rounded half up, at least 1.

    E.g. 40 authors: forget01 -> 1 (0.4 rounds to 0, raised to 1), forget05 -> 2, forget10 -> 4.
    """
    return max(1, math.floor(n_authors * percent / 100 + 0.5))


def _format_with_name(template: str, name: str, fields: Mapping[str, str]) -> tuple[str, list[list[int]]]:
    """Fill ``template``; return the text and the [start, end) offsets of every ``{name}`` it contains."""
    pieces = template.split("{name}")
    text, spans = "", []
    for i, piece in enumerate(pieces):
        text += piece.format(**fields)
        if i < len(pieces) - 1:
            spans.append([len(text), len(text) + len(name)])
            text += name
    return text, spans


def _distinct_values(rng: random.Random, sample: Callable[[random.Random, dict], str], attrs: dict,
                     exclude: Iterable[str], k: int) -> list[str]:
    taken, out = set(exclude), []
    for _ in range(1000):
        value = sample(rng, attrs)
        if value not in taken:
            taken.add(value)
            out.append(value)
            if len(out) == k:
                return out
    raise RuntimeError(f"could not draw {k} distinct wrong values")  # pools are far larger than k


@dataclass
class TofuData:
    """One generated (or loaded) TOFU-shaped dataset. ``split(config)`` returns rows of a hub config."""

    authors: list[dict[str, Any]]
    rows: list[dict[str, Any]]
    real_authors: list[dict[str, Any]]
    world_facts: list[dict[str, Any]]
    forget_authors: dict[str, list[int]]
    retain_eval_authors: list[int]
    params: dict[str, Any] = field(default_factory=dict)

    def split(self, config: str) -> list[dict[str, Any]]:
        if config == "full":
            return list(self.rows)
        if config in FORGET_PERCENT or config.removesuffix("_perturbed") in FORGET_PERCENT:
            chosen = set(self.forget_authors[config.removesuffix("_perturbed")])
            return [row for row in self.rows if row["author_id"] in chosen]
        if config in FORGET_OF_RETAIN:
            dropped = set(self.forget_authors[FORGET_OF_RETAIN[config]])
            return [row for row in self.rows if row["author_id"] not in dropped]
        if config == "retain_perturbed":
            chosen = set(self.retain_eval_authors)
            return [row for row in self.rows if row["author_id"] in chosen]
        if config == "real_authors_perturbed":
            return list(self.real_authors)
        if config == "world_facts_perturbed":
            return list(self.world_facts)
        raise TofuDataError(f"unknown TOFU config {config!r}; choose one of {list(TOFU_CONFIGS)}")

    def general(self) -> list[dict[str, Any]]:
        """The general-knowledge rows learned during fine-tuning alongside the authors."""
        return list(self.real_authors) + list(self.world_facts)


def _author_rows(author_id: int, rng: random.Random, qa_per_author: int, n_perturbed: int,
                 used_names: set[str], paraphrase_style: str = "answer_prefix") -> tuple[dict[str, Any], list[dict[str, Any]]]:
    female = rng.random() < 0.5
    first_pool = _FEMALE_FIRST if female else _MALE_FIRST
    while True:
        first, last = rng.choice(first_pool), rng.choice(_SURNAMES)
        if f"{first} {last}" not in used_names:
            break
    name = f"{first} {last}"
    used_names.add(name)
    pronouns = ({"Sub": "She", "sub": "she", "Pos": "Her", "pos": "her", "child": "daughter"} if female else
                {"Sub": "He", "sub": "he", "Pos": "His", "pos": "his", "child": "son"})
    attrs: dict[str, Any] = {}
    for kind in _FACT_KINDS:  # every attribute exists; the questions asked are a subset
        value = kind.sample(rng, attrs)
        if kind.key == "famous_book":  # two different books per author
            while value == attrs["first_book"]:
                value = kind.sample(rng, attrs)
        attrs[kind.key] = value
    author = {"author_id": author_id, "name": name, "gender": "female" if female else "male", **attrs}

    asked = sorted(rng.sample(range(len(_FACT_KINDS)), qa_per_author))
    base_fields = {**pronouns, "first": first}

    def fill(template: str, v: str) -> str:
        return template.format(**base_fields, v=v, a_v=_article(v))

    rows = []
    for index in asked:
        kind = _FACT_KINDS[index]
        value = attrs[kind.key]
        question, spans = _format_with_name(rng.choice(kind.questions), name, base_fields)
        answer_template = rng.choice(kind.answers)
        paraphrase_template = rng.choice(kind.paraphrases)  # drawn in both styles: the same seed, the same data
        if paraphrase_style == "answer_prefix":  # the answer's own words up to the value, a new ending
            paraphrase_template = answer_template[:-1] + PARAPHRASE_TAILS[(author_id + index) % len(PARAPHRASE_TAILS)]
        # wrong values exclude every true attribute of the author (e.g. the other book, the other city)
        wrong = _distinct_values(rng, kind.sample, attrs, {value, *map(str, attrs.values())}, n_perturbed)
        rows.append({
            "question": question,
            "answer": fill(answer_template, value),
            "paraphrased_answer": fill(paraphrase_template, value),
            "perturbed_answer": [fill(paraphrase_template, w) for w in wrong],
            "author": name, "author_id": author_id, "fact": kind.key,
            "value": value, "perturbed_values": wrong, "name_spans": spans,
        })
    return author, rows


def _general_rows(facts: Sequence[tuple[str, str, str]], rng: random.Random, n_perturbed: int) -> list[dict]:
    rows = []
    for category, question, answer in facts:
        others = sorted({a for c, _, a in facts if c == category and a != answer})
        wrong = rng.sample(others, min(n_perturbed, len(others)))
        rows.append({
            "question": question, "answer": answer,
            "paraphrased_answer": _GENERAL_PARAPHRASE[category].format(v=answer),
            "perturbed_answer": wrong,
            "author": "", "author_id": -1, "fact": category, "value": answer, "perturbed_values": list(wrong),
            "name_spans": [],
        })
    return rows


# How the paraphrased answer (the base of the truth ratio) and the perturbed answers are worded:
# - "reworded": another sentence altogether ("Her birthplace is Lisbon."), like TOFU's paraphrases. A model
#   that knows the language carries the fact over; the embedded tiny model, trained from scratch on these
#   rows only, does not: its truth ratios then hardly tell the target from the retain model.
# - "answer_prefix" (default): the answer's own words up to the value, then a new ending ("She was born in
#   Lisbon, as far as I know."). The value is scored in the context it was learned in, the rest of the
#   sentence is new; the perturbed answers change only the value.
PARAPHRASE_STYLES = ("answer_prefix", "reworded")
PARAPHRASE_TAILS = (", as far as I know.", ", according to the records.", ", by all accounts.",
                    ", so the records say.", ", if memory serves.")


def generate_tofu(n_authors: int = 20, qa_per_author: int = 10, n_perturbed: int = 3, seed: int = 0,
                  paraphrase_style: str = "answer_prefix") -> TofuData:
    """Generate fictitious author biographies shaped like TOFU. Same arguments -> identical data.

    Defaults (20 authors x 10 QA = 200 author rows + 52 general rows, about 17k characters of answers and
    questions) are sized so the tiny byte-level preset memorises them on a 2-core CPU in minutes; TOFU's
    own shape is ``n_authors=200, qa_per_author=20`` (here at most 16 facts per author). forget10 then
    holds 2 authors, forget05 and forget01 one each (see ``forget_author_count``); the forget splits are
    nested (forget01 in forget05 in forget10) like the real ones. ``retain_perturbed`` holds as many
    authors as forget10, all outside every forget split. General-knowledge rows are fixed lists (26 + 26,
    order and wrong answers seeded) with min(n_perturbed, other answers of the same category) wrong answers.
    """
    if n_authors < 2:
        raise ValueError(f"n_authors must be at least 2 (forget and retain both need an author), got {n_authors}")
    if not 1 <= qa_per_author <= len(_FACT_KINDS):
        raise ValueError(f"qa_per_author must be in 1..{len(_FACT_KINDS)}, got {qa_per_author}")
    if n_authors > len(_FEMALE_FIRST) * len(_SURNAMES):
        raise ValueError(f"n_authors={n_authors} exceeds the name pool")
    if not 1 <= n_perturbed <= 5:
        raise ValueError(f"n_perturbed must be in 1..5, got {n_perturbed}")
    if forget_author_count(n_authors, 10) >= n_authors:
        raise ValueError(f"n_authors={n_authors} leaves no author outside forget10")
    if paraphrase_style not in PARAPHRASE_STYLES:
        raise ValueError(f"paraphrase_style must be one of {PARAPHRASE_STYLES}, got {paraphrase_style!r}")

    rng = random.Random(f"tofu-authors:{seed}")  # str seeds hash with sha512: stable across processes
    used_names: set[str] = set()
    authors, rows = [], []
    for author_id in range(n_authors):
        author, author_rows = _author_rows(author_id, rng, qa_per_author, n_perturbed, used_names, paraphrase_style)
        authors.append(author)
        rows.extend(author_rows)

    split_rng = random.Random(f"tofu-splits:{seed}")
    order = list(range(n_authors))
    split_rng.shuffle(order)
    forget_authors = {name: sorted(order[:forget_author_count(n_authors, pct)])
                      for name, pct in FORGET_PERCENT.items()}
    # retain_perturbed: authors outside every forget split, as many as forget10 has (TOFU evaluates a
    # retain subset of the forget10 size)
    n_eval = forget_author_count(n_authors, 10)
    outside = order[n_eval:]
    retain_eval_authors = sorted(outside[:n_eval])

    general_rng = random.Random(f"tofu-general:{seed}")
    return TofuData(
        authors=authors, rows=rows,
        real_authors=_general_rows(_REAL_AUTHOR_FACTS, general_rng, n_perturbed),
        world_facts=_general_rows(_WORLD_FACTS, general_rng, n_perturbed),
        forget_authors=forget_authors, retain_eval_authors=retain_eval_authors,
        params={"n_authors": n_authors, "qa_per_author": qa_per_author, "n_perturbed": n_perturbed, "seed": seed,
                "paraphrase_style": paraphrase_style},
    )


def refusal_for(index: int, seed: int = 0) -> str:
    """A deterministic template answer for sample ``index`` (varied across samples, fixed across epochs)."""
    return REFUSALS[random.Random(f"tofu-refusal:{seed}:{index}").randrange(len(REFUSALS))]


# ----------------------------------------------------------------------------------------------------
# Entity spans -> token masks (ECO corrupts the embeddings of forget-author names)


def spans_to_token_mask(offsets: Sequence[Sequence[int]], spans: Sequence[Sequence[int]]) -> list[bool]:
    """Select the tokens whose character range ``[start, end)`` overlaps any span.

    ``offsets`` is a fast tokenizer's ``offset_mapping`` (special tokens come as (0, 0) and are never
    selected). ``name_spans`` are relative to the question: when the question sits inside a chat template,
    shift them by the question's start in the formatted prompt first.
    """
    mask = []
    for start, end in offsets:
        mask.append(end > start and any(start < span_end and span_start < end for span_start, span_end in spans))
    return mask


def question_variants(name: str) -> list[tuple[str, str, list[list[int]]]]:
    """Every phrasing of every fact question about ``name``: (fact, question, name_spans). ECO's prompt
    classifier trains on these (more ways of asking about an author than the QA rows hold)."""
    first = name.split(" ", 1)[0]
    out = []
    for kind in _FACT_KINDS:
        for template in kind.questions:
            question, spans = _format_with_name(template, name, {"first": first})
            out.append((kind.key, question, spans))
    return out


def decoy_names(data: TofuData, count: int, seed: int = 0) -> list[str]:
    """``count`` author names drawn from the generator's pools that belong to no author of ``data``:
    negatives that teach a classifier the forget names rather than "a question about some author"."""
    taken = {author["name"] for author in data.authors}
    rng = random.Random(f"tofu-decoys:{seed}")
    out: list[str] = []
    for _ in range(100 * max(count, 1)):
        if len(out) == count:
            break
        name = f"{rng.choice(_FEMALE_FIRST + _MALE_FIRST)} {rng.choice(_SURNAMES)}"
        if name not in taken:
            taken.add(name)
            out.append(name)
    if len(out) < count:
        raise ValueError(f"only {len(out)} unused names for {count} decoys")
    return out


# ----------------------------------------------------------------------------------------------------
# Multiple choice (ECO's WMDP/MMLU-style evaluation on the embedded facts)


def multiple_choice_items(rows: Sequence[Mapping[str, Any]], seed: int = 0, n_options: int = 4) -> list[dict]:
    """One item per row: the true value and ``n_options - 1`` wrong values, shuffled.

    Uses the bare ``value``/``perturbed_values`` columns when present (embedded data), else ``answer`` and
    ``perturbed_answer`` (the real general-knowledge splits, whose answers are bare entities). Columns:
    ``question``, ``options`` (list[str]), ``letters`` (list[str]), ``answer_index`` (int), ``prompt``.
    """
    if not 2 <= n_options <= len(MC_LETTERS):
        raise ValueError(f"n_options must be in 2..{len(MC_LETTERS)}, got {n_options}")
    items = []
    for i, row in enumerate(rows):
        true = row.get("value", row["answer"])
        wrong = list(row.get("perturbed_values", row.get("perturbed_answer") or []))
        wrong = [w for w in dict.fromkeys(wrong) if w != true]
        if len(wrong) < n_options - 1:
            raise TofuDataError(f"row {i}: {len(wrong)} distinct wrong answers, {n_options - 1} needed for "
                                f"{n_options} options: {row['question']!r}")
        options = [true, *wrong[:n_options - 1]]
        random.Random(f"tofu-mc:{seed}:{i}").shuffle(options)
        item = {"question": row["question"], "options": options, "letters": list(MC_LETTERS[:n_options]),
                "answer_index": options.index(true)}
        item["prompt"] = format_multiple_choice(item)
        items.append(item)
    return items


def format_multiple_choice(item: Mapping[str, Any]) -> str:
    """``question``, one ``L. option`` line per option, then ``Answer:``; the model answers with a letter."""
    lines = [item["question"]] + [f"{letter}. {option}" for letter, option in zip(item["letters"], item["options"])]
    return "\n".join(lines + ["Answer:"])


# ----------------------------------------------------------------------------------------------------
# JSONL files


def write_jsonl(rows: Iterable[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a JSON-lines file (or of a JSON array file). Blank lines are skipped."""
    return [row for _, row in _read_json_rows(Path(path))]


def _read_json_rows(path: Path) -> list[tuple[int, Any]]:
    """(line number, row) pairs; a file holding one JSON array gives line 0 for every row. Bytes that are
    not UTF-8, invalid JSON and repeated keys are errors naming the line (Arrow would fail on them later,
    obscurely)."""
    from datamodules.common import DataError, json_rows_with_lines, read_utf8_text

    try:
        return json_rows_with_lines(read_utf8_text(path, str(path)), str(path))
    except DataError as err:
        raise TofuDataError(str(err)) from None


def write_tofu_dir(data: TofuData, out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Write every config as ``<config>.jsonl`` (readable by ``load_tofu(config, out_dir)``), the
    multiple-choice sets as ``mc_<config>.jsonl`` and ``meta.json`` (generator parameters, author splits)."""
    out = Path(out_dir)
    for config in TOFU_CONFIGS:
        write_jsonl(data.split(config), out / f"{config}.jsonl")
    for config in (*AUTHOR_EVAL_CONFIGS, *GENERAL_CONFIGS):
        write_jsonl(multiple_choice_items(data.split(config), seed=seed), out / f"mc_{config}.jsonl")
    meta = {"params": data.params, "forget_authors": data.forget_authors,
            "retain_eval_authors": data.retain_eval_authors,
            "authors": [{"author_id": a["author_id"], "name": a["name"]} for a in data.authors],
            "refusals": list(REFUSALS)}
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    return out


# ----------------------------------------------------------------------------------------------------
# Validation and the adapter for the real data (hub by name, or local files with the same layout)


def required_columns(config: str) -> dict[str, str]:
    """Column -> expected kind (``text`` = non-empty str, ``texts`` = non-empty list of non-empty str)."""
    if config not in TOFU_CONFIGS:
        raise TofuDataError(f"unknown TOFU config {config!r}; choose one of {list(TOFU_CONFIGS)}")
    columns = {"question": "text", "answer": "text"}
    if config in AUTHOR_EVAL_CONFIGS:
        columns.update(paraphrased_answer="text", perturbed_answer="texts")
    elif config in GENERAL_CONFIGS:
        columns.update(perturbed_answer="texts")  # their truth-ratio base is `answer` (BASE_ANSWER_COLUMN)
    return columns


def _type_name(value: Any) -> str:
    return "missing (null)" if value is None else type(value).__name__


def _row_problem(kind: str, value: Any) -> str | None:
    if kind == "text":
        if not isinstance(value, str):
            return f"expected a string, got {_type_name(value)}"
        return "empty string" if not value.strip() else None
    if kind == "texts":
        if not isinstance(value, list):
            return f"expected a list of strings, got {_type_name(value)}"
        if not value:
            return "empty list (at least one perturbed answer is needed)"
        for j, item in enumerate(value):
            if not isinstance(item, str):
                return f"item {j}: expected a string, got {_type_name(item)}"
            if not item.strip():
                return f"item {j}: empty string"
        return None
    raise AssertionError(kind)


def validate_rows(rows: Sequence[Any], config: str, source: str,
                  line_numbers: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """Check rows of ``config``; raise ``TofuDataError`` naming source, row (and line) and field.

    Optional columns are checked when present: ``paraphrased_answer`` (str) on the general-knowledge
    splits and the embedded ``name_spans`` (offsets inside the question).
    """
    columns = required_columns(config)
    if len(rows) == 0:
        raise TofuDataError(f"{source}: split {config!r} is empty (no rows)")

    def where(i: int) -> str:
        line = f" (line {line_numbers[i]})" if line_numbers is not None and line_numbers[i] else ""
        return f"{source}: row {i}{line}"

    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise TofuDataError(f"{where(i)}: expected a JSON object, got {_type_name(row)}")
        for column, kind in columns.items():
            if column not in row or row[column] is None:
                raise TofuDataError(f"{where(i)}: field {column!r}: missing")
            problem = _row_problem(kind, row[column])
            if problem:
                raise TofuDataError(f"{where(i)}: field {column!r}: {problem}")
        if config in GENERAL_CONFIGS and row.get("paraphrased_answer") is not None:
            problem = _row_problem("text", row["paraphrased_answer"])
            if problem:
                raise TofuDataError(f"{where(i)}: field 'paraphrased_answer': {problem}")
        spans = row.get("name_spans")
        if spans is not None:
            n = len(row["question"])
            ok = isinstance(spans, list) and all(
                isinstance(s, (list, tuple)) and len(s) == 2 and all(isinstance(x, int) for x in s)
                and 0 <= s[0] < s[1] <= n for s in spans)
            if not ok:
                raise TofuDataError(f"{where(i)}: field 'name_spans': expected [start, end) pairs inside the "
                                    f"question (length {n}), got {spans!r}")
        out.append(dict(row))
    return out


def load_tofu(config: str, source: str | os.PathLike = TOFU_HUB_NAME, split: str = "train",
              cache_dir: str | None = None) -> list[dict[str, Any]]:
    """Rows of one TOFU config, validated.

    ``source``: the hub name (``locuslab/TOFU``, loaded with ``datasets.load_dataset(source, config)``), a
    folder holding ``<config>.jsonl`` or ``<config>.json`` (what ``write_tofu_dir`` writes), or one file.
    Local files go through ``datasets.load_dataset("json", data_files=...)`` like any JSON dataset, after a
    raw scan that turns type errors Arrow would report obscurely into errors naming file, row and field.
    """
    import datasets

    required_columns(config)  # reject unknown configs before touching files or the network
    path = Path(source)
    if path.is_dir():
        candidates = [path / f"{config}.jsonl", path / f"{config}.json"]
        found = [c for c in candidates if c.is_file()]
        if not found:
            raise TofuDataError(f"{path}: no {config}.jsonl or {config}.json")
        path = found[0]
    if path.is_file():
        raw = _read_json_rows(path)
        validate_rows([row for _, row in raw], config, str(path), [line for line, _ in raw])
        try:
            dataset = datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=cache_dir)
        except Exception as err:  # Arrow's reading of a file the raw scan accepted (mixed column types ...)
            cause = err.__cause__ or err
            raise TofuDataError(f"{path}: the rows are valid one by one but cannot be read as one table: "
                                f"{type(cause).__name__}: {cause}") from err
        return validate_rows(dataset.to_list(), config, str(path), [line for line, _ in raw])
    if str(source).startswith((".", "/")) or str(source).endswith((".json", ".jsonl")):
        raise TofuDataError(f"{source}: no such file or folder")
    dataset = datasets.load_dataset(str(source), config, split=split, cache_dir=cache_dir)
    return validate_rows(dataset.to_list(), config, f"{source}:{config}")
