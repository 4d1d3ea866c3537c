"""Evaluation (lessons_lib.evaluation): the measurements equal independent computations, the bootstrap resamples
prompts (not samples), tables and plots say what the numbers say. Models are random tiny Qwen2s."""

import copy
import random

import numpy as np
import pandas as pd
import pytest
import torch

from lessons_lib.evaluation import (GENERIC_PROMPTS, METRICS, EvalResults, evaluate, generate, is_refusal,
                                    repetition_rate, response_logprobs)
from lessons_lib.models import get_peft_model, load_model, save_random_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    a, tokenizer = load_model(str(save_random_model(root / "a", seed=1)), max_seq_length=256, load_in_4bit=False)
    b, _ = load_model(str(save_random_model(root / "b", seed=2)), max_seq_length=256, load_in_4bit=False)
    return a, b, tokenizer


@pytest.fixture(scope="module")
def rows():
    from lessons_lib.tiny.datasets import eval_rows

    return eval_rows(random.Random(0), 2, heldout=False)  # 2 prompts per family, harmful included


def synthetic(values: dict, k: int = 1, harmful=None, family=None, column="constraint") -> EvalResults:
    """EvalResults from given per-(prompt, sample) values: values[model] has shape (n_prompts, k)."""
    records = []
    for model, table in values.items():
        for p, row in enumerate(np.asarray(table, dtype=float).reshape(-1, k)):
            for s, v in enumerate(row):
                records.append({"model": model, "prompt_id": p, "sample": s, "harmful": bool(harmful[p]) if harmful
                                is not None else False, "family": family[p] if family is not None else "bullet",
                                "instruction": f"p{p}", "response": "r", "constraint": np.nan, "strict": np.nan,
                                "score": np.nan, "refused": 0.0, "repetition": 0.0, "rm_score": np.nan,
                                "kl": np.nan, "ref_nll": np.nan, "ref_tokens": 1, column: v})
    return EvalResults(pd.DataFrame(records), list(values), {"num_samples": k})


# --------------------------------------------------------------------------------------------- small measures


def test_refusal_detector_and_repetition():
    for text in ["I'm sorry, but I can't help with that.", "  Sorry — no.", "I cannot assist.", "I won't do that",
                 "As an AI, I can't help with this.", "抱歉，我不能回答。", "我无法提供这些信息。"]:
        assert is_refusal(text), text
    for text in ["Sure, here is how: first get a ladder.", "- apple\n- pear", "Sorrel is a herb.", ""]:
        assert not is_refusal(text), text
    assert repetition_rate("- cat\n- dog\n- owl") == 0.0
    assert repetition_rate("- cat\n- cat\n- cat") == pytest.approx(1 - 2 / 5)  # bigrams: (-,cat),(cat,-) x2 +1
    assert repetition_rate("word") == 0.0


# --------------------------------------------------------------------------------------------- bootstrap


def test_bootstrap_resamples_prompts_not_samples():
    rng = np.random.default_rng(0)
    n, k = 200, 8
    per_prompt = rng.random(n) < 0.6                      # each prompt passes or fails for every sample
    correlated = synthetic({"M": np.repeat(per_prompt[:, None], k, 1)}, k=k)
    independent = synthetic({"M": rng.random((n, k)) < 0.6}, k=k)
    constraint = METRICS[0]
    width = {}
    for name, res in (("correlated", correlated), ("independent", independent)):
        value, reps = res._stat("M", constraint, res._prompt_set("benign"))
        lo, hi = res._interval(reps)
        assert lo <= value <= hi
        width[name] = hi - lo
    # the correlated samples carry the information of n prompts, not n*k samples: ~sqrt(k) wider interval
    assert width["correlated"] == pytest.approx(2 * 1.96 * np.sqrt(0.24 / n), rel=0.25)
    assert width["independent"] == pytest.approx(2 * 1.96 * np.sqrt(0.24 / (n * k)), rel=0.25)
    assert width["correlated"] / width["independent"] == pytest.approx(np.sqrt(k), rel=0.35)


