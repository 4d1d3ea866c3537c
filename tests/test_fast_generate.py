"""lessons_lib.fast_generate against transformers and peft: same logits, same greedy tokens, same sampling law.

Small random Qwen2 and Llama models with odd sizes (GQA, q/k/v biases, MLP biases, tied and untied embeddings,
llama3 RoPE scaling), plain, with LoRA, and 4-bit (bitsandbytes on CPU). fp32 comparisons are tight; the CUDA
tests (graph replay vs eager, bf16) run on the GPU machine.
"""

import logging
import math

import pytest
import torch

from lessons_lib.fast_generate import RolloutEngine, engine_for, fast_generate
from lessons_lib.fastgen import sampling

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]
ALL_PROJ = QKVO + ["gate_proj", "up_proj", "down_proj"]


def tiny(kind: str, dtype=torch.float32, init: float = 0.2):
    """Random models with odd sizes. init: weight std (large enough that greedy decoding does not loop at once)."""
    common = dict(rms_norm_eps=1e-5, initializer_range=init, max_position_embeddings=256)
    if kind == "qwen2-tied":  # 5 heads on 1 kv head, hs 8, tied embeddings, q/k/v biases
        cfg = transformers.Qwen2Config(hidden_size=40, intermediate_size=72, num_hidden_layers=2, num_attention_heads=5,
                                       num_key_value_heads=1, vocab_size=97, tie_word_embeddings=True,
                                       rope_theta=5000.0, **common)
        model = transformers.Qwen2ForCausalLM(cfg)
    elif kind == "qwen2-untied":  # 6 heads on 2 kv heads, 3 layers
        cfg = transformers.Qwen2Config(hidden_size=48, intermediate_size=88, num_hidden_layers=3, num_attention_heads=6,
                                       num_key_value_heads=2, vocab_size=101, tie_word_embeddings=False,
                                       rope_theta=10000.0, **common)
        model = transformers.Qwen2ForCausalLM(cfg)
    elif kind == "llama":  # explicit head_dim 12 != hidden / heads, attention and MLP biases, llama3 RoPE scaling
        cfg = transformers.LlamaConfig(hidden_size=48, intermediate_size=100, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=12, vocab_size=89,
                                       tie_word_embeddings=False, attention_bias=True, mlp_bias=True,
                                       rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                                        "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                        "original_max_position_embeddings": 16}, **common)
        model = transformers.LlamaForCausalLM(cfg)
    else:
        raise ValueError(kind)
    with torch.no_grad():  # biases are zero-initialised: give them values, so a missed bias is seen
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.to(dtype).eval()


MODELS = ["qwen2-tied", "qwen2-untied", "llama"]


def batch(vocab: int, B: int = 4, Tq: int = 9, pads=(3, 0, 5, 1), gen=None):
    """Left-padded prompts: (ids, mask), both (B, Tq)."""
    ids = torch.randint(0, vocab, (B, Tq), generator=gen)
    mask = torch.ones(B, Tq, dtype=torch.long)
    for i, p in enumerate(pads[:B]):
        mask[i, :p] = 0
    return ids, mask


@torch.no_grad()
def hf_logits(model, ids, mask, cont):
    """The model's logits for prompt + continuation, at the positions predicting each continuation token."""
    full = torch.cat([ids, cont], 1)
    fmask = torch.cat([mask, torch.ones_like(cont)], 1)
    pos = (fmask.cumsum(1) - 1).clamp(min=0)
    return model(input_ids=full, attention_mask=fmask, position_ids=pos).logits[:, ids.shape[1] - 1:-1].float()


def assert_close(actual, expected, rtol, what):
    err = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert err <= rtol * max(scale, 1.0), f"{what}: max abs error {err:.3g} (logit scale {scale:.3g}, rtol {rtol})"


# ----------------------------------------------------------------------------------------------- logits


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("weights", ["dense", "lean"])
def test_logits_equal_hf(kind, weights):
    model = tiny(kind)
    ids, mask = batch(model.config.vocab_size)
    cont = torch.randint(0, model.config.vocab_size, (4, 6))
    engine = RolloutEngine(model, weights=weights, prompt_bucket=8)  # 9 -> 16 columns: extra padding is harmless
    assert_close(engine.forced_logits(ids, mask, cont), hf_logits(model, ids, mask, cont), 2e-5, f"{kind} {weights}")
    mem = engine.memory()
    assert mem["dense_layers"] == (mem["layers"] if weights == "dense" else 0)


@pytest.mark.parametrize("kind", ["qwen2-untied", "llama"])
def test_triton_kernels_path_equals_hf(kind):
    """kernels="triton": RMSNorm and RoPE from lessons_lib.kernels (here in the Triton interpreter)."""
    from lessons_lib.kernels import INTERPRETED

    if not INTERPRETED and not torch.cuda.is_available():
        pytest.skip("needs TRITON_INTERPRET=1 (set by conftest.py on machines without a GPU) or a GPU")
    model = tiny(kind)
    ids, mask = batch(model.config.vocab_size, B=3, Tq=6)
    cont = torch.randint(0, model.config.vocab_size, (3, 4))
    engine = RolloutEngine(model, kernels="triton", prompt_bucket=1)
    assert_close(engine.forced_logits(ids, mask, cont), hf_logits(model, ids, mask, cont), 2e-5, f"{kind} triton")
    kw = dict(do_sample=False, max_new_tokens=6, eos_token_id=[], pad_token_id=0)
    with torch.no_grad():
        hf = model.generate(input_ids=ids, attention_mask=mask, **{**kw, "eos_token_id": None})[:, ids.shape[1]:]
    assert torch.equal(engine.generate(ids, mask, **kw).response_ids, hf)


def lora_model(kind, targets, dtype=torch.float32, r=4):
    model = tiny(kind, dtype)
    cfg = peft.LoraConfig(r=r, lora_alpha=3 * r, target_modules=targets, init_lora_weights=False)  # B != 0
    return peft.get_peft_model(model, cfg).eval()


def nudge_lora(model, scale=0.05):
    """A stand-in for an optimizer step: every LoRA parameter changes in place."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn_like(p) * scale)


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("weights", ["dense", "lean"])
def test_lora_logits_and_refresh_after_update(kind, weights):
    model = lora_model(kind, ALL_PROJ if kind == "llama" else QKVO)
    ids, mask = batch(model.config.vocab_size, B=3, Tq=7)
    cont = torch.randint(0, model.config.vocab_size, (3, 5))
    engine = RolloutEngine(model, weights=weights, prompt_bucket=1)
    assert_close(engine.forced_logits(ids, mask, cont), hf_logits(model, ids, mask, cont), 2e-5, "before update")

    before = hf_logits(model, ids, mask, cont)
    nudge_lora(model)
    after = hf_logits(model, ids, mask, cont)
    assert (after - before).abs().max() > 1e-2, "the simulated update must change the model"
    refreshed = engine.refreshes
    assert_close(engine.forced_logits(ids, mask, cont), after, 2e-5, "after update (automatic refresh)")
    layers = model.config.num_hidden_layers
    assert engine.refreshes - refreshed == layers * (4 if kind == "llama" else 2)  # only the projections with LoRA
    assert engine.refresh() == 0, "nothing changed since the last refresh"

    with model.disable_adapter():  # PPO's reference policy: adapters off -> base model logits
        base = hf_logits(model, ids, mask, cont)
        assert_close(engine.forced_logits(ids, mask, cont), base, 2e-5, "adapters disabled")
    assert_close(engine.forced_logits(ids, mask, cont), after, 2e-5, "adapters enabled again")


@pytest.mark.parametrize("fused", [False, True])
def test_refresh_after_real_optimizer_steps(fused):
    """A real backward + AdamW step. Fused AdamW does not bump tensors' version counters: the engine must still
    see the new LoRA weights (it compares them with a snapshot)."""
    model = lora_model("qwen2-tied", QKVO)
    ids, mask = batch(model.config.vocab_size, B=2, Tq=5)
    cont = torch.randint(0, model.config.vocab_size, (2, 4))
    engine = RolloutEngine(model)
    engine.forced_logits(ids, mask, cont)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, fused=fused)
    for _ in range(2):
        versions = [p._version for p in params]
        model.train()
        model(input_ids=torch.cat([ids, cont], 1)).logits.float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        model.eval()
        assert fused == all(p._version == v for p, v in zip(params, versions))  # what makes this test necessary
        assert_close(engine.forced_logits(ids, mask, cont), hf_logits(model, ids, mask, cont), 2e-5,
                     f"after an AdamW(fused={fused}) step")


def test_auto_budget_mixes_dense_and_lean_layers():
    model = lora_model("qwen2-untied", QKVO)
    layer0 = RolloutEngine(model, weights="dense").build().decoder.layers[0]
    one_layer = sum(p.dense_nbytes() for p in layer0.projs)
    engine = RolloutEngine(model, weights="auto", max_extra_memory=one_layer + 4096).build()
    assert engine.memory()["dense_layers"] == 1
    assert [all(p.dense for p in layer.projs) for layer in engine.decoder.layers] == [True, False, False]
    ids, mask = batch(model.config.vocab_size, B=2, Tq=5)
    cont = torch.randint(0, model.config.vocab_size, (2, 4))
    assert_close(engine.forced_logits(ids, mask, cont), hf_logits(model, ids, mask, cont), 2e-5, "mixed layers")


# ----------------------------------------------------------------------------------------------- greedy decoding


def eos_from_hf(model, ids, mask, step=3):
    """A token the model emits greedily at `step` in row 0: used as EOS so that EOS handling is exercised."""
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=step + 1,
                         eos_token_id=None, pad_token_id=0)
    return int(out[0, ids.shape[1] + step])


@pytest.mark.parametrize("kind", MODELS)
def test_greedy_equals_hf_generate(kind):
    model = lora_model(kind, QKVO)
    V = model.config.vocab_size
    ids, mask = batch(V, B=4, Tq=8)
    pad = V - 1
    eos = eos_from_hf(model, ids, mask)
    kw = dict(do_sample=False, max_new_tokens=24, eos_token_id=eos, pad_token_id=pad)
    with torch.no_grad():
        hf = model.generate(input_ids=ids, attention_mask=mask, **kw)[:, ids.shape[1]:]
    out = RolloutEngine(model, check_every=5).generate(ids, mask, **kw)
    assert out.response_ids.shape == hf.shape
    assert torch.equal(out.response_ids, hf), f"engine\n{out.response_ids}\nHF generate\n{hf}"
    assert bool(out.finished[0]) and int(out.lengths[0]) == 4  # EOS at step 3, kept
    assert len(out.responses[0]) == 4 and int(out.responses[0][-1]) == eos
    for row, n, done in zip(out.response_ids, out.lengths.tolist(), out.finished.tolist()):
        assert (row[n:] == pad).all(), "tokens after EOS must be padding"
        assert done == (eos in row[:n].tolist())

    with torch.no_grad():  # min_new_tokens blocks EOS the way generate does
        hf = model.generate(input_ids=ids, attention_mask=mask, min_new_tokens=10, **kw)[:, ids.shape[1]:]
    out = RolloutEngine(model).generate(ids, mask, min_new_tokens=10, **kw)
    assert torch.equal(out.response_ids, hf)


def test_greedy_list_input_and_bucketing_do_not_change_tokens():
    model = tiny("qwen2-untied")
    V = model.config.vocab_size
    prompts = [torch.randint(0, V, (n,)) for n in (5, 11, 1, 8)]
    kw = dict(do_sample=False, max_new_tokens=12, eos_token_id=[], pad_token_id=0)
    a = RolloutEngine(model, prompt_bucket=1).generate(prompts, **kw)
    b = RolloutEngine(model, prompt_bucket=64).generate(prompts, **kw)
    assert torch.equal(a.response_ids, b.response_ids)
    assert a.response_ids.shape == (4, 12) and not a.finished.any() and (a.lengths == 12).all()
    ids, mask = torch.zeros(4, 11, dtype=torch.long), torch.zeros(4, 11, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, 11 - len(p):], mask[i, 11 - len(p):] = p, 1
    with torch.no_grad():
        hf = model.generate(input_ids=ids, attention_mask=mask, **{**kw, "eos_token_id": None})[:, 11:]
    assert torch.equal(a.response_ids, hf)


def test_fast_generate_takes_generate_kwargs():
    """The PPO trainer's generate kwargs (pure sampling, neutral penalties) work as they are; options that would
    change the output and are not implemented raise."""
    from lessons_lib.fast_generate import engine_kwargs

    model = tiny("llama")
    ids, mask = batch(model.config.vocab_size, B=2, Tq=4)
    trainer_kwargs = {"do_sample": True, "temperature": 0.7, "max_new_tokens": 5, "top_k": 0, "top_p": 1.0,
                      "min_p": None, "typical_p": 1.0, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
                      "eos_token_id": 3, "pad_token_id": 0}
    out = fast_generate(model, ids, mask, **trainer_kwargs)
    assert out.response_ids.shape[0] == 2 and out.response_ids.shape[1] <= 5
    assert engine_kwargs({"top_k": None, "temperature": None}) == {"top_k": 0, "temperature": 1.0}
    for bad in ({"repetition_penalty": 1.2}, {"num_beams": 4}, {"output_scores": True}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            fast_generate(model, ids, mask, max_new_tokens=2, **bad)


def test_failed_graph_capture_falls_back_to_eager(monkeypatch):
    """If capture fails after the warm-up steps ran (they advance the workspace), the engine warns, restores the
    workspace and decodes eagerly: the tokens are the same as without graphs."""
    import contextlib

    model = tiny("qwen2-tied")
    ids, mask = batch(model.config.vocab_size, B=2, Tq=4)
    kw = dict(do_sample=False, max_new_tokens=8, eos_token_id=[])
    expected = RolloutEngine(model).generate(ids, mask, **kw).response_ids

    class FakeStream:  # lets the warm-up steps run on the CPU
        def __init__(self, *args, **kwargs):
            pass

        def wait_stream(self, other):
            pass

    def no_graph():
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *args: FakeStream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", no_graph)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    engine = RolloutEngine(model)
    engine.cuda_graphs = True  # as on a GPU
    with pytest.warns(UserWarning, match="CUDA graph capture failed"):
        out = engine.generate(ids, mask, **kw)
    assert not engine.cuda_graphs
    assert torch.equal(out.response_ids, expected)


def test_engine_cache_and_keep_weights_false():
    model = tiny("qwen2-tied")
    ids, mask = batch(model.config.vocab_size, B=2, Tq=4)
    kw = dict(do_sample=False, max_new_tokens=6, eos_token_id=[])
    first = fast_generate(model, ids, mask, **kw)
    assert engine_for(model) is engine_for(model)
    lean = RolloutEngine(model, keep_weights=False)
    for _ in range(2):
        out = lean.generate(ids, mask, **kw)
        assert torch.equal(out.response_ids, first.response_ids)
        assert lean.decoder is None and lean.memory()["weights"] == 0  # freed after each call


# ----------------------------------------------------------------------------------------------- sampling law


def chi2_pvalue(observed: torch.Tensor, expected: torch.Tensor) -> float:
    """Pearson chi-square goodness of fit; cells with expected count < 5 are pooled into one."""
    small = expected < 5
    obs = torch.cat([observed[~small], observed[small].sum()[None]]) if small.any() else observed
    exp = torch.cat([expected[~small], expected[small].sum()[None]]) if small.any() else expected
    keep = exp > 0
    obs, exp = obs[keep].double(), exp[keep].double()
    stat = ((obs - exp) ** 2 / exp).sum()
    df = len(exp) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat / 2))


def draw(logits: torch.Tensor, n: int, temperature: float, top_k=0, top_p=1.0) -> torch.Tensor:
    """n Gumbel-max draws per row: counts (B, V)."""
    B, V = logits.shape
    scores = sampling.warp(logits.repeat_interleave(n, 0), torch.tensor(temperature), top_k, top_p)
    tokens = sampling.gumbel_argmax(scores).view(B, n)
    return torch.stack([torch.bincount(t, minlength=V) for t in tokens])


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (3, 1.0), (0, 0.8), (4, 0.7)])
def test_sampler_frequencies_match_generate_warpers(top_k, top_p):
    from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)

    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0, 1.5],
                           [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                           [5.0, -2.0, 1.0, 4.5, 0.3, 0.2, -9.0]])
    T, n = 0.7, 40_000
    warpers = LogitsProcessorList([TemperatureLogitsWarper(T)] + ([TopKLogitsWarper(top_k)] if top_k else [])
                                  + ([TopPLogitsWarper(top_p)] if top_p < 1 else []))
    expected = warpers(None, logits.clone()).softmax(-1)                           # generate's distribution
    assert torch.allclose(sampling.warp(logits, T, top_k, top_p).softmax(-1), expected, atol=1e-7)
    counts = draw(logits, n, T, top_k, top_p)
    for row in range(3):
        p = chi2_pvalue(counts[row], expected[row] * n)
        assert p > 1e-4, f"row {row}: {counts[row].tolist()} vs expected {(expected[row] * n).tolist()} (p={p:.2g})"
        assert (counts[row][expected[row] == 0] == 0).all(), "a filtered-out token was drawn"
    # the same test has the power to reject a wrong temperature
    wrong = logits.softmax(-1)
    assert chi2_pvalue(counts[0], wrong[0] * n) < 1e-6


def test_chosen_logprobs_and_eos_block():
    scores = torch.randn(5, 11)
    tokens = torch.randint(0, 11, (5,))
    expected = scores.log_softmax(-1).gather(1, tokens[:, None])[:, 0]
    assert torch.allclose(sampling.chosen_logprobs(scores, tokens), expected, atol=1e-6)
    eos = torch.zeros(11, dtype=torch.bool)
    eos[[2, 7]] = True
    blocked = sampling.block_eos(scores, eos, torch.tensor([3]), torch.tensor(4))
    assert torch.isinf(blocked[:, [2, 7]]).all() and torch.equal(blocked[:, ~eos], scores[:, ~eos])
    assert torch.equal(sampling.block_eos(scores, eos, torch.tensor([4]), torch.tensor(4)), scores)


def test_sampled_sequences_follow_generate_distribution():
    """Engine vs `generate` sampling from the same tiny model: per-position token histograms agree (two-sample
    chi-square), and the first token follows softmax(logits / T) exactly."""
    torch.manual_seed(1)
    cfg = transformers.Qwen2Config(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=13, tie_word_embeddings=True,
                                   initializer_range=0.5, rms_norm_eps=1e-5)
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    prompts = torch.tensor([[3, 7, 1], [0, 5, 9]])
    mask = torch.tensor([[1, 1, 1], [0, 1, 1]])
    R, T, steps = 1500, 0.7, 3
    ids, m = prompts.repeat_interleave(R, 0), mask.repeat_interleave(R, 0)
    kw = dict(do_sample=True, temperature=T, max_new_tokens=steps, eos_token_id=[], pad_token_id=0)
    ours = RolloutEngine(model).generate(ids, m, **kw, return_logprobs=True)
    with torch.no_grad():
        theirs = model.generate(input_ids=ids, attention_mask=m, top_k=0, top_p=1.0,
                                **{**kw, "eos_token_id": None})[:, 3:]
        first = model(input_ids=prompts, attention_mask=mask).logits[:, -1].div(T).softmax(-1)   # (2, V)
    assert ours.response_ids.shape == theirs.shape == (2 * R, steps)
    V = cfg.vocab_size
    for p in range(2):
        rows = slice(p * R, (p + 1) * R)
        a = torch.bincount(ours.response_ids[rows, 0], minlength=V)
        assert chi2_pvalue(a, first[p] * R) > 1e-4, f"prompt {p}: first token {a.tolist()} vs {(first[p] * R).tolist()}"
        for t in range(steps):
            a = torch.bincount(ours.response_ids[rows, t], minlength=V).double()
            b = torch.bincount(theirs[rows, t], minlength=V).double()
            pooled = (a + b) / 2                                                   # equal sample sizes
            stat_p = chi2_pvalue(torch.cat([a, b]), torch.cat([pooled, pooled]))
            assert stat_p > 1e-4, f"prompt {p} position {t}: engine {a.tolist()} vs generate {b.tolist()}"
    # returned log-probs are log softmax(logits / T) of the sampled tokens, as the model computes them
    sub = slice(0, 2 * R, 100)
    full_lp = hf_logits(model, ids[sub], m[sub], ours.response_ids[sub]).div(T).log_softmax(-1)
    want = full_lp.gather(2, ours.response_ids[sub][..., None])[..., 0]
    assert torch.allclose(ours.logprobs[sub], want, atol=1e-5)


# ----------------------------------------------------------------------------------------------- 4-bit


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """A random Qwen2 with in_features that are multiples of the 4-bit block size, saved for a 4-bit load."""
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(hidden_size=128, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=97, tie_word_embeddings=True,
                                   initializer_range=0.2, rms_norm_eps=1e-5)
    path = tmp_path_factory.mktemp("tiny-qwen2")
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(path)
    return path


def load_4bit(path, lora=True):
    bnb = pytest.importorskip("bitsandbytes")
    qcfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                           bnb_4bit_compute_dtype=torch.float32)
    model = transformers.Qwen2ForCausalLM.from_pretrained(path, quantization_config=qcfg, dtype=torch.float32,
                                                          device_map="cpu")
    for m in model.modules():  # the loader's fix for bitsandbytes' CPU repacking (docs/ENVIRONMENT.md)
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
    if lora:
        model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=QKVO,
                                                           init_lora_weights=False))
    return model.eval()


@pytest.mark.parametrize("weights", ["dense", "lean"])
def test_4bit_lora_logits_equal_the_4bit_model(saved_model, weights):
    model = load_4bit(saved_model)
    assert model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight.quant_state is not None
    ids, mask = batch(97, B=3, Tq=6)
    cont = torch.randint(0, 97, (3, 5))
    engine = RolloutEngine(model, weights=weights)
    assert_close(engine.forced_logits(ids, mask, cont), hf_logits(model, ids, mask, cont), 2e-5, f"4-bit {weights}")
    nudge_lora(model)
    assert_close(engine.forced_logits(ids, mask, cont), hf_logits(model, ids, mask, cont), 2e-5, "after update")
    mem = engine.memory()
    dense_bytes = 2 * 4 * (256 * 128 + 128 * 128 + 384 * 128 + 128 * 192)       # 2 layers of fp32 q|k|v, o, g|u, d
    if weights == "dense":
        assert mem["weights"] > dense_bytes and mem["scratch"] == 0
    else:  # only LoRA factors and biases copied, and one dequantization buffer as big as the largest matrix (g|u)
        assert mem["weights"] < 0.1 * dense_bytes and mem["scratch"] == 384 * 128 * 4


def test_4bit_weights_repacked_by_bitsandbytes_cpu_path(saved_model):
    """bitsandbytes repacks 4-bit weights for its AVX512-BF16 CPU kernel (and rounds their scales to bf16); the
    engine must read the repacked layout back into the original element order."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu, dequantize_blockwise

    from lessons_lib.fastgen.weights import Source

    layer = load_4bit(saved_model, lora=False).model.layers[1].mlp.down_proj
    w, qs = layer.weight, layer.weight.quant_state
    absmax = (dequantize_blockwise(qs.absmax, qs.state2) + qs.offset).float()
    expected = torch.ops.bitsandbytes.dequantize_4bit.default(w.data, absmax.bfloat16().float(), qs.blocksize,
                                                              "nf4", tuple(qs.shape), torch.float32)
    w.data, layer.weight.quant_state = _convert_weight_packed_for_cpu(w.data, qs)
    assert layer.weight.quant_state.packing_format_for_cpu
    assert torch.equal(Source(layer, "down_proj").merged_weight(), expected)


# ----------------------------------------------------------------------------------------------- bf16, errors


def test_bf16_error_is_no_worse_than_the_models_own():
    model32 = tiny("qwen2-untied")
    model16 = tiny("qwen2-untied")
    model16.load_state_dict(model32.state_dict())
    model16 = model16.to(torch.bfloat16)
    ids, mask = batch(model32.config.vocab_size)
    cont = torch.randint(0, model32.config.vocab_size, (4, 6))
    truth = hf_logits(model32, ids, mask, cont)
    hf_err = (hf_logits(model16, ids, mask, cont) - truth).abs().max().item()
    ours = RolloutEngine(model16).forced_logits(ids, mask, cont)
    assert ours.dtype == torch.float32
    our_err = (ours - truth).abs().max().item()
    assert our_err <= 2 * hf_err + 1e-3, f"bf16 engine error {our_err:.3g} vs transformers' own bf16 error {hf_err:.3g}"


def test_clear_errors():
    model = tiny("qwen2-tied")
    engine = RolloutEngine(model)
    ids, mask = batch(97, B=2, Tq=5)
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    with pytest.raises(ValueError, match=r"prompts \[0\] are not left-padded"):
        engine.generate(ids, right, max_new_tokens=2)
    with pytest.raises(ValueError, match=r"prompts \[1\] have no tokens"):
        engine.generate(ids, torch.tensor([[1] * 5, [0] * 5]), max_new_tokens=2)
    with pytest.raises(ValueError, match="temperature"):
        engine.generate(ids, mask, temperature=0.0)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.generate(ids, mask, eos_token_id=500)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50))
    with pytest.raises(NotImplementedError, match="model_type='gpt2'"):
        RolloutEngine(gpt2)
    dora = peft.get_peft_model(tiny("llama"), peft.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(NotImplementedError, match="DoRA"):
        RolloutEngine(dora).build()


# ----------------------------------------------------------------------------------------------- CUDA (GPU machine)


def cuda_model(kind="qwen2-untied", dtype=torch.bfloat16):
    return lora_model(kind, QKVO, dtype=dtype).cuda()


@pytest.mark.cuda
@pytest.mark.parametrize("weights,kernels", [("dense", "torch"), ("lean", "torch"), ("dense", "triton")])
def test_cuda_graph_replay_equals_eager(weights, kernels):
    model = cuda_model()
    ids, mask = (t.cuda() for t in batch(model.config.vocab_size, B=5, Tq=9))
    kw = dict(do_sample=False, max_new_tokens=40, eos_token_id=[], return_logprobs=True)
    opts = dict(weights=weights, kernels=kernels)
    graphed = RolloutEngine(model, cuda_graphs=True, **opts).generate(ids, mask, **kw)
    eager = RolloutEngine(model, cuda_graphs=False, **opts).generate(ids, mask, **kw)
    assert torch.equal(graphed.response_ids, eager.response_ids)
    assert torch.allclose(graphed.logprobs, eager.logprobs, atol=1e-6, rtol=0)  # the same kernels, replayed


@pytest.mark.cuda
def test_cuda_graph_follows_lora_updates_without_recapture():
    model = cuda_model()
    ids, mask = (t.cuda() for t in batch(model.config.vocab_size, B=3, Tq=7))
    kw = dict(do_sample=False, max_new_tokens=16, eos_token_id=[], return_logprobs=True)
    engine = RolloutEngine(model)
    before = engine.generate(ids, mask, **kw)
    key = (True, 0, 1.0, True)
    graph = next(iter(engine._workspaces.values())).graphs[key]
    nudge_lora(model, 0.5)
    after = engine.generate(ids, mask, **kw)
    assert next(iter(engine._workspaces.values())).graphs[key] is graph, "an in-place update must not recapture"
    eager = RolloutEngine(model, cuda_graphs=False).generate(ids, mask, **kw)
    assert torch.equal(after.response_ids, eager.response_ids)
    assert torch.allclose(after.logprobs, eager.logprobs, atol=1e-6, rtol=0)
    assert not torch.allclose(after.logprobs, before.logprobs), "the update must change what the graph computes"


@pytest.mark.cuda
@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_cuda_bf16_logits_close_to_hf(kind, kernels):
    """bf16 on the GPU: the engine's error against an fp32 model is no worse than transformers' own bf16 error."""
    model = cuda_model(kind, dtype=torch.float32)
    ids, mask = (t.cuda() for t in batch(model.config.vocab_size))
    cont = torch.randint(0, model.config.vocab_size, (4, 6), device="cuda")
    truth = hf_logits(model, ids, mask, cont)
    model16 = model.to(torch.bfloat16)
    hf_err = (hf_logits(model16, ids, mask, cont) - truth).abs().max().item()
    our_err = (RolloutEngine(model16, kernels=kernels).forced_logits(ids, mask, cont) - truth).abs().max().item()
    assert our_err <= 2 * hf_err + 1e-3, f"{kind}: engine bf16 error {our_err:.3g} vs transformers' {hf_err:.3g}"


@pytest.mark.cuda
def test_cuda_sampling_first_token_law():
    model = tiny("qwen2-tied", init=0.5).cuda()
    prompt = torch.tensor([[5, 17, 2, 44]], device="cuda")
    n, T = 20_000, 0.7
    out = RolloutEngine(model).generate(prompt.expand(n, -1), max_new_tokens=4, temperature=T, eos_token_id=[])
    with torch.no_grad():
        probs = model(prompt).logits[0, -1].float().div(T).softmax(-1)
    counts = torch.bincount(out.response_ids[:, 0], minlength=probs.numel()).cpu()
    assert chi2_pvalue(counts, probs.cpu() * n) > 1e-4
    assert math.isfinite(float(out.response_ids.float().sum()))


def fp32_twin_of_4bit_lora(model):
    """An fp32 model computing with exactly the weights of a bitsandbytes 4-bit + LoRA `model`: every 4-bit matrix
    dequantized in fp32 (code * absmax, not rounded to the compute dtype), every other parameter (embeddings,
    norms, biases, LoRA factors) upcast from what `model` holds. Its logits are the truth both the engine and
    transformers' own 4-bit model approximate in bf16."""
    import dataclasses

    from lessons_lib.nf4 import NF4State, dequantize_nf4

    base = model.get_base_model()
    config = transformers.Qwen2Config.from_dict({k: v for k, v in base.config.to_dict().items()
                                                 if k != "quantization_config"})
    twin = peft.get_peft_model(transformers.Qwen2ForCausalLM(config).float(), model.peft_config["default"])
    source = dict(model.named_parameters())
    with torch.no_grad():
        for name, p in twin.named_parameters():
            held = source[name]
            quant_state = getattr(held, "quant_state", None)
            if quant_state is not None:  # a 4-bit weight
                state = dataclasses.replace(NF4State.from_bnb(quant_state), dtype=torch.float32)
                p.copy_(dequantize_nf4(held.data, state))
            else:
                p.copy_(held.float())
    return twin.to(next(model.parameters()).device).eval()


@pytest.mark.cuda
@pytest.mark.parametrize("weights", ["dense", "lean"])
def test_cuda_4bit_lora_graph(saved_model, weights):
    """bitsandbytes 4-bit + LoRA in bf16 on the GPU: the engine (the lean path dequantizes inside the captured graph)
    against the fp32 truth of the same weights must be no worse than transformers' own bf16 model (within 2x), and
    agree on the argmax wherever the truth's top-2 margin exceeds that error bound twice."""
    bnb = pytest.importorskip("bitsandbytes")
    qcfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                           bnb_4bit_compute_dtype=torch.bfloat16)
    model = transformers.Qwen2ForCausalLM.from_pretrained(saved_model, quantization_config=qcfg, dtype=torch.bfloat16,
                                                          device_map={"": "cuda"})
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=QKVO,
                                                       init_lora_weights=False)).eval()
    ids, mask = (t.cuda() for t in batch(97, B=3, Tq=6))
    cont = torch.randint(0, 97, (3, 5), device="cuda")
    truth = hf_logits(fp32_twin_of_4bit_lora(model), ids, mask, cont)
    engine = RolloutEngine(model, weights=weights)
    ours = engine.forced_logits(ids, mask, cont)
    hf_err = (hf_logits(model, ids, mask, cont) - truth).abs().max().item()
    our_err = (ours - truth).abs().max().item()
    assert our_err <= 2 * hf_err + 1e-3, f"4-bit {weights}: engine error {our_err:.3g} vs transformers' {hf_err:.3g}"
    top2 = truth.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 2 * (2 * hf_err + 1e-3)  # no error within the bound can flip these
    assert torch.equal(ours.argmax(-1)[clear], truth.argmax(-1)[clear]), f"argmax differs ({int(clear.sum())} clear)"
    kw = dict(do_sample=False, max_new_tokens=24, eos_token_id=[], return_logprobs=True)
    graphed = engine.generate(ids, mask, **kw)
    eager = RolloutEngine(model, weights=weights, cuda_graphs=False).generate(ids, mask, **kw)
    assert torch.equal(graphed.response_ids, eager.response_ids)
    assert torch.allclose(graphed.logprobs, eager.logprobs, atol=1e-6, rtol=0)
