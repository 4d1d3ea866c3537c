"""Dynamic difficulty: the DifficultySampler's statistics, buckets, draws and state, and the PromptLoader."""

import pytest
import torch

from lessons_lib.data import chat_prompt
from lessons_lib.ppo import DifficultySampler, PromptLoader
from lessons_lib.ppo.sampler import prepare_prompts
from test_ppo_helpers import make_dataset, make_tokenizer


def seeded(n=30, bs=6, **kw):
    return DifficultySampler(n, bs, seed=3, **kw)


def test_uniform_epochs_cover_every_prompt_once():
    s = seeded()
    assert len(s) == 5
    epoch = list(s)
    assert sorted(epoch) == list(range(30))
    second = list(s)                      # a new epoch, in a new order
    assert sorted(second) == list(range(30)) and second != epoch
    two = [s.next_batch() for _ in range(5)]
    assert sorted(sum(two, [])) == list(range(30))


def test_ema_statistics():
    s = seeded(ema=0.5)
    s.update([4, 4, 7], [1.0, 3.0, -2.0], [0.5, 1.5, 2.0])
    assert s.stats[4] == {"reward": 2.0, "entropy": 1.0, "count": 2}     # 1 then 0.5 * 1 + 0.5 * 3
    assert s.hardness(7, "entropy_based") == 2.0 and s.hardness(7, "reward_based") == 2.0
    assert s.hardness(5) is None


def test_difficulty_before_statistics_is_uniform():
    a, b = seeded(), seeded()
    b.set_difficulty("hard", "entropy_based")
    assert "no statistics yet" in b.describe()
    assert [a.next_batch() for _ in range(3)] == [b.next_batch() for _ in range(3)]


@pytest.mark.parametrize("strategy", ["entropy_based", "reward_based"])
@pytest.mark.parametrize("difficulty", ["easy", "medium", "hard"])
def test_difficulty_draws_mostly_from_its_third(strategy, difficulty):
    s = seeded(n=60, bs=12, explore=0.25)
    g = torch.Generator().manual_seed(0)
    ids = list(range(30))                    # prompts 30..59 stay unseen
    s.update(ids, torch.randn(30, generator=g).tolist(), torch.rand(30, generator=g).tolist())
    s.set_difficulty(difficulty, strategy)
    bucket = set(s.buckets()[difficulty])
    assert len(bucket) == 10
    hardness = {pid: s.hardness(pid) for pid in ids}
    others = [h for pid, h in hardness.items() if pid not in bucket]
    inside = [hardness[pid] for pid in bucket]
    if difficulty == "hard":
        assert min(inside) >= max(others)
    if difficulty == "easy":
        assert max(inside) <= min(others)
    for _ in range(5):
        batch = s.next_batch()
        assert len(batch) == 12
        assert sum(pid in bucket for pid in batch[3:]) == 9        # 75% from the chosen third
    with pytest.raises(ValueError, match="difficulty"):
        s.set_difficulty("brutal")
    with pytest.raises(ValueError, match="strategy"):
        s.set_difficulty("hard", "length_based")


def test_strategies_rank_differently():
    s = seeded()
    s.update([0, 1, 2], rewards=[5.0, -5.0, 0.0], entropies=[3.0, 0.1, 1.0])
    assert s.buckets("entropy_based")["hard"] == [0]    # most uncertain
    assert s.buckets("reward_based")["hard"] == [1]     # worst rewarded


def test_state_round_trip_continues_identically():
    s = seeded()
    s.update([1, 2, 3, 4], [0.1, 0.2, 0.3, 0.4], [1, 2, 3, 4])
    s.set_difficulty("hard", "reward_based")
    s.next_batch()
    t = seeded()
    t.load_state_dict(s.state_dict())
    assert [s.next_batch() for _ in range(7)] == [t.next_batch() for _ in range(7)]


def test_prompt_loader_batches_and_streaming():
    tok = make_tokenizer()
    ds = prepare_prompts(make_dataset(24), tok)
    sampler = DifficultySampler(len(ds), 8, seed=0)
    seen = []
    loader = PromptLoader(ds, 8, sampler, on_batch=seen.append)
    assert len(loader) == 3
    it = iter(loader)
    first = next(it)
    assert set(first) == {"input_ids", "query", "prompt_id", "instruction", "score", "family"}
    assert first["instruction"] == [ds[i]["instruction"] for i in first["prompt_id"]]
    assert first["input_ids"][0].tolist() == tok(chat_prompt(tok, first["instruction"][0]),
                                                 add_special_tokens=False)["input_ids"]
    rest = list(loader)                  # a new loop continues the unfinished epoch
    assert len(rest) == 2 and len(seen) == 3
    assert sorted(sum([b["prompt_id"] for b in [first, *rest]], [])) == list(range(24))
    assert len(list(loader)) == 3        # then a full new epoch
    with pytest.raises(ValueError, match="input_ids"):
        PromptLoader(make_dataset(24), 8, sampler)
    assert prepare_prompts([{"prompt": "name two cats"}] * 3, tok).column_names == ["prompt", "query", "input_ids"]
    with pytest.raises(ValueError, match="fewer than one batch"):
        DifficultySampler(4, 8)
