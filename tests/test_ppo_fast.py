"""The fast PPO paths against the plain ones (docs/PPO.md "Performance").

- `linear_logprobs` (LM head applied a chunk at a time, gradient computed in the forward) against full logits;
- `PolicyForward` (transformers' decoder or FastDecoder, then `linear_logprobs`) against the model's own logits:
  log-probs, entropy, hidden states, and every LoRA and value-head gradient;
- the trainer: scoring passes, losses, gradients and a whole `step()` on the fast path equal the plain path, with
  minibatches padded to bucketed lengths (the shapes CUDA graphs replay); the NaN check still stops before the
  optimizer step;
- the rollout engine inside `PPOTrainer.generate`: greedy responses identical to `model.generate`, sampled ones
  from the same distribution (two-sample chi-square per position), finite stats.

fp32 on CPU: tolerances are rounding-level. The CUDA tests (`-m cuda`) run on the GPU machine.
"""

import math
import warnings

import pytest
import torch

from lessons_lib.ppo import NonFiniteError, PPOConfig, PPOTrainer
from lessons_lib.ppo.core import entropy_from_logits, logprobs_from_logits
from lessons_lib.ppo.forward import PolicyForward, choose_backend, linear_logprobs
from lessons_lib.ppo.graphs import GraphedBackward
from lessons_lib.ppo.rollout import ValueHead, disable_dropout, policy_forward
from test_ppo_helpers import letter_reward, make_dataset, make_policy, make_tokenizer

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def randomize_lora(model, scale: float = 0.05, seed: int = 1):
    """LoRA B starts at zero; random values make policy != reference, and give lora_A gradients."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model


def tiny_lora(arch: str, targets=QKVO):
    """A random tiny model with LoRA (r=4, no dropout) and random B: Qwen2 (GQA, q/k/v biases, tied embeddings) or
    Llama (head_dim 12 != hidden / heads, untied)."""
    common = dict(rms_norm_eps=1e-5, initializer_range=0.2, max_position_embeddings=128, vocab_size=97)
    if arch == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
            hidden_size=40, intermediate_size=72, num_hidden_layers=2, num_attention_heads=5, num_key_value_heads=1,
            tie_word_embeddings=True, **common))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            hidden_size=48, intermediate_size=100, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=12, tie_word_embeddings=False, **common))
    for p in model.parameters():
        p.requires_grad_(False)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets))
    return randomize_lora(model)


def rollout_batch(vocab: int, B: int = 5, Tq: int = 7, Tr: int = 6, padded: bool = True, seed: int = 0):
    """Left-padded queries, right-padded responses: (query_ids, query_mask, response_ids, response_mask)."""
    g = torch.Generator().manual_seed(seed)
    q_ids, r_ids = torch.randint(3, vocab, (B, Tq), generator=g), torch.randint(3, vocab, (B, Tr), generator=g)
    q_mask, r_mask = torch.ones_like(q_ids), torch.ones_like(r_ids)
    if padded:
        for i in range(B):
            q_mask[i, : i % 4] = 0
            r_mask[i, Tr - (i % 3):] = 0
        q_ids[q_mask == 0], r_ids[r_mask == 0] = 0, 0
    return q_ids, q_mask, r_ids, r_mask


# ------------------------------------------------------------------------------------------ linear_logprobs

TOL = {torch.float32: (2e-5, 1e-4), torch.bfloat16: (2e-2, 2e-2)}   # (log-prob atol, gradient tolerance / scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_linear_logprobs_equal_full_logits(impl, dtype):
    """Chunked log-probs and entropy equal logprobs_from_logits / entropy_from_logits of the full logits; the
    gradient of the hidden states (computed in the forward) equals autograd's through the logits."""
    g = torch.Generator().manual_seed(0)
    H, V = 24, 101
    hidden = torch.randn(3, 7, H, generator=g).to(dtype).requires_grad_(True)
    head = torch.randn(V, H, generator=g).to(dtype)
    tokens = torch.randint(V, (3, 7), generator=g)
    weights = torch.randn(3, 7, generator=g)
    lp, ent = linear_logprobs(hidden, head, tokens, 0.7, with_entropy=True, chunk_tokens=5, impl=impl)
    (lp * weights).sum().backward()
    got_grad, hidden.grad = hidden.grad, None
    logits = hidden @ head.t()
    ref = logprobs_from_logits(logits, tokens, 0.7)
    (ref * weights).sum().backward()
    atol, gtol = TOL[dtype]
    assert lp.dtype == torch.float32 and lp.shape == (3, 7) and not ent.requires_grad
    torch.testing.assert_close(lp, ref.detach(), atol=atol, rtol=atol)
    torch.testing.assert_close(ent, entropy_from_logits(logits.detach(), 0.7), atol=10 * atol, rtol=10 * atol)
    scale = hidden.grad.abs().max().item()
    torch.testing.assert_close(got_grad, hidden.grad, atol=gtol * scale, rtol=gtol)


