"""get_peft_model (targets, the true trainable count) and merge_lora (a plain model with equal outputs)."""

import logging

import pytest
import torch

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
bnb = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")

from lessons_lib.models import (  # noqa: E402
    DEFAULT_TARGET_MODULES, TINY_CONFIG, count_parameters, get_peft_model, load_model, merge_lora, save_random_model,
)

ARCHS = ["qwen2", "llama"]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_models")
    # sizes unlike the defaults: 6 heads of 32, 2 KV heads, MLP 320 (multiples of 64, see docs/LOADING.md)
    sizes = dict(hidden_size=96 * 2, num_attention_heads=6, num_key_value_heads=2, intermediate_size=320)
    return {arch: save_random_model(root / arch, arch=arch, seed=7 + i, **sizes) for i, arch in enumerate(ARCHS)}


def inputs_for(tokenizer):
    tokenizer.padding_side = "left"
    return tokenizer(["Write a bullet list of three fruits.", "Name two colors: red"], return_tensors="pt",
                     padding=True)


def expected_lora_params(config, r, targets):
    """r * (in + out) per adapted matrix, from the config alone."""
    h, kv = config.hidden_size, config.num_key_value_heads * (config.hidden_size // config.num_attention_heads)
    shapes = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
              "gate_proj": (h, config.intermediate_size), "up_proj": (h, config.intermediate_size),
              "down_proj": (config.intermediate_size, h)}
    return config.num_hidden_layers * sum(r * (shapes[t][0] + shapes[t][1]) for t in targets)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("targets", [None, ["q_proj", "k_proj", "v_proj", "o_proj"]], ids=["default", "qkvo"])
def test_trainable_count_is_the_true_one(model_dirs, arch, targets, capsys):
    model, _ = load_model(model_dirs[arch])
    base_total = count_parameters(model)[1]
    peft_model = get_peft_model(model, r=8, target_modules=targets)
    printed = capsys.readouterr().out
    used = targets or DEFAULT_TARGET_MODULES[arch]
    expected = expected_lora_params(model.config, 8, used)
    trainable, total = count_parameters(peft_model)
    assert trainable == expected
    assert total == base_total + expected  # 4-bit weights counted as values, not packed bytes
    assert sum(p.numel() for n, p in peft_model.named_parameters() if p.requires_grad) == expected
    assert f"trainable params: {expected:,}" in printed
    # count_parameters really counts 4-bit weights unpacked: same total as the full-precision model
    plain, _ = load_model(model_dirs[arch], load_in_4bit=False)
    assert count_parameters(plain)[1] == base_total == sum(p.numel() for p in plain.parameters())


def test_default_targets_cover_attention_and_mlp(model_dirs):
    model, _ = load_model(model_dirs["qwen2"])
    peft_model = get_peft_model(model, verbose=False)
    adapted = {n.split(".")[-1] for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == set(DEFAULT_TARGET_MODULES["qwen2"])


def test_b_starts_at_zero_so_the_model_is_unchanged(model_dirs):
    model, tokenizer = load_model(model_dirs["llama"])
    inputs = inputs_for(tokenizer)
    with torch.no_grad():
        before = model(**inputs).logits
    peft_model = get_peft_model(model, r=4, verbose=False)
    assert all(m.lora_B["default"].weight.abs().sum() == 0 for m in peft_model.modules() if hasattr(m, "lora_B"))
    with torch.no_grad():
        after = peft_model(**inputs).logits
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_already_adapted_model_is_returned_unchanged(model_dirs, capsys):
    model, _ = load_model(model_dirs["qwen2"])
    peft_model = get_peft_model(model, r=4, verbose=False)
    assert get_peft_model(peft_model, r=8) is peft_model
    assert "already has LoRA adapters" in capsys.readouterr().out


def test_bad_rank_is_a_clear_error(model_dirs):
    model, _ = load_model(model_dirs["qwen2"])
    with pytest.raises(ValueError, match="r must be a positive integer"):
        get_peft_model(model, r=0)


def _train_a_little(peft_model, inputs, steps=3):
    """A few AdamW steps so B (and A) move away from their initial values."""
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    for _ in range(steps):
        peft_model(**inputs, labels=inputs["input_ids"]).loss.backward()
        opt.step()
        opt.zero_grad()
    peft_model.eval()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("load_in_4bit", [True, False], ids=["4bit", "fp32"])
def test_merge_lora_gives_a_plain_model_with_equal_outputs(model_dirs, arch, load_in_4bit, tmp_path):
    model, tokenizer = load_model(model_dirs[arch], load_in_4bit=load_in_4bit)
    peft_model = get_peft_model(model, r=8, lora_alpha=16, verbose=False)
    inputs = inputs_for(tokenizer)
    _train_a_little(peft_model, inputs)
    with torch.no_grad():
        base_logits = None
        with peft_model.disable_adapter():
            base_logits = peft_model(**inputs).logits
        expected = peft_model(**inputs).logits
    assert (expected - base_logits).abs().max() > 1e-3, "the adapters did not change the model; test is vacuous"

    merged = merge_lora(peft_model)
    assert type(merged).__name__ == type(model).__name__
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in merged.modules())
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert {p.dtype for p in merged.parameters()} == {torch.float32}
    assert not hasattr(merged.config, "quantization_config")
    with torch.no_grad():
        got = merged(**inputs).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # the adapter model is untouched
    with torch.no_grad():
        torch.testing.assert_close(peft_model(**inputs).logits, expected, rtol=0, atol=0)
    # and the merged model saves and reloads as an ordinary model
    merged.save_pretrained(tmp_path / "merged")
    tokenizer.save_pretrained(tmp_path / "merged")
    reloaded, _ = load_model(tmp_path / "merged", load_in_4bit=False)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, got, rtol=0, atol=0)


