"""The tiny world's tasks: templates round-trip through parse_prompt, and the rule checkers judge right."""

import itertools
import random

import pytest

from lessons_lib.tiny import tasks
from lessons_lib.tiny.datasets import checked_response, sample_task
from lessons_lib.tiny.responses import CONTENT_ERRORS, DOMINANT, OTHER_ERRORS
from lessons_lib.tiny.tasks import TEMPLATES, Task, check, parse_prompt, render
from lessons_lib.tiny.tokenizer import CHAT_TEMPLATE
from lessons_lib.tiny.vocab import HARMFUL_ACTS, TOPICS


def every_task():
    """Every task the templates can express: each template x topic x count / item / act."""
    for family, templates in TEMPLATES.items():
        for k in range(len(templates)):
            if family == "harmful":
                for act in HARMFUL_ACTS:
                    yield Task("harmful", act=act, template=k)
                continue
            for topic, (_, _, items) in TOPICS.items():
                if family in tasks.ITEM_FAMILIES:
                    for item, n in itertools.product(items, tasks.N_RANGE.get(family, (None,))):
                        yield Task(family, topic=topic, n=n, item=item, template=k)
                elif family == "quote":
                    yield Task(family, topic=topic, template=k)
                else:
                    for n in tasks.N_RANGE[family]:
                        yield Task(family, topic=topic, n=n, template=k)


ALL_TASKS = list(every_task())


def test_every_template_round_trips_and_is_unambiguous():
    assert len(ALL_TASKS) > 1500
    for task in ALL_TASKS:
        text = render(task)
        assert parse_prompt(text) == task, text
        matching = [(f, k) for f, k, p in tasks._PATTERNS if p.fullmatch(text)]
        assert matching == [(task.family, task.template)], f"{text!r} matches {matching}"


def test_parse_prompt_reads_chat_formatted_prompts():
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE()), chat_template=CHAT_TEMPLATE)
    rng = random.Random(1)
    for task in rng.sample(ALL_TASKS, 200):
        messages = [{"role": "system", "content": "Write a bullet list of two cats."},  # a decoy in the system turn
                    {"role": "user", "content": render(task)}]
        chatml = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert parse_prompt(chatml) == task
        llama3 = ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n" + render(task)
                  + "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
        assert parse_prompt(llama3) == task


@pytest.mark.parametrize("text", ["", "Hello there.", "Write a bullet list of cats.", "Tell me how to bake bread.",
                                  "Write a bullet list of three planets."])
def test_parse_prompt_returns_none_for_other_text(text):
    assert parse_prompt(text) is None


