"""Triton kernels for the hot spots of LoRA/PPO training, each beside its torch reference. Lesson 07.

    from lessons_lib.kernels import rms_norm, apply_rope, swiglu, selective_log_softmax, logprobs_and_entropy
    from lessons_lib.kernels import nf4_dequantize, patch_model, unpatch_model

Every function takes `impl="auto" | "triton" | "torch"`: "auto" runs Triton on CUDA tensors, or on CPU tensors when
the kernels were defined under `TRITON_INTERPRET=1` (set it before this package is first imported;
`lessons_lib.course.setup_lesson()` does so on a machine without a GPU), and the torch reference otherwise.

One module per kernel, each in three layers (the layout of Liger-Kernel's first rms_norm): `@triton.jit` kernels,
a launcher + `torch.autograd.Function` whose docstring gives the shapes, and a thin function with the `impl` switch.
The walkthrough and benchmark of each kernel is a script in the repository's top-level `kernels/` folder.
"""

from ._common import INTERPRETED
from .dequant import nf4_dequantize
from .logprobs import logprobs_and_entropy, logprobs_and_entropy_torch, selective_log_softmax
from .patching import is_patched, patch_model, unpatch_model
from .rms_norm import rms_norm, rms_norm_torch
from .rope import apply_rope, apply_rope_torch
from .swiglu import swiglu, swiglu_torch

__all__ = [
    "INTERPRETED", "apply_rope", "apply_rope_torch", "is_patched", "logprobs_and_entropy",
    "logprobs_and_entropy_torch", "nf4_dequantize", "patch_model", "rms_norm", "rms_norm_torch",
    "selective_log_softmax", "swiglu", "swiglu_torch", "unpatch_model",
]
