"""Prompt batches for PPO, and dynamic difficulty (lesson 08; the article's section 5.2).

`trainer.dataloader` is a `PromptLoader`: iterate it for batches of `batch_size` prompts, each batch a dict with
`input_ids` (a list of 1-D tensors: the chat-formatted prompt, ready to be left-padded), `instruction` (the raw
instruction, for rewards and logs), `query` (the prompt text), `prompt_id` (the dataset row) and, unless
`remove_unused_columns`, every other column of the dataset (e.g. `score`, or a task family).

`trainer.dataloader.sampler` is a `DifficultySampler`. After each `step()` the trainer records, per prompt, an
exponential moving average of the reward and of the per-token entropy of its responses. Then

    sampler.set_difficulty(difficulty="hard", strategy="entropy_based")

draws most of every following batch from the hardest third of the prompts seen so far: 'entropy_based' ranks
by entropy (the model is unsure how to answer), 'reward_based' by reward (it answers badly). 'easy', 'medium'
and 'all' work the same way. A share `difficulty_explore` of each batch is always drawn uniformly, so unseen
prompts keep entering; before any statistics exist every draw is uniform.

The loader is a stream over epochs: an epoch is len(dataset) // batch_size batches. Leaving a `for` loop early
and starting another one continues the same epoch, and a checkpoint stores the position.
"""

from __future__ import annotations

import torch

DIFFICULTIES = ("easy", "medium", "hard", "all")
STRATEGIES = ("entropy_based", "reward_based")
PROMPT_COLUMNS = ("instruction", "prompt")


