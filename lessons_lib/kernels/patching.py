"""Swap the kernels into a Qwen2 or Llama model, explicitly and reversibly: `patch_model` / `unpatch_model`.

    from lessons_lib.kernels import patch_model, unpatch_model
    patch_model(model)      # {'rms_norm': 9, 'swiglu': 4, 'rope': 4}: what was swapped (works through peft too)
    unpatch_model(model)    # back to transformers' own forwards

How, in transformers 5 (`modeling_qwen2.py`, `modeling_llama.py`):
- RMSNorm and MLP: every `Qwen2RMSNorm` / `LlamaRMSNorm` / `Qwen2MLP` / `LlamaMLP` *instance* gets its own
  `forward` (an instance attribute shadows the class's; deleting it restores the class's). Other models are untouched.
- RoPE: attention calls the module-level function `apply_rotary_pos_emb(q, k, cos, sin)` in the middle of its
  forward. While at least one model is patched, that name points to a dispatcher which calls our kernel only
  inside the forward of a *patched* attention instance (a context variable says so) and the original otherwise.
  The last `unpatch_model` puts the original function back.
Nothing happens at import time.
"""

from __future__ import annotations

import contextvars
import types

import torch

from .rms_norm import rms_norm
from .rope import apply_rope
from .swiglu import swiglu

_ATTR = "_lessons_kernels"  # set on each patched instance (its impl) and on the patched model (a summary)
_rope_impl = contextvars.ContextVar("lessons_lib_rope_impl", default=None)  # set inside patched attention
_rope_originals: dict = {}  # modeling module -> [original apply_rotary_pos_emb, number of patched models]


def _families():
    """(modeling module, RMSNorm class, MLP class, attention class) for each supported model family."""
    from transformers.models.llama import modeling_llama as llama
    from transformers.models.qwen2 import modeling_qwen2 as qwen2

    return [(qwen2, qwen2.Qwen2RMSNorm, qwen2.Qwen2MLP, qwen2.Qwen2Attention),
            (llama, llama.LlamaRMSNorm, llama.LlamaMLP, llama.LlamaAttention)]


# --------------------------------------------------------------------------------- the replacement forwards


def _rms_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    return rms_norm(hidden_states, self.weight, self.variance_epsilon, impl=getattr(self, _ATTR))


def _mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x), impl=getattr(self, _ATTR)))


def _attention_forward(self, *args, **kwargs):
    token = _rope_impl.set(getattr(self, _ATTR))
    try:
        return type(self).forward(self, *args, **kwargs)
    finally:
        _rope_impl.reset(token)


def _make_rope_dispatcher(original):
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):  # transformers' signature; extra: unsqueeze_dim
        impl = _rope_impl.get()
        unsqueeze_dim = args[0] if args else kwargs.get("unsqueeze_dim", 1)
        if impl is None or unsqueeze_dim != 1:
            return original(q, k, cos, sin, *args, **kwargs)
        return apply_rope(q, k, cos, sin, impl=impl)

    apply_rotary_pos_emb.__wrapped__ = original
    return apply_rotary_pos_emb


# --------------------------------------------------------------------------------- patch / unpatch


def patch_model(model: torch.nn.Module, impl: str = "auto", rms_norm: bool = True, rope: bool = True,
                swiglu: bool = True) -> dict:
    """Use the kernels in `model`'s RMSNorm, RoPE and SwiGLU MLP (each can be turned off). Returns the counts.

    `impl` is passed to every kernel call ("auto": Triton on CUDA or in the interpreter, else torch).
    Raises if the model is already patched or holds no Qwen2/Llama module.
    """
    if vars(model).get(_ATTR) is not None:
        raise RuntimeError("patch_model: this model is already patched; call unpatch_model(model) first")
    counts = {"rms_norm": 0, "swiglu": 0, "rope": 0}
    rope_modules = set()
    for modeling, norm_cls, mlp_cls, attn_cls in _families():
        for module in model.modules():
            if rms_norm and isinstance(module, norm_cls):
                module.forward = types.MethodType(_rms_norm_forward, module)
                counts["rms_norm"] += 1
            elif swiglu and isinstance(module, mlp_cls) and module.config.hidden_act in ("silu", "swish"):
                module.forward = types.MethodType(_mlp_forward, module)
                counts["swiglu"] += 1
            elif rope and isinstance(module, attn_cls):
                module.forward = types.MethodType(_attention_forward, module)
                counts["rope"] += 1
                rope_modules.add(modeling)
            else:
                continue
            setattr(module, _ATTR, impl)
    if not any(counts.values()):
        raise ValueError(f"patch_model: found no Qwen2/Llama RMSNorm, MLP or attention module in "
                         f"{type(model).__name__} (supported families: Qwen2, Llama)")
    for modeling in rope_modules:
        entry = _rope_originals.setdefault(modeling, [modeling.apply_rotary_pos_emb, 0])
        if entry[1] == 0:
            modeling.apply_rotary_pos_emb = _make_rope_dispatcher(entry[0])
        entry[1] += 1
    setattr(model, _ATTR, {"impl": impl, "rope_modules": rope_modules, **counts})
    return counts


def unpatch_model(model: torch.nn.Module) -> dict:
    """Undo `patch_model`: every instance gets its class's forward back. Returns the counts that were patched."""
    summary = vars(model).get(_ATTR)
    if summary is None:
        raise RuntimeError("unpatch_model: this model is not patched (patch_model was not called on it)")
    for module in model.modules():
        if module is not model and _ATTR in vars(module):  # vars(): peft wrappers forward getattr to the model
            del module.forward  # the instance attribute; the class's forward shows through again
            delattr(module, _ATTR)
    for modeling in summary["rope_modules"]:
        entry = _rope_originals[modeling]
        entry[1] -= 1
        if entry[1] == 0:
            modeling.apply_rotary_pos_emb = entry[0]
            del _rope_originals[modeling]
    delattr(model, _ATTR)
    return {k: summary[k] for k in ("rms_norm", "swiglu", "rope")}


def is_patched(model: torch.nn.Module) -> bool:
    return vars(model).get(_ATTR) is not None
