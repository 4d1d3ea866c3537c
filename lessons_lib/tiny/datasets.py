"""The tiny world's datasets, written deterministically to `data/tiny/*.jsonl` (see data/README.md).

- `sft`: score-mode rows (`instruction`, `response`, `score` 1-5 from the rule checker, plus the task fields and the
  response's `mode`). Its responses comply only ~35% of the time, with one dominant error per family, so the SFT
  model trained on it is mediocre on purpose and PPO has something to fix.
- `preferences`, `preferences_val`, `preferences_heldout`: pairs (`prompt`, `chosen`, `rejected`): chosen is a
  strictly correct answer, rejected one of the error modes.
- `eval_indist`, `eval_heldout`: prompts only. In-distribution: fresh prompts from the training (family, topic)
  combinations. Held-out: one (family, topic) combination per family never seen in training, and harmful acts never
  seen in training.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from lessons_lib.tiny.responses import CONTENT_ERRORS, DOMINANT, OTHER_ERRORS, respond
from lessons_lib.tiny.tasks import FAMILIES, ITEM_FAMILIES, N_RANGE, TEMPLATES, Task, check, render
from lessons_lib.tiny.vocab import HARMFUL_ACTS_HELDOUT, HARMFUL_ACTS_TRAIN, TOPICS

# The (family, topic) combinations kept out of every training file.
HELDOUT_TOPIC = {"bullet": "sports", "numbered": "cities", "upper": "animals", "nodigits": "tools",
                 "table": "vegetables", "json": "colors", "quote": "instruments", "sentence": "fruits",
                 "disclaimer": "animals", "words": "cities"}
SPLITS = ("sft", "preferences", "preferences_val", "preferences_heldout", "eval_indist", "eval_heldout")
TASK_FIELDS = ("family", "topic", "n", "item", "act", "template")


@dataclass(frozen=True)
class Mix:
    """How often each kind of response appears in the SFT data (per benign family; they sum to 1)."""
    comply: float = 0.32
    """strictly correct answers"""
    content: float = 0.06
    """constraint met, content wrong (wrong-topic / repeated item, wrong item described)"""
    dominant: float = 0.46
    """the family's one dominant error (comma list for bullets, digits for 'no digits', ...)"""
    other: float = 0.16
    """the family's other format/count errors, shared equally"""
    refuse: float = 0.0
    """over-refusal of a benign request (none: the SFT model should not learn to refuse what it finds unfamiliar)"""
    harmful_refuse: float = 0.45
    """share of harmful requests answered with a refusal (the rest comply)"""


@dataclass(frozen=True)
class Sizes:
    sft: int = 6000
    preferences: int = 3000
    preferences_val: int = 300
    preferences_heldout: int = 400
    eval_per_family: int = 40


def sample_task(rng: random.Random, family: str, heldout: bool = False) -> Task:
    """A random task of `family` from the training combinations (or from the held-out ones)."""
    template = rng.randrange(len(TEMPLATES[family]))
    if family == "harmful":
        return Task("harmful", act=rng.choice(HARMFUL_ACTS_HELDOUT if heldout else HARMFUL_ACTS_TRAIN),
                    template=template)
    topics = [HELDOUT_TOPIC[family]] if heldout else [t for t in TOPICS if t != HELDOUT_TOPIC[family]]
    topic = rng.choice(topics)
    n = rng.choice(N_RANGE[family]) if family in N_RANGE else None
    item = rng.choice(TOPICS[topic][2]) if family in ITEM_FAMILIES else None
    return Task(family, topic=topic, n=n, item=item, template=template)


def sample_mode(rng: random.Random, family: str, mix: Mix) -> str:
    if family == "harmful":
        return "refuse" if rng.random() < mix.harmful_refuse else "comply_harm"
    kind = rng.choices(("comply", "content", "dominant", "other", "refuse"),
                       weights=(mix.comply, mix.content, mix.dominant, mix.other, mix.refuse))[0]
    if kind == "content":
        return rng.choice(CONTENT_ERRORS[family])
    if kind == "dominant":
        return DOMINANT[family]
    if kind == "other":
        return rng.choice(OTHER_ERRORS[family])
    return kind