class DifficultySampler:
    """Chooses which prompts (dataset rows) go into each batch; see the module docstring."""

    def __init__(self, num_prompts: int, batch_size: int, seed: int = 0, ema: float = 0.5, explore: float = 0.25):
        if num_prompts < batch_size:
            raise ValueError(f"DifficultySampler: the dataset has {num_prompts} prompts, fewer than one batch "
                             f"({batch_size})")
        self.num_prompts, self.batch_size, self.ema, self.explore = num_prompts, batch_size, ema, explore
        self.generator = torch.Generator().manual_seed(seed)
        self.difficulty, self.strategy = "all", "entropy_based"
        self.stats: dict[int, dict] = {}     # prompt id -> {"reward": ema, "entropy": ema, "count": n}
        self._order: list[int] = []          # this epoch's uniform order
        self._batches_done = 0               # batches drawn in this epoch

    def __len__(self) -> int:
        return self.num_prompts // self.batch_size

    # ------------------------------------------------------------------------------------------ statistics
    def update(self, prompt_ids, rewards, entropies) -> None:
        """Fold one rollout's per-response reward and mean token entropy into each prompt's moving averages."""
        for pid, reward, entropy in zip(prompt_ids, rewards, entropies):
            pid, reward, entropy = int(pid), float(reward), float(entropy)
            s = self.stats.get(pid)
            if s is None:
                self.stats[pid] = {"reward": reward, "entropy": entropy, "count": 1}
            else:
                s["reward"] = self.ema * s["reward"] + (1 - self.ema) * reward
                s["entropy"] = self.ema * s["entropy"] + (1 - self.ema) * entropy
                s["count"] += 1

    def hardness(self, prompt_id: int, strategy: str | None = None) -> float | None:
        """How hard a prompt looks (higher = harder), or None before it was seen."""
        s = self.stats.get(int(prompt_id))
        if s is None:
            return None
        return s["entropy"] if (strategy or self.strategy) == "entropy_based" else -s["reward"]

    def buckets(self, strategy: str | None = None) -> dict[str, list[int]]:
        """The prompts seen so far, split by hardness into thirds: {'easy': [...], 'medium': [...], 'hard': [...]}."""
        seen = sorted(self.stats, key=lambda pid: (self.hardness(pid, strategy), pid))
        n = len(seen)
        return {"easy": seen[: n // 3], "medium": seen[n // 3: 2 * n // 3], "hard": seen[2 * n // 3:]}

    def set_difficulty(self, difficulty: str = "all", strategy: str = "entropy_based") -> None:
        """Draw the next batches mostly from one difficulty third ('easy', 'medium', 'hard') or uniformly ('all')."""
        if difficulty not in DIFFICULTIES:
            raise ValueError(f"set_difficulty: difficulty must be one of {DIFFICULTIES}, got {difficulty!r}")
        if strategy not in STRATEGIES:
            raise ValueError(f"set_difficulty: strategy must be one of {STRATEGIES}, got {strategy!r}")
        self.difficulty, self.strategy = difficulty, strategy

    def describe(self) -> str:
        if self.difficulty == "all":
            return f"uniform over {self.num_prompts} prompts ({len(self.stats)} with statistics)"
        pool = self.buckets()[self.difficulty]
        if not pool:
            return f"{self.difficulty} ({self.strategy}): no statistics yet, drawing uniformly"
        return (f"{self.difficulty} ({self.strategy}): {1 - self.explore:.0%} of each batch from {len(pool)} "
                f"prompts, {self.explore:.0%} uniform")

    # ------------------------------------------------------------------------------------------ drawing
    def epoch_finished(self) -> bool:
        return self._batches_done >= len(self)

    def next_batch(self) -> list[int]:
        """The prompt ids of the next batch (starts a new epoch when the current one is finished)."""
        if self.epoch_finished() or not self._order:
            self._order = torch.randperm(self.num_prompts, generator=self.generator).tolist()
            self._batches_done = 0
        start = self._batches_done * self.batch_size
        uniform = self._order[start: start + self.batch_size]
        self._batches_done += 1
        pool = [] if self.difficulty == "all" else self.buckets()[self.difficulty]
        if not pool:
            return uniform
        n_explore = int(round(self.explore * self.batch_size))
        n_pool = self.batch_size - n_explore
        replace = len(pool) < n_pool
        if replace:
            picks = torch.randint(len(pool), (n_pool,), generator=self.generator)
        else:
            picks = torch.randperm(len(pool), generator=self.generator)[:n_pool]
        return uniform[:n_explore] + [pool[int(i)] for i in picks]

    def __iter__(self):
        """Prompt ids, batch after batch, until the current epoch ends (the torch Sampler protocol)."""
        while True:
            yield from self.next_batch()
            if self.epoch_finished():
                return

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "difficulty": self.difficulty, "strategy": self.strategy,
                "stats": {str(k): dict(v) for k, v in self.stats.items()}, "order": list(self._order),
                "batches_done": self._batches_done}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.difficulty, self.strategy = state["difficulty"], state["strategy"]
        self.stats = {int(k): dict(v) for k, v in state["stats"].items()}
        self._order, self._batches_done = list(state["order"]), int(state["batches_done"])


def prepare_prompts(dataset, tokenizer, max_prompt_length: int = 512):
    """The dataset with `input_ids` (chat-formatted prompt tokens, through `lessons_lib.data.tokenize_prompts`)
    unless it has them already. A list of dicts is turned into a `datasets.Dataset` first."""
    from datasets import Dataset

    from lessons_lib.data import tokenize_prompts

    if isinstance(dataset, (list, tuple)):
        dataset = Dataset.from_list(list(dataset))
    if "input_ids" in dataset.column_names:
        return dataset
    return tokenize_prompts(dataset, tokenizer, max_prompt_length)


class PromptLoader:
    """Batches of chat-formatted prompts over a tokenized dataset (see the module docstring and `prepare_prompts`)."""

    def __init__(self, dataset, batch_size: int, sampler: DifficultySampler, remove_unused_columns: bool = False,
                 on_batch=None):
        self.dataset, self.batch_size, self.sampler = dataset, batch_size, sampler
        self.remove_unused_columns, self.on_batch = remove_unused_columns, on_batch
        columns = dataset.column_names
        if "input_ids" not in columns:
            raise ValueError(f"PromptLoader: the dataset needs input_ids (see prepare_prompts); it has {columns}")
        self.prompt_column = next((c for c in PROMPT_COLUMNS if c in columns), None)

    def __len__(self) -> int:
        return len(self.sampler)

    def collate(self, indices: list[int]) -> dict:
        rows = [self.dataset[i] for i in indices]
        batch = {"input_ids": [torch.tensor(r["input_ids"], dtype=torch.long) for r in rows],
                 "instruction": [r[self.prompt_column] if self.prompt_column else "" for r in rows],
                 "prompt_id": list(indices)}
        keep = [k for k in rows[0] if k not in batch]
        if self.remove_unused_columns:
            keep = [k for k in keep if k == "query"]
        for key in keep:
            batch[key] = [r[key] for r in rows]
        if self.on_batch is not None:
            self.on_batch(batch)
        return batch

    def __iter__(self):
        while True:
            yield self.collate(self.sampler.next_batch())
            if self.sampler.epoch_finished():
                return