def test_merge_lora_of_a_4bit_reward_model_keeps_the_trained_head(tmp_path, model_dirs):
    cfg = transformers.AutoConfig.from_pretrained(model_dirs["qwen2"])
    cfg.num_labels, cfg.architectures = 1, ["Qwen2ForSequenceClassification"]
    transformers.AutoModelForSequenceClassification.from_config(cfg).save_pretrained(tmp_path / "rm")
    transformers.AutoTokenizer.from_pretrained(model_dirs["qwen2"]).save_pretrained(tmp_path / "rm")
    model, tokenizer = load_model(tmp_path / "rm")
    peft_model = get_peft_model(model, r=4, verbose=False)
    assert any(p.requires_grad for n, p in peft_model.named_parameters() if "score" in n)  # head is trained
    inputs = inputs_for(tokenizer)
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        peft_model(**inputs).logits.pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    peft_model.eval()
    with torch.no_grad():
        expected = peft_model(**inputs).logits
        merged = merge_lora(peft_model)
        torch.testing.assert_close(merged(**inputs).logits, expected, rtol=1e-4, atol=1e-4)


def test_merge_lora_needs_adapters(model_dirs):
    model, _ = load_model(model_dirs["qwen2"], load_in_4bit=False)
    with pytest.raises(TypeError, match="expected a peft model"):
        merge_lora(model)


def test_tiny_config_is_what_the_tests_assume():
    assert TINY_CONFIG["hidden_size"] % 64 == 0 and TINY_CONFIG["intermediate_size"] % 64 == 0


@pytest.mark.cuda
@pytest.mark.parametrize("arch", ARCHS)
def test_merge_lora_on_cuda_bf16(model_dirs, arch):
    model, tokenizer = load_model(model_dirs[arch])
    peft_model = get_peft_model(model, r=8, verbose=False)
    inputs = inputs_for(tokenizer).to("cuda")
    _train_a_little(peft_model, inputs)
    with torch.no_grad():
        expected = peft_model(**inputs).logits.float()
        merged = merge_lora(peft_model)
        assert next(merged.parameters()).dtype == model.dtype
        got = merged(**inputs).logits.float()
    # bf16: the merged weight is rounded once more than the 4-bit + adapter path
    torch.testing.assert_close(got, expected, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("load_in_4bit", [True, False], ids=["4bit", "fp32"])
def test_causal_lm_loss_equals_the_transformers_loss_and_its_gradients(model_dirs, load_in_4bit):
    from lessons_lib.models import causal_lm_loss

    model, tokenizer = load_model(model_dirs["qwen2"], load_in_4bit=load_in_4bit)
    peft_model = get_peft_model(model, r=4, init_lora_weights=False, verbose=False)
    peft_model.train()
    inputs = inputs_for(tokenizer)  # left padded: masked positions must be ignored
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    results = []
    for compute in (lambda: peft_model(**inputs, labels=labels).loss,
                    lambda: causal_lm_loss(peft_model, inputs["input_ids"], inputs["attention_mask"], chunk_tokens=7)):
        peft_model.zero_grad(set_to_none=True)
        loss = compute()
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad}))
    (ref_loss, ref_grads), (loss, grads) = results
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="no position has a label"):
        causal_lm_loss(peft_model, inputs["input_ids"], labels=torch.full_like(labels, -100))


def test_unsloth_style_arguments(model_dirs):
    """Code written for Unsloth passes use_gradient_checkpointing="unsloth" and random_state: both work here."""
    weights = []
    for _ in range(2):
        model, _ = load_model(model_dirs["llama"], gradient_checkpointing=False)
        peft_model = get_peft_model(model, r=4, use_gradient_checkpointing="unsloth", random_state=3407, verbose=False)
        assert peft_model.is_gradient_checkpointing
        weights.append(next(p for n, p in peft_model.named_parameters() if "lora_A" in n).detach().clone())
    torch.testing.assert_close(weights[0], weights[1], rtol=0, atol=0)


@pytest.mark.parametrize("lora_dropout", [0.0, 0.1])
def test_checkpoints_skip_the_rng_state_only_without_dropout(model_dirs, lora_dropout):
    """No dropout: recomputation is deterministic, so checkpoints need not save the RNG state (and a CUDA graph can
    capture them); with dropout they must, or the recomputed masks would differ from the forward's."""
    model, _ = load_model(model_dirs["qwen2"], gradient_checkpointing=True)
    model = get_peft_model(model, r=4, lora_dropout=lora_dropout, verbose=False)
    funcs = [m._gradient_checkpointing_func for m in model.modules() if getattr(m, "gradient_checkpointing", False)
             and hasattr(m, "_gradient_checkpointing_func")]
    assert funcs
    assert all(f.keywords["use_reentrant"] is False for f in funcs)
    assert all(f.keywords["preserve_rng_state"] is (lora_dropout > 0) for f in funcs)