def test_linear_logprobs_errors():
    h, w, t = torch.randn(2, 3, 4), torch.randn(5, 4), torch.randint(5, (2, 3))
    with pytest.raises(NotImplementedError, match="LM head requires grad"):
        linear_logprobs(h, w.requires_grad_(), t)
    with pytest.raises(ValueError, match="does not match"):
        linear_logprobs(h, w.detach(), t[:, :2])
    with pytest.raises(ValueError, match="temperature"):
        linear_logprobs(h, w.detach(), t, temperature=0)


# ------------------------------------------------------------------------------------------ PolicyForward


def forward_and_grads(model, fwd, head: ValueHead, rows, padded=True):
    """log-probs, entropy, values and the gradient of a random mix of them w.r.t. every trainable tensor."""
    for p in [*model.parameters(), *head.parameters()]:
        p.grad = None
    lp, ent, hidden = fwd(*rows, 0.8, with_entropy=True, with_hidden=True, padded=padded)
    values = head(hidden)
    g = torch.Generator().manual_seed(3)
    mask = rows[3].float()
    loss = ((lp * torch.randn(lp.shape, generator=g) + values * torch.randn(lp.shape, generator=g)) * mask).sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in [*model.named_parameters(), *head.named_parameters()] if p.requires_grad}
    return (lp * mask).detach(), (ent * mask).detach(), (values * mask).detach(), grads


def assert_same(got, ref, tol=2e-5):
    for a, b, what in zip(got[:3], ref[:3], ("logprobs", "entropy", "values")):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol, msg=what)
    assert got[3].keys() == ref[3].keys() and len(ref[3]) > 2
    for name, g in ref[3].items():
        scale = g.abs().max().item()
        assert scale > 0, f"{name}: zero reference gradient (weak test)"
        torch.testing.assert_close(got[3][name], g, atol=tol * 10 * scale, rtol=tol * 10, msg=name)


@pytest.mark.parametrize("padded", [True, False], ids=["padded", "unpadded"])
@pytest.mark.parametrize("backend", ["hf", "fast"])
@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_policy_forward_equals_the_model_logits(arch, backend, padded):
    model = tiny_lora(arch)
    head = ValueHead(model.config.hidden_size)
    torch.nn.init.normal_(head.summary.weight)
    rows = rollout_batch(97, padded=padded)
    ref = forward_and_grads(model, PolicyForward(model, "logits"), head, rows)
    fwd = PolicyForward(model, backend, chunk_tokens=7)             # odd chunks: 25 positions = 3 x 7 + 4
    assert_same(forward_and_grads(model, fwd, head, rows, padded=padded), ref)
    with torch.no_grad(), model.disable_adapter():                 # the reference pass reads adapters at call time
        ref_lp = policy_forward(model, *rows, 0.8)[0]
        torch.testing.assert_close(fwd(*rows, 0.8)[0] * rows[3], ref_lp * rows[3], atol=2e-5, rtol=2e-5)


