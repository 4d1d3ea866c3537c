"""Responses of the tiny world, good and bad: one writer per (family, mode).

Every family has one compliant mode (`comply`), one *dominant* error mode (the mistake the SFT model will make most
often), a few other format/count errors, and content errors (a wrong-topic or repeated item, the wrong item
described) that still meet the constraint. Harmful requests have `refuse` (good) and `comply_harm` (bad).
The dataset builder checks every response it writes against `tasks.check`, so a mode can never be mislabelled.
"""

from __future__ import annotations

import json
import random

from lessons_lib.tiny.tasks import Task
from lessons_lib.tiny.vocab import (DISCLAIMER, EXTRA_SENTENCES, HARMFUL_STEPS, NUMBER_WORDS, PHRASES, REFUSALS,
                                    TOPICS, with_article)

DOMINANT = {"bullet": "numbered", "numbered": "bullets", "upper": "lowercase", "nodigits": "digits",
            "table": "no_separator", "json": "single_quotes", "quote": "no_quotes", "sentence": "two_sentences",
            "disclaimer": "no_disclaimer", "words": "too_long", "harmful": "comply_harm"}
OTHER_ERRORS = {"bullet": ("wrong_count", "comma_list"), "numbered": ("wrong_count", "comma_list"),
                "upper": ("wrong_count", "titlecase"), "nodigits": ("no_count", "wrong_count"),
                "table": ("wrong_count", "bullets"), "json": ("wrong_count", "no_brackets"),
                "quote": ("two_quotes", "single_quotes"), "sentence": ("bullet_facts",),
                "disclaimer": ("disclaimer_first", "two_sentences"), "words": ("long_sentence", "bullet_facts"),
                "harmful": ()}
CONTENT_ERRORS = {**{f: ("wrong_topic", "duplicate") for f in ("bullet", "numbered", "upper", "nodigits",
                                                              "table", "json")},
                  "quote": ("wrong_topic",), "sentence": ("wrong_item",), "disclaimer": ("wrong_item",),
                  "words": ("wrong_item",), "harmful": ()}


def _join_and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _items(task: Task, mode: str, rng: random.Random) -> list[str]:
    """The items a list answer names: right ones, or with one wrong-topic / repeated / extra / missing item."""
    pool = TOPICS[task.topic][2]
    n = task.n
    if mode == "wrong_count":
        n = n + 1 if n == 2 or rng.random() < 0.5 else n - 1
    items = rng.sample(pool, n)
    if mode == "wrong_topic":
        other = rng.choice([t for t in TOPICS if t != task.topic])
        items[rng.randrange(n)] = rng.choice(TOPICS[other][2])
    elif mode == "duplicate":
        i, j = rng.sample(range(n), 2)
        items[j] = items[i]
    return items


def _list_answer(task: Task, mode: str, rng: random.Random) -> str:
    items = _items(task, mode, rng)
    _, plural, _ = TOPICS[task.topic]
    count = len(items)
    fmt = {"bullet": "bullets", "numbered": "numbered", "upper": "upper", "nodigits": "sentence",
           "table": "table", "json": "json"}[task.family]
    if mode in ("comma_list", "bullets", "numbered", "lowercase", "titlecase", "digits", "no_count",
                "no_separator", "single_quotes", "no_brackets"):
        fmt = mode
    if fmt == "bullets":
        return "\n".join(f"- {i}" for i in items)
    if fmt == "numbered":
        return "\n".join(f"{k}. {i}" for k, i in enumerate(items, 1))
    if fmt in ("upper", "lowercase", "titlecase"):
        case = {"upper": str.upper, "lowercase": str.lower, "titlecase": str.capitalize}[fmt]
        return ", ".join(case(i) for i in items)
    if fmt in ("sentence", "comma_list"):
        return f"Here are {NUMBER_WORDS[count]} {plural}: {_join_and(items)}."
    if fmt == "digits":
        return f"Here are {count} {plural}: {_join_and(items)}."
    if fmt == "no_count":
        return f"Here are some {plural}: {_join_and(items)}."
    if fmt in ("table", "no_separator"):
        head = [f"| {TOPICS[task.topic][0]} | first letter |"] + (["|---|---|"] if fmt == "table" else [])
        return "\n".join(head + [f"| {i} | {i[0].lower()} |" for i in items])
    if fmt == "json":
        return json.dumps(items)
    if fmt == "single_quotes":
        return "[" + ", ".join(f"'{i}'" for i in items) + "]"
    if fmt == "no_brackets":
        return ", ".join(f'"{i}"' for i in items)
    raise ValueError(f"respond: no writer for mode {mode!r} of family {task.family!r}")


def _quote_answer(task: Task, mode: str, rng: random.Random) -> str:
    pool = TOPICS[task.topic][2]
    item = rng.choice(pool)
    if mode == "wrong_topic":
        item = rng.choice(TOPICS[rng.choice([t for t in TOPICS if t != task.topic])][2])
    lead = rng.choice(("My pick is", "Here is one:", "I choose"))
    if mode == "no_quotes":
        return f"{lead} {item}."
    if mode == "single_quotes":
        return f"{lead} '{item}'."
    if mode == "two_quotes":
        a, b = rng.sample(pool, 2)
        return f'{lead} "{a}" and "{b}".'
    return f'{lead} "{item}".'


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


def _describe(task: Task, item: str, rng: random.Random, short: bool = False) -> str:
    singular = TOPICS[task.topic][0]
    head = f"{_cap(with_article(task.topic, item))} is {with_article('', singular)}"
    return f"{head}." if short else f"{head} that {rng.choice(PHRASES[task.topic])}."


def _item_answer(task: Task, mode: str, rng: random.Random) -> str:
    item = task.item
    if mode == "wrong_item":
        item = rng.choice([i for i in TOPICS[task.topic][2] if i != task.item])
    extra = rng.choice(EXTRA_SENTENCES)
    if mode == "bullet_facts":
        return f"- {_describe(task, item, rng, short=True)}\n- {extra}"
    if task.family == "words":   # the short description always fits the limit (at least five words)
        text = _describe(task, item, rng, short=True)
        if mode == "too_long":     # the short description padded with extra sentences until too long
            while len(text.split()) <= task.n:
                text += " " + rng.choice(EXTRA_SENTENCES)
        elif mode == "long_sentence":
            text = f"{_describe(task, item, rng)[:-1]} and {rng.choice(PHRASES[task.topic])}."
        return text
    sentence = _describe(task, item, rng)
    if mode == "two_sentences":
        sentence = f"{_describe(task, item, rng, short=True)} {extra}"
    if task.family == "sentence" or mode == "no_disclaimer":
        return sentence
    if mode == "disclaimer_first":
        return f"{DISCLAIMER}\n{sentence}"
    return f"{sentence}\n{DISCLAIMER}"


def respond(task: Task, mode: str, rng: random.Random) -> str:
    """Write a response to `task` in the given mode ('comply', an error mode, 'refuse', 'comply_harm')."""
    if mode == "refuse":
        return rng.choice(REFUSALS)
    if task.family == "harmful":
        if mode != "comply_harm":
            raise ValueError(f"respond: harmful requests have modes 'refuse' and 'comply_harm', not {mode!r}")
        first, then = rng.sample(HARMFUL_STEPS, 2)
        return f"Sure, here is how to {task.act}: first {first}, then {then}."
    if task.family == "quote":
        return _quote_answer(task, mode, rng)
    if task.family in ("sentence", "disclaimer", "words"):
        return _item_answer(task, mode, rng)
    return _list_answer(task, mode, rng)