def checked_response(task: Task, mode: str, rng: random.Random) -> tuple[str, object]:
    """Write a response and make sure the checker agrees with its mode (a mislabelled mode is a bug)."""
    response = respond(task, mode, rng)
    v = check(task, response)
    good = mode == "comply" or (task.family == "harmful" and mode == "refuse")
    content = mode in CONTENT_ERRORS[task.family]
    if v.strict != good or v.constraint != (good or content):
        raise AssertionError(f"mode {mode!r} of {task} wrote {response!r}, judged {v}")
    return response, v


def _task_fields(task: Task) -> dict:
    return {k: getattr(task, k) for k in TASK_FIELDS}


def sft_rows(rng: random.Random, size: int, mix: Mix = Mix()) -> list[dict]:
    rows = []
    for _ in range(size):
        task = sample_task(rng, rng.choice(FAMILIES))
        mode = sample_mode(rng, task.family, mix)
        response, v = checked_response(task, mode, rng)
        rows.append({"instruction": render(task), "response": response, "score": float(v.score),
                     **_task_fields(task), "mode": mode, "constraint": v.constraint, "strict": v.strict})
    return rows


def preference_rows(rng: random.Random, size: int, heldout: bool = False) -> list[dict]:
    """Pairs: chosen = a strictly correct answer, rejected = an error mode (dominant errors most often).

    Content errors (right format, wrong items) are only 10% of the rejected answers: the tiny reward model is
    meant to be sharp on format, and its blindness to content is one of lesson 03's reward hacks.
    """
    rows = []
    for _ in range(size):
        task = sample_task(rng, rng.choice(FAMILIES), heldout)
        if task.family == "harmful":
            chosen_mode, rejected_mode = "refuse", "comply_harm"
        else:
            chosen_mode = "comply"
            kind = rng.choices(("dominant", "other", "content", "refuse"), weights=(0.5, 0.3, 0.1, 0.1))[0]
            rejected_mode = {"dominant": DOMINANT[task.family], "refuse": "refuse"}.get(kind) or rng.choice(
                OTHER_ERRORS[task.family] if kind == "other" else CONTENT_ERRORS[task.family])
        chosen, _ = checked_response(task, chosen_mode, rng)
        rejected, _ = checked_response(task, rejected_mode, rng)
        rows.append({"prompt": render(task), "chosen": chosen, "rejected": rejected, **_task_fields(task),
                     "rejected_mode": rejected_mode})
    return rows


def eval_rows(rng: random.Random, per_family: int, heldout: bool) -> list[dict]:
    """Prompts only: `per_family` per family (benign and harmful), in family order."""
    return [{"instruction": render(task), **_task_fields(task), "split": "heldout" if heldout else "indist"}
            for family in FAMILIES for task in (sample_task(rng, family, heldout) for _ in range(per_family))]


def build_datasets(seed: int = 0, sizes: Sizes = Sizes(), mix: Mix = Mix()) -> dict[str, list[dict]]:
    """Every split, each from its own seeded generator (changing one split's size leaves the others alone)."""
    def rng(k: int) -> random.Random:
        return random.Random(seed * 1000 + k)

    return {
        "sft": sft_rows(rng(1), sizes.sft, mix),
        "preferences": preference_rows(rng(2), sizes.preferences),
        "preferences_val": preference_rows(rng(3), sizes.preferences_val),
        "preferences_heldout": preference_rows(rng(4), sizes.preferences_heldout, heldout=True),
        "eval_indist": eval_rows(rng(5), sizes.eval_per_family, heldout=False),
        "eval_heldout": eval_rows(rng(6), sizes.eval_per_family, heldout=True),
    }


def write_jsonl(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_datasets(directory: Path, seed: int = 0, sizes: Sizes = Sizes(), mix: Mix = Mix()) -> dict[str, Path]:
    paths = {}
    for split, rows in build_datasets(seed, sizes, mix).items():
        paths[split] = directory / f"{split}.jsonl"
        write_jsonl(rows, paths[split])
    return paths


def compliance_of(rows: list[dict]) -> dict[str, float]:
    """Share of rows whose response meets the constraint, per family (for the data's own statistics)."""
    out = {}
    for family in FAMILIES:
        fam = [r for r in rows if r["family"] == family]
        if fam:
            out[family] = sum(check(r, r["response"]).constraint for r in fam) / len(fam)
    return out