def test_policy_forward_4bit(tmp_path):
    """4-bit (bitsandbytes on CPU) + LoRA: FastDecoder's and transformers' hidden-state paths equal the logits."""
    from lessons_lib import get_peft_model, load_model
    from lessons_lib.models import save_random_model

    folder = save_random_model(tmp_path / "q", hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    model, _ = load_model(str(folder), load_in_4bit=True)
    model = randomize_lora(get_peft_model(model, r=4, target_modules=QKVO, lora_dropout=0.0, verbose=False))
    head = ValueHead(64)
    torch.nn.init.normal_(head.summary.weight)
    rows = rollout_batch(model.config.vocab_size)
    ref = forward_and_grads(model, PolicyForward(model, "logits"), head, rows)
    for backend in ("hf", "fast"):
        assert_same(forward_and_grads(model, PolicyForward(model, backend), head, rows), ref)


def test_choose_backend(tok):
    model = tiny_lora("qwen2")
    assert choose_backend(model, "auto", torch.device("cpu"))[0] == "hf"        # FastDecoder is for GPUs
    assert choose_backend(model, True, torch.device("cpu")) == ("fast", "FastDecoder")
    assert choose_backend(model, False, torch.device("cuda"))[0] == "hf"
    plain = make_policy(tok, lora=False)                                        # full fine-tuning: no FastDecoder
    with pytest.raises(ValueError, match="no LoRA adapters"):
        choose_backend(plain, True, torch.device("cpu"))
    dropout = make_policy(tok)                                                  # lora_dropout=0.1
    assert "dropout" in choose_backend(dropout, "auto", torch.device("cuda"))[1]
    disable_dropout(dropout)
    assert choose_backend(dropout, "auto", torch.device("cuda"))[0] == "fast"


# ------------------------------------------------------------------------------------------ the trainer


def make_trainer(tok, **cfg):
    values = dict(batch_size=8, mini_batch_size=2, gradient_accumulation_steps=2, ppo_epochs=2, learning_rate=3e-3,
                  max_new_tokens=9, progress=False)
    policy = randomize_lora(make_policy(tok, seed=0), scale=0.2)
    return PPOTrainer(PPOConfig(**{**values, **cfg}), model=policy, tokenizer=tok, dataset=make_dataset(),
                      reward_fns=[(letter_reward, 1.0)])


def rollout_inputs(trainer):
    batch = next(iter(trainer.dataloader))
    torch.manual_seed(5)
    sampled = trainer.generate(batch["input_ids"], return_prompt=False)
    # a random policy rarely says EOS: cut responses to several lengths, half of them ending in EOS
    eos = torch.tensor([trainer.eos_id])
    responses = [torch.cat([r[:2 + i % 6], eos]) if i % 2 else r[:3 + i % 6] for i, r in enumerate(sampled)]
    return batch["input_ids"], responses, trainer.compute_reward(responses=responses, queries=batch["input_ids"])


def trainable(trainer):
    return {n: p.detach().clone() for n, p in [*trainer.model.named_parameters(),
                                               *trainer.value_head.named_parameters()] if p.requires_grad}


def test_fast_step_equals_the_plain_step(tok):
    """FastDecoder forward, lean log-probs, minibatches padded to buckets of 16 (GraphedBackward, eager on a CPU),
    one scoring pass for the whole batch: the same rollout numbers, losses, stats and updated weights as the plain
    path (transformers' full logits, trimmed minibatches)."""
    plain = make_trainer(tok, fast_forward=False)
    plain.forward = PolicyForward(plain.model, "logits")                       # the path before the lean forward
    fast = make_trainer(tok, fast_forward=True, length_bucket=16, forward_batch_size=8, logprob_chunk_tokens=5)
    assert fast.forward_backend == "fast" and fast._graphed is not None and not fast._graphed.enabled
    queries, responses, rewards = rollout_inputs(plain)
    assert len({len(r) for r in responses}) > 1                                 # responses of several lengths
    rolls = []
    for trainer in (plain, fast):
        roll = trainer.prepare_rollout(queries, responses)
        trainer.score_tokens(roll)
        rolls.append(roll)
    for name in ("logprobs", "ref_logprobs", "entropy", "values"):
        torch.testing.assert_close(rolls[1].__dict__[name], rolls[0].__dict__[name], atol=2e-5, rtol=2e-5, msg=name)
    stats = [t.step(queries=queries, responses=responses, rewards=rewards) for t in (plain, fast)]
    for key, value in stats[0].items():
        if not key.startswith(("time/", "env/reward/")):     # timings; reward parts (scored once, by plain)
            assert stats[1][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    after, start = [trainable(t) for t in (plain, fast)], trainable(make_trainer(tok))
    assert not [n for n in start if torch.equal(after[0][n], start[n])]       # every tensor moved
    for name, ref in after[0].items():
        torch.testing.assert_close(after[1][name], ref, atol=2e-6, rtol=1e-4, msg=name)


def test_bucketed_update_stops_before_a_non_finite_update(tok):
    trainer = make_trainer(tok, length_bucket=16)
    queries, responses, rewards = rollout_inputs(trainer)
    with torch.no_grad():
        trainer.value_head.summary.weight.fill_(float("nan"))
    before = trainable(trainer)
    with pytest.raises(NonFiniteError, match="loss in PPO epoch 1, minibatch 1"):
        trainer.step(queries=queries, responses=responses, rewards=rewards)
    after = trainable(trainer)
    assert all(torch.equal(after[n], before[n]) or torch.isnan(before[n]).all() for n in before)


@pytest.mark.parametrize("failure", ["raises", "wrong numbers"])
def test_a_failing_fast_forward_falls_back_to_transformers(tok, failure):
    """fast_forward="auto" checks FastDecoder once (forward + backward on two rows, log-probs against transformers');
    if the check fails the trainer warns and trains with transformers' forward, and no gradient is left behind."""
    trainer = make_trainer(tok, fast_forward=True)
    trainer._forward_checked = False                  # as "auto" on a GPU
    hidden = trainer.forward.hidden

    def broken(*args, **kwargs):
        if failure == "raises":
            raise RuntimeError("no kernel image is available for execution on the device")
        return hidden(*args, **kwargs) * 3.0

    trainer.forward.hidden = broken
    queries, responses, rewards = rollout_inputs(trainer)
    with pytest.warns(UserWarning, match="FastDecoder failed its check"):
        stats = trainer.step(queries=queries, responses=responses, rewards=rewards)
    assert trainer.forward_backend == "hf" and "failed its check" in trainer.forward_reason
    assert all(math.isfinite(v) for v in stats.values())
    good = make_trainer(tok, fast_forward=True)
    good._forward_checked = False
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        good.step(queries=queries, responses=responses, rewards=rewards)
    assert good.forward_backend == "fast"


def test_graphed_backward_runs_eagerly_off_gpu():
    lin = torch.nn.Linear(3, 2)

    def loss_fn(x, scale):
        out = lin(x).sum() * scale
        return out, {"out": out}

    step = GraphedBackward(loss_fn, list(lin.parameters()))
    assert not step.enabled
    x = torch.randn(4, 3)
    loss, stats = step({"x": x}, scale=2.0)
    expected = torch.autograd.grad(lin(x).sum() * 2.0, [lin.weight])[0]
    torch.testing.assert_close(lin.weight.grad, expected)
    assert loss.item() == pytest.approx(stats["out"].item()) and not loss.requires_grad


def test_config_switches_and_errors(tok):
    with pytest.raises(ValueError, match="fast_rollout"):
        PPOConfig(fast_rollout="yes")
    with pytest.raises(ValueError, match="length_bucket"):
        PPOConfig(length_bucket=0)
    with pytest.raises(ValueError, match="rollout_engine"):
        PPOConfig(rollout_engine="lean")
    with pytest.raises(ValueError, match="cuda_graphs=True needs the model on a CUDA device"):
        make_trainer(tok, cuda_graphs=True)
    trainer = make_trainer(tok)                                                # CPU, "auto" everywhere
    assert trainer.forward_backend == "hf" and trainer._graphed is None
    assert trainer._rollout_engine({"max_new_tokens": 2}) is None              # the engine is for GPUs in "auto"


# ------------------------------------------------------------------------------------------ the reward model


@pytest.fixture(scope="module")
def rm_folders(tmp_path_factory):
    from lessons_lib.models import save_random_model

    root = tmp_path_factory.mktemp("rm")
    return {arch: save_random_model(root / arch, arch=arch, hidden_size=64, intermediate_size=128,
                                    num_hidden_layers=2) for arch in ("qwen2", "llama")}


def reward_model(folder, load_in_4bit=False):
    from lessons_lib.reward import RewardModel

    rm = RewardModel.from_backbone(str(folder), load_in_4bit=load_in_4bit, lora_r=4)
    randomize_lora(rm.model, scale=0.1)
    rm.mean, rm.std = 0.3, 1.7
    return rm


TEXTS = (["name two fruits", "write a list of three colors please", "hi", "a longer prompt " * 6],
         ["- apple\n- pear", "red, blue and a very long tail " * 4, "ok", ""])


@pytest.mark.parametrize("load_in_4bit", [False, True], ids=["fp32", "4bit"])
@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_fast_reward_scorer_equals_reward_model_score(rm_folders, arch, load_in_4bit):
    """The reward model's backbone through FastDecoder, texts left-padded to buckets of 32: the same normalised
    rewards as RewardModel.score (prompts of different lengths, an empty response)."""
    from lessons_lib.ppo.scoring import FastRewardScorer

    rm = reward_model(rm_folders[arch], load_in_4bit)
    expected = rm.score(*TEXTS)
    scorer = FastRewardScorer(rm, strict=True)
    torch.testing.assert_close(scorer.fast_score(*TEXTS, batch_size=3), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scorer(*TEXTS), expected, atol=1e-5, rtol=1e-5)   # checks, returns the fast result
    torch.testing.assert_close(scorer(*TEXTS), expected, atol=1e-5, rtol=1e-5)
    assert scorer.checked and scorer.failed is None
    from lessons_lib.fast_train import FastDecoder

    with pytest.raises(NotImplementedError, match="no LM head"):
        FastDecoder(rm.model).loss(torch.ones(1, 3, dtype=torch.long))


def test_trainer_scores_with_the_fast_reward_scorer(rm_folders, tok):
    from lessons_lib.ppo.scoring import FastRewardScorer

    rm = reward_model(rm_folders["qwen2"])
    fast = PPOTrainer(PPOConfig(batch_size=4, mini_batch_size=2, progress=False, fast_forward=True),
                      model=randomize_lora(make_policy(tok)), tokenizer=tok, reward_model=rm)
    plain = PPOTrainer(PPOConfig(batch_size=4, mini_batch_size=2, progress=False),
                       model=randomize_lora(make_policy(tok)), tokenizer=tok, reward_model=rm)
    assert isinstance(fast.reward_fn, FastRewardScorer) and not isinstance(plain.reward_fn, FastRewardScorer)
    queries = [torch.tensor(tok(t, add_special_tokens=False)["input_ids"]) for t in TEXTS[0]]
    responses = [torch.tensor(tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]) for t in TEXTS[1]]
    for _ in range(2):
        torch.testing.assert_close(fast.compute_reward(responses=responses, queries=queries),
                                   plain.compute_reward(responses=responses, queries=queries), atol=1e-5, rtol=1e-5)


def test_a_failing_fast_reward_scorer_falls_back(rm_folders):
    from lessons_lib.ppo.scoring import FastRewardScorer

    rm = reward_model(rm_folders["llama"])
    scorer = FastRewardScorer(rm)
    scorer.check_rows = 2                                               # checks 2 rows, falls back for them all
    assert len(TEXTS[0]) > scorer.check_rows
    scorer.head = lambda pooled: torch.zeros(pooled.shape[0], 1)        # wrong rewards
    expected = rm.score(*TEXTS)
    with pytest.warns(UserWarning, match="fast scorer failed its check"):
        torch.testing.assert_close(scorer(*TEXTS), expected)
    torch.testing.assert_close(scorer(*TEXTS), expected)
    assert scorer.failed and "differ" in scorer.failed


# ------------------------------------------------------------------------------------------ the rollout engine


def two_trainers(tok, **cfg):
    """Trainers with identical policies, one sampling with the RolloutEngine, one with model.generate."""
    return make_trainer(tok, fast_rollout=True, **cfg), make_trainer(tok, fast_rollout=False, **cfg)


def test_fast_rollout_greedy_equals_generate(tok):
    fast, plain = two_trainers(tok)
    batch = next(iter(fast.dataloader))
    gen = {"do_sample": False, "max_new_tokens": 12}
    # a random policy never says EOS: call a token that greedy decoding emits mid-sequence in some rows "EOS"
    first = torch.stack(plain.generate(batch["input_ids"], return_prompt=False, generate_kwargs=gen))
    fast.eos_id = plain.eos_id = int(first[:, 4].mode().values)
    got = fast.generate(batch["input_ids"], return_prompt=False, generate_kwargs=gen)
    assert fast._engine is not None and plain._engine is None
    expected = plain.generate(batch["input_ids"], return_prompt=False, generate_kwargs=gen)
    assert len({len(r) for r in expected}) > 1 and any(len(r) == 12 for r in expected)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    with_prompt = fast.generate(batch["input_ids"][0], generate_kwargs=gen)     # one query, prompt in front
    assert torch.equal(with_prompt, torch.cat([batch["input_ids"][0], expected[0]]))


def test_fast_rollout_follows_lora_updates_and_gives_finite_stats(tok):
    fast, plain = two_trainers(tok)
    for _ in range(2):                       # after a step, the engine must sample from the updated adapters
        queries, responses, rewards = rollout_inputs(fast)
        stats = fast.step(queries=queries, responses=responses, rewards=rewards)
        assert all(math.isfinite(v) for v in stats.values()), stats
    plain.model.load_state_dict(fast.model.state_dict())
    gen = {"do_sample": False, "max_new_tokens": 10}
    got = fast.generate(queries, return_prompt=False, generate_kwargs=gen)
    expected = plain.generate(queries, return_prompt=False, generate_kwargs=gen)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert fast._engine.refreshes > 0


def chi2_two_sample(a: torch.Tensor, b: torch.Tensor, bins: int) -> float:
    """p-value of 'two samples of categories from one distribution' (chi-square on the 2 x k table; categories
    with fewer than 10 observations in both samples together are pooled)."""
    ca, cb = torch.bincount(a, minlength=bins).double(), torch.bincount(b, minlength=bins).double()
    small = (ca + cb) < 10
    ca = torch.cat([ca[~small], ca[small].sum()[None]])
    cb = torch.cat([cb[~small], cb[small].sum()[None]])
    keep = (ca + cb) > 0
    ca, cb = ca[keep], cb[keep]
    na, nb = ca.sum(), cb.sum()
    total = ca + cb
    ea, eb = total * na / (na + nb), total * nb / (na + nb)
    stat = ((ca - ea) ** 2 / ea + (cb - eb) ** 2 / eb).sum()
    df = len(total) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat / 2))


