"""patch_model / unpatch_model on small random Qwen2 and Llama models with a peft LoRA on top.

A patched model must give the unpatched model's logits and LoRA gradients (within tolerance), really run the
kernels, leave other models alone, and come back exactly to transformers' code when unpatched.
"""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
from transformers.models.llama import modeling_llama
from transformers.models.qwen2 import modeling_qwen2

from lessons_lib.kernels import INTERPRETED, _common, is_patched, patch_model, unpatch_model
from lessons_lib.kernels.rms_norm import RMSNormFunction
from lessons_lib.kernels.rope import RoPEFunction
from lessons_lib.kernels.swiglu import SwiGLUFunction

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not INTERPRETED:
    pytest.skip("no GPU and the kernels were not defined under TRITON_INTERPRET=1", allow_module_level=True)
# On a GPU every test here runs compiled kernels on CUDA tensors: mark them all, so `pytest -m cuda` selects them.
pytestmark = [pytest.mark.cuda] if DEVICE == "cuda" else []



@pytest.fixture(autouse=True)
def _first_config_only(monkeypatch):
    monkeypatch.setattr(_common, "AUTOTUNE", False)  # no GPU autotuning in tests (tests/test_kernels.py says why)


FAMILIES = {
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, modeling_qwen2),
    "llama": (LlamaConfig, LlamaForCausalLM, modeling_llama),
}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_model(family, dtype=torch.float32, **overrides):
    config_cls, model_cls, _ = FAMILIES[family]
    config = config_cls(**{**dict(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
                                  num_key_value_heads=2, vocab_size=97, max_position_embeddings=64,
                                  rms_norm_eps=1e-6), **overrides})
    model = model_cls(config).to(device=DEVICE, dtype=dtype)
    # init_lora_weights=False: B is random too, so every LoRA matrix (A and B) gets a nonzero gradient
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, init_lora_weights=False))


def logits_and_lora_grads(model, input_ids, attention_mask=None):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    probe = torch.randn(logits.shape, generator=torch.Generator(DEVICE).manual_seed(1), device=DEVICE)
    (logits.float() * probe).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return logits.detach(), grads


def assert_rel_close(name, actual, expected, rel):
    err = ((actual.float() - expected.float()).norm() / expected.float().norm().clamp_min(1e-12)).item()
    assert err < rel, f"{name}: relative error {err:.2e} (allowed {rel:.0e})"


class KernelCalls:
    """Counts the autograd Functions of the kernels while active."""

    def __init__(self, monkeypatch):
        self.counts = {"rms_norm": 0, "rope": 0, "swiglu": 0}
        for name, fn_cls in [("rms_norm", RMSNormFunction), ("rope", RoPEFunction), ("swiglu", SwiGLUFunction)]:
            original = fn_cls.apply

            def counted(*args, _name=name, _original=original):
                self.counts[_name] += 1
                return _original(*args)

            monkeypatch.setattr(fn_cls, "apply", counted)


@pytest.mark.parametrize("family", FAMILIES)
def test_patched_model_matches_and_unpatches(family, monkeypatch):
    modeling = FAMILIES[family][2]
    original_rope = modeling.apply_rotary_pos_emb
    model = tiny_model(family)
    ids = torch.randint(0, 97, (2, 11), device=DEVICE)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding in one row
    logits, grads = logits_and_lora_grads(model, ids, mask)
    assert len(grads) == 2 * 2 * len(LORA_TARGETS) and all(g.abs().sum() > 0 for g in grads.values())

    calls = KernelCalls(monkeypatch)
    counts = patch_model(model, impl="triton")
    assert counts == {"rms_norm": 2 * 2 + 1, "swiglu": 2, "rope": 2}  # 2 norms per layer + the final one
    assert is_patched(model) and modeling.apply_rotary_pos_emb is not original_rope
    patched_logits, patched_grads = logits_and_lora_grads(model, ids, mask)
    assert calls.counts == {"rms_norm": 5, "rope": 2, "swiglu": 2}
    assert_rel_close("logits", patched_logits, logits, 1e-5)
    for name in grads:
        assert_rel_close(name, patched_grads[name], grads[name], 1e-4)

    assert unpatch_model(model) == counts
    assert not is_patched(model) and modeling.apply_rotary_pos_emb is original_rope
    assert not any("forward" in vars(m) for m in model.modules())
    again, again_grads = logits_and_lora_grads(model, ids, mask)
    assert torch.equal(again, logits)
    assert calls.counts == {"rms_norm": 5, "rope": 2, "swiglu": 2}  # nothing more ran through the kernels