def test_relative_change_win_rate_and_table():
    n = 40
    base = np.r_[np.ones(n // 2), np.zeros(n // 2)]                         # 0.50
    better = np.r_[np.ones(3 * n // 4), np.zeros(n // 4)]                   # 0.75
    res = synthetic({"SFT": base, "PPO": better})
    point, lo, hi = res.change(METRICS[0], "PPO", "SFT")
    assert point == pytest.approx(0.5) and lo < 0.5 < hi and lo > 0        # +50%, clearly above zero
    res.samples["score"] = res.samples["constraint"] + 1
    wins = res.win_rates("SFT")
    assert wins.loc[0, "win_rate"] == pytest.approx((n // 4 * 1.0 + 3 * n // 4 * 0.5) / n)  # 10 wins, 30 ties
    table = res.table("SFT")
    row = table.loc[("Instruction following", "constraint met (benign) ↑")]
    assert row["SFT"].startswith("0.50 [") and row["PPO"].startswith("0.75 [")
    assert row["change"].startswith("+50.0% [")
    assert "KL" not in " ".join(table.index.get_level_values(1))         # never measured: left out, not zero


def test_family_rates_and_plot():
    import matplotlib

    matplotlib.use("Agg")
    families = ["bullet"] * 10 + ["json"] * 10 + ["harmful"] * 10
    harmful = [f == "harmful" for f in families]
    res = synthetic({"A": [1] * 5 + [0] * 5 + [1] * 10 + [0] * 10, "B": [1] * 30}, harmful=harmful, family=families)
    res.samples.loc[res.samples["harmful"], "refused"] = res.samples.loc[res.samples["harmful"], "constraint"]
    data = res.families().set_index(["family", "model"])["value"]
    assert data[("bullet", "A")] == 0.5 and data[("json", "A")] == 1.0 and data[("harmful", "A")] == 0.0
    assert data[("harmful", "B")] == 1.0
    ax = res.plot_families()
    from matplotlib.container import ErrorbarContainer

    assert len(ax.patches) == 3 * 2 and sum(isinstance(c, ErrorbarContainer) for c in ax.containers) == 2


# --------------------------------------------------------------------------------------------- with models


def test_kl_and_perplexity_equal_a_direct_computation(tiny, rows):
    a, b, tokenizer = tiny
    instructions = [r["instruction"] for r in rows[:6]]
    queries, responses = generate(b, tokenizer, instructions, num_samples=2, max_new_tokens=12, progress=False)
    assert len(queries) == len(responses) == 12
    T = 0.7
    got_b = response_logprobs(b, queries, responses, T, tokenizer.pad_token_id, batch_size=5)   # odd batch
    got_a = response_logprobs(a, queries, responses, 1.0, tokenizer.pad_token_id, batch_size=5)
    with torch.no_grad():
        for q, r, lp_b, lp_a in zip(queries, responses, got_b, got_a):
            ids = torch.cat([q, r])[None]                                      # one unpadded sequence
            for model, temp, got in ((b, T, lp_b), (a, 1.0, lp_a)):
                logits = model(input_ids=ids).logits[0, len(q) - 1:-1].float() / temp
                expected = torch.log_softmax(logits, -1).gather(-1, r[:, None])[:, 0]
                np.testing.assert_allclose(got, expected.numpy(), rtol=1e-4, atol=1e-5)


def test_evaluate_tiny_world_rows(tiny, rows):
    a, b, tokenizer = tiny
    rm_calls = []

    def reward(prompts, responses):
        rm_calls.append(len(responses))
        return [float(len(r)) for r in responses]

    res = evaluate({"A": a, "B": b}, tokenizer, rows, reference="A", reward_model=reward, num_samples=3,
                   max_new_tokens=12, progress=False)
    s = res.samples
    assert len(s) == 2 * len(rows) * 3 and rm_calls == [len(rows) * 3] * 2
    from lessons_lib.tiny.tasks import check

    for _, r in s.sample(20, random_state=0).iterrows():
        v = check(rows[r["prompt_id"]], r["response"])
        assert (r["constraint"], r["strict"], r["score"]) == (v.constraint, v.strict, v.score)
        assert r["rm_score"] == len(r["response"])
    assert (s.loc[s["model"] == "A", "kl"].abs() < 1e-5).all()            # a model against itself
    assert s.loc[s["model"] == "B", "kl"].notna().all()
    assert s.loc[s["harmful"], "family"].eq("harmful").all() and s["harmful"].any()
    table = res.table()
    measures = table.index.get_level_values(1)
    assert any("constraint" in m for m in measures) and any("win rate" in m for m in measures)
    assert set(table.columns) == {"A", "B", "change"}
    again = evaluate({"A": a}, tokenizer, rows, num_samples=3, max_new_tokens=12, progress=False)
    assert again.samples["response"].tolist() == s.loc[s["model"] == "A", "response"].tolist()  # seeded


def test_evaluate_generic_prompts_greedy_with_lora_reference(tiny):
    a, _, tokenizer = tiny
    policy = get_peft_model(copy.deepcopy(a), r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)
    with policy.disable_adapter():
        base_res = evaluate({"base": policy}, tokenizer, GENERIC_PROMPTS, greedy=True, max_new_tokens=10,
                            progress=False)
    res = evaluate({"policy": policy}, tokenizer, GENERIC_PROMPTS, reference=a, greedy=True, max_new_tokens=10,
                   progress=False)
    s = res.samples
    assert len(s) == len(GENERIC_PROMPTS) and res.settings["num_samples"] == 1
    assert s["constraint"].isna().all() and s["kl"].isna().all()           # no rule checkers; greedy: no KL
    assert s["ref_nll"].notna().all() and s["harmful"].sum() == 4
    assert (base_res.samples["response"] != s["response"]).any()           # the adapter changes the answers
    measures = " ".join(res.table().index.get_level_values(1))
    assert "perplexity" in measures and "refusal of harmful" in measures and "constraint" not in measures
    with pytest.raises(ValueError, match="no instruction text"):
        evaluate({"a": a}, tokenizer, [{"text": "hi"}], progress=False)


@pytest.mark.cuda
def test_evaluate_on_cuda_uses_the_fused_logprob_path(tmp_path):
    """On the GPU the per-token log-probs come from PPO's Triton kernel; they must equal a plain forward pass."""
    model, tokenizer = load_model(str(save_random_model(tmp_path / "m", seed=5)), max_seq_length=256,
                                  load_in_4bit=False, dtype=torch.float32)
    assert next(model.parameters()).is_cuda
    queries, responses = generate(model, tokenizer, ["Name two colors.", "Tell me how to steal a car."],
                                  num_samples=3, max_new_tokens=10, progress=False)
    got = response_logprobs(model, queries, responses, 0.7, tokenizer.pad_token_id, batch_size=4)
    with torch.no_grad():
        for q, r, lp in zip(queries, responses, got):
            ids = torch.cat([q, r])[None].cuda()
            logits = model(input_ids=ids).logits[0, len(q) - 1:-1].float() / 0.7
            expected = torch.log_softmax(logits, -1).gather(-1, r[:, None].cuda())[:, 0].cpu()
            np.testing.assert_allclose(lp, expected.numpy(), rtol=1e-4, atol=1e-4)
    res = evaluate({"m": model}, tokenizer, GENERIC_PROMPTS, reference="m", num_samples=2, max_new_tokens=10,
                   progress=False)
    assert (res.samples["kl"].abs() < 1e-4).all()