def test_fast_rollout_samples_the_same_distribution(tok):
    """600 samples of one prompt from each path: at each of the first 3 positions the token histograms agree
    (two-sample chi-square, threshold 1e-4); a wrong temperature is rejected by the same test."""
    fast, plain = two_trainers(tok)
    for trainer in (fast, plain):            # logits 8x larger: a peaked law, so a wrong temperature shows
        with torch.no_grad():
            trainer.model.get_base_model().model.norm.weight.mul_(8)
    prompt = next(iter(fast.dataloader))["input_ids"][0]
    gen = {"max_new_tokens": 3, "temperature": 0.7}
    torch.manual_seed(11)
    a = torch.stack([r[:3] for r in fast.generate([prompt] * 600, return_prompt=False, generate_kwargs=gen)
                     if len(r) >= 3])
    torch.manual_seed(12)
    b = torch.stack([r[:3] for r in plain.generate([prompt] * 600, return_prompt=False, generate_kwargs=gen)
                     if len(r) >= 3])
    V = len(tok)
    pvalues = [chi2_two_sample(a[:, t], b[:, t], V) for t in range(3)]
    assert min(pvalues) > 1e-4, pvalues
    torch.manual_seed(13)
    hot = torch.stack([r[:1] for r in fast.generate([prompt] * 600, return_prompt=False,
                                                     generate_kwargs={"max_new_tokens": 1, "temperature": 1.5})
                       if len(r)])
    assert chi2_two_sample(hot[:, 0], b[:, 0], V) < 1e-4               # the test can fail


