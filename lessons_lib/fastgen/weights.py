"""The rollout engine's view of a model's weights (lesson 08, fast rollouts).

Every projection of the decoder (q, k, v, o, gate, up, down, and the LM head) is read into a `Source`: where its
base weight lives (a plain tensor, or bitsandbytes 4-bit bytes plus per-block scales), its bias, and the LoRA
adapters peft has active on it. Projections that read the same input are fused into one `Proj` (q|k|v, gate|up),
which the engine keeps in one of two forms:

- **dense**: one compute-dtype matrix, 4-bit dequantized and LoRA merged,
  W = dequant(W0) + sum_a s_a * B_a @ A_a, computed in fp32 and rounded once. One matmul per step, reading
  2 bytes per parameter (bf16). Costs that much extra memory.
- **lean**: nothing copied. A 4-bit weight is dequantized every step into a scratch buffer shared by all layers
  (~4.5 bytes per parameter per step: read 0.5, write 2, read 2); a plain weight is used where it lies; LoRA runs
  unmerged as two skinny matmuls, y += (x @ A^T) @ B^T, with every adapter of the Proj stacked into one A and one
  block-diagonal B (scales folded in).

`Proj.refresh()` rewrites the engine's own tensors *in place*, so a captured CUDA graph stays valid after a PPO
update. `Source.signature()` tells when a refresh is needed: it changes whenever an optimizer step (or any in-place
write) bumps a tensor's version counter, or when adapters are switched on, off or merged.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class LoraPart:
    """One active LoRA adapter on one projection: delta_W = scale * B @ A, delta_b = scale * B.bias."""

    A: torch.Tensor  # (r, in)
    B: torch.Tensor  # (out, r)
    scale: float
    bias: torch.Tensor | None


def _is_4bit(weight) -> bool:
    """bitsandbytes `Params4bit` carry their quantization state; plain weights have none."""
    return getattr(weight, "quant_state", None) is not None


def _lora_parts(module: nn.Module, name: str) -> tuple[nn.Module, list[LoraPart]]:
    """(base layer, active adapters) of a peft LoRA layer; (module, []) for a plain layer."""
    if not hasattr(module, "lora_A"):
        return module, []
    base = module.get_base_layer()
    if getattr(module, "fan_in_fan_out", False):
        raise NotImplementedError(f"{name}: LoRA with fan_in_fan_out=True (Conv1D layers) is not supported")
    merged = bool(getattr(module, "merged_adapters", []))
    if module.disable_adapters:
        if merged:
            raise ValueError(f"{name}: adapters are merged into the base weight but disabled; unmerge them first")
        return base, []
    if merged:  # the base weight already holds the deltas
        return base, []
    parts = []
    for adapter in module.active_adapters:
        if adapter not in module.lora_A:
            continue
        if adapter in getattr(module, "lora_variant", {}) or getattr(module, "use_dora", {}).get(adapter, False):
            raise NotImplementedError(f"{name}: adapter {adapter!r} is a LoRA variant (e.g. DoRA); only plain LoRA "
                                      "can be merged for rollouts")
        lora_B = module.lora_B[adapter]
        parts.append(LoraPart(module.lora_A[adapter].weight, lora_B.weight, float(module.scaling[adapter]),
                              lora_B.bias))
    return base, parts


class Source:
    """One projection of the model, read where it lies (nothing is copied here)."""

    def __init__(self, module: nn.Module, name: str):
        self.module, self.name = module, name
        base, _ = _lora_parts(module, name)
        if not hasattr(base, "weight") or base.weight is None:
            raise NotImplementedError(f"{name}: {type(base).__name__} has no weight the engine can read")
        kind = type(base).__name__
        if "8bit" in kind or "Int8" in kind:
            raise NotImplementedError(f"{name}: 8-bit layers ({kind}) are not supported; load in 4-bit or 16-bit")
        self.base = base
        self.quantized = _is_4bit(base.weight)
        if self.quantized:
            qs = base.weight.quant_state
            self.out_features, self.in_features = int(qs.shape[0]), int(qs.shape[1])
            self.blocksize, self.quant_type = int(qs.blocksize), qs.quant_type
            self._read_quant_state()
        else:
            self.out_features, self.in_features = base.weight.shape

    # ------------------------------------------------------------------ 4-bit bytes and scales
    def _read_quant_state(self):
        """Keep the packed bytes and fp32 per-block scales (double quantization undone once, not every step)."""
        import bitsandbytes.functional as bnbf

        weight = self.base.weight
        qs = weight.quant_state
        self._qs_id = (id(qs), weight.data_ptr())
        if getattr(qs, "packing_format_for_cpu", False):
            # bitsandbytes repacked this layer for its AVX512-BF16 CPU inference kernel (docs/ENVIRONMENT.md): undo
            # the nibble layout on a copy of the state (the inverse edits the state it is given), and take the
            # scales it now computes with, which the repacking rounded to bf16.
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            self.packed, _ = _convert_weight_packed_for_cpu_inverse(weight.data, copy.copy(qs))
            self.absmax = qs.absmax.T.reshape(-1).float()
        else:
            self.packed = weight.data
            absmax = qs.absmax
            if qs.nested:
                absmax = bnbf.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
            self.absmax = absmax.float()
        self.packed = self.packed.view(torch.uint8)

    def base_into(self, out: torch.Tensor) -> torch.Tensor:
        """Write the base weight, (out, in), into `out` (any float dtype; 4-bit is dequantized straight into it)."""
        if not self.quantized:
            return out.copy_(self.base.weight)
        if out.is_cuda:  # one kernel, writes into `out`: safe inside a CUDA graph
            import bitsandbytes.functional as bnbf

            bnbf.dequantize_4bit(self.packed, absmax=self.absmax, out=out, blocksize=self.blocksize,
                                 quant_type=self.quant_type)
            return out
        # bitsandbytes has no `out=` kernel on CPU
        return out.copy_(torch.ops.bitsandbytes.dequantize_4bit.default(
            self.packed, self.absmax, self.blocksize, self.quant_type, tuple(out.shape), out.dtype))

    # ------------------------------------------------------------------ what the engine rebuilds from
    def loras(self) -> list[LoraPart]:
        return _lora_parts(self.module, self.name)[1]

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def merged_weight(self) -> torch.Tensor:
        """W0 + sum s * B @ A in fp32: (out, in)."""
        w = self.base_into(torch.empty(self.out_features, self.in_features, device=self.base.weight.device,
                                       dtype=torch.float32))
        for lora in self.loras():
            w.addmm_(lora.B.float(), lora.A.float(), alpha=lora.scale)
        return w

    def merged_bias(self, with_lora: bool) -> torch.Tensor:
        """b0 (+ sum s * B.bias when `with_lora`) in fp32: (out,). Zeros when the layer has no bias."""
        b = torch.zeros(self.out_features, device=self.base.weight.device, dtype=torch.float32)
        if self.bias is not None:
            b += self.bias.float()
        if with_lora:
            for lora in self.loras():
                if lora.bias is not None:
                    b += lora.scale * lora.bias.float()
        return b

    def has_bias(self) -> bool:
        return self.bias is not None or any(lora.bias is not None for lora in self.loras())

    def signature(self) -> tuple:
        """Changes whenever what this projection computes may have changed (in-place updates included)."""
        tensors = [self.base.weight, self.bias]
        for lora in self.loras():
            tensors += [lora.A, lora.B, lora.bias]
        adapters = tuple((tuple(lora.A.shape), lora.scale, lora.bias is None) for lora in self.loras())
        quant = id(self.base.weight.quant_state) if self.quantized else None
        return adapters, quant, tuple((t._version, t.data_ptr()) for t in tensors if t is not None)

    def sync(self):
        """Re-read the 4-bit bytes and scales if the layer was re-quantized or moved."""
        if self.quantized and self._qs_id != (id(self.base.weight.quant_state), self.base.weight.data_ptr()):
            self._read_quant_state()

    def layout(self) -> tuple:
        """Shapes of the stacked LoRA factors; a change means buffers must be reallocated (and graphs recaptured)."""
        return tuple((int(lora.A.shape[0]), lora.bias is not None) for lora in self.loras())


class Proj:
    """y = x @ W^T + b for one or more fused sources: (N, in) -> (N, sum of out)."""

    def __init__(self, sources: list[Source], dtype: torch.dtype, dense: bool, scratch: dict | None = None):
        self.sources, self.dtype = sources, dtype
        self.sizes = [s.out_features for s in sources]
        self.out_features, self.in_features = sum(self.sizes), sources[0].in_features
        if any(s.in_features != self.in_features for s in sources):
            raise ValueError(f"fused projections {[s.name for s in sources]} read inputs of different sizes")
        self.device = sources[0].base.weight.device
        quantized = {s.quantized for s in sources}
        in_place = quantized == {False} and all(s.base.weight.dtype == dtype for s in sources)
        # lean is possible for all-4-bit groups (dequantize per step) and for plain weights already in `dtype`
        self.can_be_lean = quantized == {True} or in_place
        self.dense = dense or not self.can_be_lean
        self.scratch = scratch  # {"buf": flat tensor} shared by every lean 4-bit Proj of the engine
        self.weight = self.bias = self.lora_A = self.lora_B = None
        self._layout = None
        self.refresh()

    def make_dense(self):
        """Switch to a merged compute-dtype copy (allocates `dense_nbytes()`)."""
        if not self.dense:
            self.dense, self.lora_A, self.lora_B = True, None, None
            self.refresh()

    def dense_nbytes(self) -> int:
        return self.out_features * self.in_features * torch.empty((), dtype=self.dtype).element_size()

    def nbytes(self) -> int:
        """Bytes of the tensors this Proj owns (its dense matrix, bias, stacked LoRA factors)."""
        return sum(t.numel() * t.element_size() for t in (self.weight, self.bias, self.lora_A, self.lora_B)
                   if t is not None)

    @torch.no_grad()
    def refresh(self) -> bool:
        """Re-read the model into this Proj's tensors, in place when shapes allow. True if tensors were reallocated
        (then captured graphs that read them are stale)."""
        for s in self.sources:
            s.sync()
        layout = tuple(s.layout() for s in self.sources)
        realloc = layout != self._layout
        self._layout = layout
        rows = torch.tensor([0, *self.sizes]).cumsum(0).tolist()
        has_bias = any(s.has_bias() for s in self.sources)
        if has_bias and (self.bias is None or realloc):
            self.bias = torch.empty(self.out_features, device=self.device, dtype=self.dtype)
        elif not has_bias:
            self.bias = None
        if self.dense:
            if self.weight is None:
                self.weight = torch.empty(self.out_features, self.in_features, device=self.device, dtype=self.dtype)
            for s, a, b in zip(self.sources, rows, rows[1:]):
                if s.loras():
                    self.weight[a:b].copy_(s.merged_weight())  # one rounding from fp32
                else:  # dequantize (or copy) straight into the copy: the same numbers, no fp32 detour
                    s.base_into(self.weight[a:b])
                if self.bias is not None:
                    self.bias[a:b].copy_(s.merged_bias(with_lora=True))
            return realloc
        if self.bias is not None:
            for s, a, b in zip(self.sources, rows, rows[1:]):
                self.bias[a:b].copy_(s.merged_bias(with_lora=True))
        # stack every adapter of every source: A_cat (R, in), B_blk (out, R) block-diagonal with the scales folded in
        loras = [(a, b, lora) for s, a, b in zip(self.sources, rows, rows[1:]) for lora in s.loras()]
        R = sum(int(lora.A.shape[0]) for _, _, lora in loras)
        if R == 0:
            self.lora_A = self.lora_B = None
            return realloc
        if realloc or self.lora_A is None:
            self.lora_A = torch.empty(R, self.in_features, device=self.device, dtype=self.dtype)
            self.lora_B = torch.empty(self.out_features, R, device=self.device, dtype=self.dtype)
        self.lora_B.zero_()
        r0 = 0
        for a, b, lora in loras:
            r = int(lora.A.shape[0])
            self.lora_A[r0:r0 + r].copy_(lora.A)
            self.lora_B[a:b, r0:r0 + r].copy_(lora.B.float() * lora.scale)
            r0 += r
        return realloc

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.dense:
            return F.linear(x, self.weight, self.bias)                              # (N, out)
        if self.sources[0].quantized:
            flat = self.scratch["buf"]
            w = flat[: self.out_features * self.in_features].view(self.out_features, self.in_features)
            a = 0
            for s in self.sources:                                                  # dequantize into the scratch
                s.base_into(w[a:a + s.out_features])
                a += s.out_features
            y = F.linear(x, w, self.bias)                                           # (N, out)
        elif len(self.sources) == 1:
            y = F.linear(x, self.sources[0].base.weight, self.bias)
        else:
            y = torch.cat([F.linear(x, s.base.weight) for s in self.sources], dim=-1)
            if self.bias is not None:
                y = y + self.bias
        if self.lora_A is not None:
            y = torch.addmm(y, x @ self.lora_A.t(), self.lora_B.t())               # (N, R) @ (R, out)
        return y

    def scratch_numel(self) -> int:
        """Scratch elements this Proj needs when lean and 4-bit (0 otherwise)."""
        return 0 if self.dense or not self.sources[0].quantized else self.out_features * self.in_features