def test_patching_is_per_model_and_explicit(monkeypatch):
    patched, plain = tiny_model("qwen2"), tiny_model("qwen2")
    ids = torch.randint(0, 97, (1, 6), device=DEVICE)
    calls = KernelCalls(monkeypatch)
    plain(input_ids=ids)
    assert calls.counts == {"rms_norm": 0, "rope": 0, "swiglu": 0}  # importing lessons_lib.kernels patched nothing
    patch_model(patched, impl="triton")
    plain(input_ids=ids)  # shares the module-level RoPE dispatcher with the patched model, but is not patched
    assert calls.counts == {"rms_norm": 0, "rope": 0, "swiglu": 0}
    with pytest.raises(RuntimeError, match="already patched"):
        patch_model(patched)
    unpatch_model(patched)
    with pytest.raises(RuntimeError, match="not patched"):
        unpatch_model(patched)
    with pytest.raises(ValueError, match="no Qwen2/Llama"):
        patch_model(torch.nn.Sequential(torch.nn.Linear(3, 3)))


def test_patched_generation_and_gradient_checkpointing():
    """KV-cache decoding (T = 1 steps) gives the same greedy tokens; checkpointed recomputation uses the kernels."""
    model = tiny_model("llama")
    ids = torch.randint(0, 97, (2, 5), device=DEVICE)
    with torch.no_grad():
        expected = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    logits, grads = logits_and_lora_grads(model, ids)
    patch_model(model, impl="triton")
    with torch.no_grad():
        tokens = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(tokens, expected)
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ckpt_logits, ckpt_grads = logits_and_lora_grads(model, ids)
    assert_rel_close("logits", ckpt_logits, logits, 1e-5)
    for name in grads:
        assert_rel_close(name, ckpt_grads[name], grads[name], 1e-4)
    unpatch_model(model)


def rel_err(actual, expected):
    return ((actual.float() - expected.float()).norm() / expected.float().norm().clamp_min(1e-12)).item()


@pytest.mark.cuda
def test_cuda_qwen2_1p5b_config_bf16():
    """The Qwen2-1.5B configuration (random weights, 4 of its 28 layers), bf16, LoRA r=16: the patched model is as
    close to the fp32 truth as the unpatched bf16 model (logits and every LoRA gradient)."""
    config = Qwen2Config(hidden_size=1536, intermediate_size=8960, num_hidden_layers=4, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, rope_theta=1e6,
                         rms_norm_eps=1e-6)
    model = get_peft_model(Qwen2ForCausalLM(config).to("cuda"), LoraConfig(
        r=16, lora_alpha=16, target_modules=LORA_TARGETS, init_lora_weights=False))
    ids = torch.randint(0, config.vocab_size, (2, 512), device="cuda")
    true_logits, true_grads = logits_and_lora_grads(model, ids)  # fp32 (TF32 is off by default)
    model.to(torch.bfloat16)
    logits, grads = logits_and_lora_grads(model, ids)
    assert patch_model(model) == {"rms_norm": 9, "swiglu": 4, "rope": 4}
    patched_logits, patched_grads = logits_and_lora_grads(model, ids)
    unpatch_model(model)
    # bf16 rounding differs (the kernels round once where eager rounds after every op) and compounds over layers:
    # require the patched error to be within 2x the unpatched one (plus a floor), not a fixed tolerance (a wrong
    # kernel is off by O(1); in the CPU interpreter, which truncates to bf16, this ratio was 1.3x, at worst 1.65x)
    pairs = [("logits", patched_logits, logits, true_logits)]
    pairs += [(n, patched_grads[n], grads[n], true_grads[n]) for n in true_grads]
    for name, patched, eager, truth in pairs:
        assert rel_err(patched, truth) <= 2 * rel_err(eager, truth) + 1e-3, (
            f"{name}: patched bf16 error {rel_err(patched, truth):.2e}, eager bf16 {rel_err(eager, truth):.2e}")