def test_fast_rollout_true_rejects_options_the_engine_lacks(tok):
    fast = make_trainer(tok, fast_rollout=True)
    prompt = next(iter(fast.dataloader))["input_ids"][:2]
    with pytest.raises(ValueError, match="repetition_penalty"):
        fast.generate(prompt, generate_kwargs={"repetition_penalty": 1.3, "max_new_tokens": 2})


# ------------------------------------------------------------------------------------------ CUDA (GPU machine)


@pytest.mark.cuda
@pytest.mark.parametrize("max_graphs", [8, 1], ids=["kept", "evicted"])
def test_graphed_backward_replays_equal_eager(max_graphs):
    """Captured forward + backward graphs of two shapes and a forward-only graph, all in one memory pool, replayed
    interleaved on new inputs: each accumulates the same gradients (or returns the same values) as an eager call,
    and capturing leaves the gradients as they were. With max_graphs=1 every shape change re-captures."""
    from lessons_lib.ppo.graphs import GraphedForward, GraphPool

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 1)).cuda()
    params = list(net.parameters())

    def loss_fn(x, mask, scale):
        y = net(x).squeeze(-1)
        loss = (y * mask).sum() / mask.sum() * scale
        return loss, {"y_mean": y.mean()}

    pool = GraphPool()
    graphed = GraphedBackward(loss_fn, params, pool=pool, max_graphs=max_graphs)
    scores = GraphedForward(lambda x: {"y": net(x).squeeze(-1) * 2}, pool=pool)
    eager = GraphedBackward(loss_fn, params, enabled=False)
    for p in params:
        p.grad = torch.full_like(p, 0.5)
    for step in range(6):
        shape = (5, 7) if step % 2 else (3, 9)
        x, mask = torch.randn(*shape, 16, device="cuda"), (torch.rand(*shape, device="cuda") > 0.3).float()
        mask[0, 0] = 1
        start = [p.grad.clone() for p in params]
        loss, stats = graphed({"x": x, "mask": mask}, scale=0.5)
        torch.testing.assert_close(scores({"x": x})["y"], net(x).squeeze(-1).detach() * 2)
        got = [p.grad.clone() for p in params]
        for p, s in zip(params, start):
            p.grad.copy_(s)
        ref_loss, ref_stats = eager({"x": x, "mask": mask}, scale=0.5)
        torch.testing.assert_close(loss, ref_loss)
        torch.testing.assert_close(stats["y_mean"], ref_stats["y_mean"])
        for g, p in zip(got, params):
            torch.testing.assert_close(g, p.grad)
        with torch.no_grad():                           # an optimizer step between replays
            for p in params:
                p.add_(torch.randn_like(p) * 0.01)
    assert graphed.enabled and scores.enabled
    assert graphed.captures == (2 if max_graphs > 1 else 6) and len(graphed.graphs) == min(2, max_graphs)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["fast", "hf"])