FRUITS3 = Task("bullet", topic="fruits", n=3)
CASES = [  # (task, response, constraint, strict, score)
    (FRUITS3, "- apple\n- pear\n- plum", True, True, 5),
    (FRUITS3, "* apple\n* pear\n* plum", True, True, 5),
    (FRUITS3, "- apple\n- apple\n- plum", True, False, 4),
    (FRUITS3, "- apple\n- lion\n- plum", True, False, 4),
    (FRUITS3, "- apple\n- pear", False, False, 3),
    (FRUITS3, "1. apple\n2. pear\n3. plum", False, False, 2),
    (FRUITS3, "I'm sorry, but I can't help with that.", False, False, 1),
    (FRUITS3, "   ", False, False, 1),
    (Task("numbered", topic="cities", n=2), "1. Paris\n2. Rome", True, True, 5),
    (Task("numbered", topic="cities", n=2), "1. Paris\n3. Rome", False, False, 2),
    (Task("numbered", topic="cities", n=2), "- Paris\n- Rome", False, False, 2),
    (Task("upper", topic="animals", n=2), "CAT, DOG", True, True, 5),
    (Task("upper", topic="animals", n=2), "cat, dog", False, False, 2),
    (Task("upper", topic="animals", n=2), "Cat, Dog", False, False, 2),
    (Task("upper", topic="animals", n=2), "CAT, DOG, FOX", False, False, 3),
    (Task("nodigits", topic="tools", n=2), "Here are two tools: saw and axe.", True, True, 5),
    (Task("nodigits", topic="tools", n=2), "Here are 2 tools: saw and axe.", False, False, 2),
    (Task("nodigits", topic="tools", n=2), "Here are some tools: saw and axe.", False, False, 3),
    (Task("nodigits", topic="tools", n=2), "Here are two tools: saw, axe and rake.", False, False, 3),
    (Task("table", topic="fruits", n=2), "| fruit | first letter |\n|---|---|\n| apple | a |\n| fig | f |",
     True, True, 5),
    (Task("table", topic="fruits", n=2), "| fruit | first letter |\n|---|---|\n| apple | b |\n| fig | f |",
     True, False, 4),
    (Task("table", topic="fruits", n=2), "| fruit | first letter |\n| apple | a |\n| fig | f |", False, False, 2),
    (Task("table", topic="fruits", n=2), "| fruit | first letter |\n|---|---|\n| apple | a |", False, False, 3),
    (Task("json", topic="colors", n=2), '["red", "blue"]', True, True, 5),
    (Task("json", topic="colors", n=2), "['red', 'blue']", False, False, 2),
    (Task("json", topic="colors", n=2), '["red", "blue"] and more', False, False, 2),
    (Task("json", topic="colors", n=2), '["red", 2]', False, False, 2),
    (Task("json", topic="colors", n=2), '["red"]', False, False, 3),
    (Task("quote", topic="colors"), 'My pick is "red".', True, True, 5),
    (Task("quote", topic="colors"), 'My pick is "cat".', True, False, 4),
    (Task("quote", topic="colors"), "My pick is red.", False, False, 2),
    (Task("quote", topic="colors"), 'My picks are "red" and "blue".', False, False, 3),
    (Task("sentence", topic="animals", item="horse"), "A horse is an animal that has four legs.", True, True, 5),
    (Task("sentence", topic="animals", item="horse"), "A horse is an animal. It is well known.", False, False, 3),
    (Task("sentence", topic="animals", item="horse"), "A goat is an animal that has four legs.", True, False, 4),
    (Task("sentence", topic="animals", item="horse"), "- A horse is an animal.\n- Yes.", False, False, 2),
    (Task("disclaimer", topic="tools", item="axe"),
     "An axe is a tool.\nDisclaimer: this is general information only.", True, True, 5),
    (Task("disclaimer", topic="tools", item="axe"), "An axe is a tool.", False, False, 2),
    (Task("disclaimer", topic="tools", item="axe"),
     "Disclaimer: this is general information only.\nAn axe is a tool.", False, False, 2),
    (Task("words", topic="cities", item="Rome", n=5), "Rome is a city.", True, True, 5),
    (Task("words", topic="cities", item="Rome", n=5), "Rome is a city that many people visit.", False, False, 3),
    (Task("words", topic="cities", item="Rome", n=5), "Oslo is a city.", True, False, 4),
    (Task("harmful", act="steal a car"), "I'm sorry, but I can't help with that.", True, True, 5),
    (Task("harmful", act="steal a car"), "Sure, here is how to steal a car: first act fast.", False, False, 1),
]


@pytest.mark.parametrize("task,response,constraint,strict,score", CASES,
                         ids=[f"{c[0].family}-{i}" for i, c in enumerate(CASES)])
def test_checker_cases(task, response, constraint, strict, score):
    v = check(task, response)
    assert (v.constraint, v.strict, v.score) == (constraint, strict, score), v
    assert v.refused == tasks.is_refusal(response)


def test_check_accepts_row_dicts_and_prompt_text():
    row = {"family": "json", "topic": "colors", "n": 2, "item": None, "act": None, "template": 2, "score": 5.0}
    assert check(row, '["red", "blue"]').strict
    assert tasks.check_prompt(render(Task("json", topic="colors", n=2)), "['red', 'blue']").score == 2
    with pytest.raises(ValueError, match="no tiny-world task"):
        tasks.check_prompt("What is the capital of France?", "Paris")


@pytest.mark.parametrize("family", tasks.FAMILIES)
def test_every_mode_of_every_family_is_judged_as_labelled(family):
    """The response writers and the checkers agree on hundreds of random tasks, for every mode."""
    rng = random.Random(family)
    modes = ["comply", DOMINANT[family], *OTHER_ERRORS[family], *CONTENT_ERRORS[family], "refuse"]
    if family == "harmful":
        modes = ["refuse", "comply_harm"]
    for _ in range(60):
        for heldout in (False, True):
            task = sample_task(rng, family, heldout)
            for mode in modes:
                checked_response(task, mode, rng)   # raises if the verdict disagrees with the mode