def test_graphed_scoring_follows_lora_updates(backend):
    """Policy and reference passes captured as one graph (the reference under disable_adapter): replays after an
    in-place LoRA update equal eager passes, and the reference stays the adapter-free model. (With transformers'
    forward a capture may fail on a host read in its mask code; GraphedForward then warns and runs eagerly.)"""
    from lessons_lib.ppo.graphs import GraphedForward

    model = tiny_lora("qwen2").cuda()
    fwd = PolicyForward(model, backend)

    def passes(query_ids, query_mask, response_ids, response_mask, padded):
        rows = (query_ids, query_mask, response_ids, response_mask)
        policy = fwd(*rows, 0.7, padded=padded)[0]
        with model.disable_adapter():
            ref = fwd(*rows, 0.7, padded=padded)[0]
        return {"policy": policy, "ref": ref}

    graphed = GraphedForward(passes)
    for padded in (True, False):
        rows = dict(zip(("query_ids", "query_mask", "response_ids", "response_mask"),
                        (t.cuda() for t in rollout_batch(97, padded=padded))))
        for step in range(3):
            got = graphed(rows, padded=padded)
            with torch.no_grad():
                expected = passes(**rows, padded=padded)
            for name in ("policy", "ref"):
                torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=1e-5, msg=name)
            with torch.no_grad():                       # an optimizer step: LoRA tensors change in place
                for n, p in model.named_parameters():
                    if "lora_" in n:
                        p.add_(torch.randn_like(p) * 0.05)
        with torch.no_grad(), model.disable_adapter():
            base = policy_forward(model, *rows.values(), 0.7)[0]
        torch.testing.assert_close(got["ref"] * rows["response_mask"], base * rows["response_mask"],
                                   atol=1e-5, rtol=1e-5)
    if backend == "fast":      # transformers' mask code may read the device (not capturable): eager is allowed there
        assert graphed.enabled and graphed.captures == 2


def cuda_policy(tmp_path):
    from lessons_lib import get_peft_model, load_model
    from lessons_lib.models import save_random_model

    folder = save_random_model(tmp_path / "qwen2", hidden_size=256, intermediate_size=512, num_hidden_layers=2)
    model, tok = load_model(str(folder), load_in_4bit=True)
    model = get_peft_model(model, r=16, target_modules=QKVO, lora_alpha=16, lora_dropout=0.0, verbose=False)
    return randomize_lora(model, scale=0.02), tok


@pytest.mark.cuda
def test_fast_ppo_on_gpu_equals_eager_and_stays_finite(tmp_path):
    """4-bit + LoRA on a GPU with every lever on ("auto"): the engine samples, FastDecoder scores, the update is
    replayed from CUDA graphs; the stats of a step equal those of the same step without graphs (bf16 rounding)."""
    from lessons_lib.data import chat_prompt

    runs = []
    for graphs in ("auto", False):
        torch.manual_seed(0)
        model, tok = cuda_policy(tmp_path / str(graphs))
        cfg = PPOConfig(batch_size=8, mini_batch_size=2, ppo_epochs=2, learning_rate=1e-3, max_new_tokens=16,
                        progress=False, cuda_graphs=graphs)
        trainer = PPOTrainer(cfg, model=model, tokenizer=tok, reward_fns=[(letter_reward, 1.0)])
        assert trainer.forward_backend == "fast"
        queries = [torch.tensor(tok(chat_prompt(tok, f"name {n} fruits"), add_special_tokens=False)["input_ids"])
                   for n in range(8)]
        torch.manual_seed(1)
        responses = trainer.generate(queries, return_prompt=False)
        assert trainer._engine is not None
        runs.append((trainer, queries, responses))
    (fast, queries, responses), (eager, _, _) = runs
    rewards = torch.linspace(-1, 1, 8)
    stats = [t.step(queries=queries, responses=responses, rewards=rewards) for t in (fast, eager)]
    assert fast._graphed.enabled and fast._graphed.captures >= 1 and not eager._graphed
    assert fast._scoring.enabled and fast._scoring.captures >= 1
    for key in ("ppo/loss/policy", "ppo/loss/value", "objective/kl", "ppo/val/error"):
        assert stats[0][key] == pytest.approx(stats[1][key], rel=0.05, abs=1e-3), key
    for _ in range(2):
        responses = fast.generate(queries, return_prompt=False)
        stats = fast.step(queries=queries, responses=responses, rewards=rewards)
        assert all(math.isfinite(v) for v in stats.values()), stats
