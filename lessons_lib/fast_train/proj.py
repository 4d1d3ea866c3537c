"""A LoRA projection over a frozen (often 4-bit) weight, forward and backward written out (lesson 09).

One `Proj` is one or more projections of the model that read the same input: q|k|v are fused into one, so their
three 4-bit weights are dequantized into one (out, in) matrix and multiplied once. The weights stay where they are
in the model (nothing is copied); the LoRA tensors are peft's own parameters, read at every call (so switching
adapters off, as PPO's reference pass does, is seen).

For an input x (N, in), base weight W (out, in), bias b, and adapters j on output rows [o_j, o_j + out_j):

    y          = x @ W^T + b                                        compute dtype (bf16 on a GPU)
    t          = x_l @ A^T            A = [A_1; A_2; ...] (R, in)    LoRA dtype l (fp32, as peft keeps them)
    y[:, o_j] += (t_j @ B_j^T * s_j).to(dtype)                      peft's `lora_B(lora_A(x)) * scaling`

and the backward, given dy (N, out) (only W^T is needed from the base: W is frozen, so no weight gradient):

    g_j  = dy[:, o_j].to(l) * s_j                    (N, out_j)
    dB_j = g_j^T @ t_j                               (out_j, r_j)
    d_t  = [g_1 @ B_1, g_2 @ B_2, ...]               (N, R)
    dA   = d_t^T @ x_l                               (R, in), split into the A_j
    dx   = dy @ W + (d_t @ A).to(dtype)              (N, in): W is dequantized again rather than kept

The same arithmetic as peft + bitsandbytes (which the tests check), in fewer kernels: 4 LoRA matmuls for q|k|v
instead of 6, one base matmul instead of 3, and only x (and the dequantized W) saved for the backward (peft saves
an fp32 copy of x per adapter).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class LoRA:
    """One active adapter: delta y = (x @ A^T) @ B^T * scale."""

    A: torch.Tensor  # (r, in), a peft parameter
    B: torch.Tensor  # (out, r)
    scale: float


class Part:
    """One projection module of the model (a peft LoRA layer or a plain/4-bit linear layer), read in place."""

    def __init__(self, module: nn.Module, name: str):
        self.module, self.name = module, name
        self.base = module.get_base_layer() if hasattr(module, "lora_A") else module
        weight = self.base.weight
        if weight.requires_grad:
            raise NotImplementedError(f"{name}: the base weight is trainable; the fast step trains LoRA adapters "
                                      f"only (freeze it, or use the transformers model)")
        if self.base.bias is not None and self.base.bias.requires_grad:
            raise NotImplementedError(f"{name}: a trainable bias is not supported by the fast step")
        if hasattr(module, "lora_A") and getattr(module, "fan_in_fan_out", False):
            raise NotImplementedError(f"{name}: LoRA with fan_in_fan_out=True is not supported")
        self.qs = getattr(weight, "quant_state", None)
        if self.qs is not None:
            if getattr(self.qs, "packing_format_for_cpu", False):
                raise NotImplementedError(f"{name}: bitsandbytes repacked this 4-bit layer for CPU inference; load "
                                          f"the model with lessons_lib.load_model (it prevents the repack)")
            if self.qs.nested and self.qs.state2.blocksize != 256:
                raise NotImplementedError(f"{name}: nested 4-bit scales with blocksize {self.qs.state2.blocksize}")
            self.qs.to(weight.device)  # every piece of the state on the weight's device: no copies inside a graph
            self.out_features, self.in_features = (int(n) for n in self.qs.shape)
            self.compute_dtype = getattr(self.base, "compute_dtype", None)
        else:
            self.out_features, self.in_features = weight.shape
            self.compute_dtype = weight.dtype

    def loras(self) -> list[LoRA]:
        """The adapters active right now (none when they are disabled or merged)."""
        m = self.module
        if not hasattr(m, "lora_A") or m.disable_adapters or getattr(m, "merged_adapters", None):
            return []
        out = []
        for name in m.active_adapters:
            if name not in m.lora_A:
                continue
            if name in getattr(m, "lora_variant", {}) or getattr(m, "use_dora", {}).get(name, False):
                raise NotImplementedError(f"{self.name}: adapter {name!r} is a LoRA variant (e.g. DoRA)")
            if m.lora_B[name].bias is not None:
                raise NotImplementedError(f"{self.name}: adapter {name!r} has a LoRA bias")
            dropout = m.lora_dropout[name]
            if isinstance(dropout, nn.Dropout) and dropout.p > 0 and dropout.training:
                raise NotImplementedError(f"{self.name}: lora_dropout={dropout.p} in training mode; the fast step "
                                          f"supports lora_dropout=0 (get_peft_model(..., lora_dropout=0))")
            out.append(LoRA(m.lora_A[name].weight, m.lora_B[name].weight, float(m.scaling[name])))
        return out

    def weight_into(self, out: torch.Tensor) -> torch.Tensor:
        """The base weight (out, in) in out.dtype, written into `out` (4-bit: dequantized straight into it)."""
        if self.qs is None:
            return out.copy_(self.base.weight)
        qs, dq = self.qs, torch.ops.bitsandbytes
        absmax = qs.absmax
        if qs.nested:  # 8-bit scales of the 4-bit scales: 2 small kernels
            absmax = dq.dequantize_blockwise.default(qs.absmax, qs.state2.absmax, qs.state2.code, 256,
                                                     torch.float32) + qs.offset
        packed = self.base.weight.data.view(torch.uint8)
        if out.is_cuda:  # one kernel writing into `out`: safe inside a CUDA graph
            dq.dequantize_4bit.out(packed, absmax, qs.blocksize, qs.quant_type, tuple(out.shape), out.dtype, out=out)
            return out
        return out.copy_(dq.dequantize_4bit.default(packed, absmax, qs.blocksize, qs.quant_type, tuple(out.shape),
                                                    out.dtype))


class Proj:
    """y = x @ W^T + b (+ LoRA) for one or more fused parts: (N, in) -> (N, sum of out)."""

    def __init__(self, parts: list[Part]):
        self.parts = parts
        self.sizes = [p.out_features for p in parts]
        self.offsets = [sum(self.sizes[:i]) for i in range(len(parts))]
        self.out_features, self.in_features = sum(self.sizes), parts[0].in_features
        if any(p.in_features != self.in_features for p in parts):
            raise ValueError(f"fused projections {[p.name for p in parts]} read inputs of different sizes")

    def loras(self) -> list[tuple[int, int, LoRA]]:
        """(first output row, rows, adapter) for every active adapter of every part."""
        return [(o, n, lora) for part, o, n in zip(self.parts, self.offsets, self.sizes) for lora in part.loras()]

    def weight(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The fused base weight (out, in), freshly dequantized (or the model's own tensor when it can be used)."""
        if len(self.parts) == 1 and self.parts[0].qs is None and self.parts[0].base.weight.dtype == dtype:
            return self.parts[0].base.weight
        w = torch.empty(self.out_features, self.in_features, dtype=dtype, device=device)
        for part, o, n in zip(self.parts, self.offsets, self.sizes):
            part.weight_into(w[o:o + n])
        return w

    def bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        """The fused bias (out,) in `dtype`, or None; built once and kept while the biases are unchanged (they are
        frozen: a captured graph reads the kept tensor)."""
        biases = [p.base.bias for p in self.parts]
        if all(b is None for b in biases):
            return None
        key = (dtype, tuple(None if b is None else (b.data_ptr(), b._version) for b in biases))
        if getattr(self, "_bias_key", None) != key:
            self._bias = torch.cat([b.to(dtype) if b is not None else
                                    torch.zeros(n, dtype=dtype, device=self.parts[0].base.weight.device)
                                    for b, n in zip(biases, self.sizes)])
            self._bias_key = key
        return self._bias


# ---------------------------------------------------------------------------------------------- the math


def lora_params(loras: list[tuple[int, int, LoRA]]) -> list[torch.Tensor]:
    """[A_1, B_1, A_2, B_2, ...]: the tensors a Proj's forward reads, in the order its backward returns grads."""
    return [t for _, _, lora in loras for t in (lora.A, lora.B)]


def proj_forward(proj: Proj, x: torch.Tensor, loras, weight: torch.Tensor | None = None,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """x (N, in) -> y (N, out), no autograd. `weight`: the dequantized base weight, if the caller has it;
    `out`: a contiguous (N, out) tensor to write y into (same numbers as F.linear: addmm with the bias, else mm)."""
    w = proj.weight(x.dtype, x.device) if weight is None else weight
    bias = proj.bias(x.dtype)
    if out is None:
        y = F.linear(x, w, bias)                                            # (N, out)
    else:
        y = torch.addmm(bias, x, w.t(), out=out) if bias is not None else torch.mm(x, w.t(), out=out)
    if loras:
        ldt = loras[0][2].A.dtype
        A = torch.cat([lora.A for _, _, lora in loras]) if len(loras) > 1 else loras[0][2].A  # (R, in)
        t = x.to(ldt) @ A.t()                                               # (N, R)
        r0 = 0
        for o, n, lora in loras:
            r = lora.A.shape[0]
            y[:, o:o + n] += (t[:, r0:r0 + r] @ lora.B.t() * lora.scale).to(y.dtype)
            r0 += r
    return y


def proj_backward(proj: Proj, x: torch.Tensor, dy: torch.Tensor, loras, need_dx: bool = True,
                  weight: torch.Tensor | None = None, dx_out: torch.Tensor | None = None):
    """Gradients of <y, dy>: (dx or None, [dA_1, dB_1, dA_2, dB_2, ...] in the LoRA dtype). `dx_out`: a contiguous
    (N, in) tensor to write dx into."""
    dx = None
    if need_dx:
        w = proj.weight(dy.dtype, dy.device) if weight is None else weight
        dx = torch.mm(dy, w, out=dx_out) if dx_out is not None else dy @ w  # (N, in)
    grads = []
    if loras:
        ldt = loras[0][2].A.dtype
        xl = x.to(ldt)                                                      # (N, in)
        A = torch.cat([lora.A for _, _, lora in loras]) if len(loras) > 1 else loras[0][2].A  # (R, in)
        t = xl @ A.t()                                                      # (N, R), recomputed: cheap
        d_t, dBs, r0 = [], [], 0
        for o, n, lora in loras:
            r = lora.A.shape[0]
            g = dy[:, o:o + n].to(ldt) * lora.scale                         # (N, out_j)
            dBs.append(g.t() @ t[:, r0:r0 + r])                             # (out_j, r)
            d_t.append(g @ lora.B)                                          # (N, r)
            r0 += r
        d_t = torch.cat(d_t, dim=1) if len(d_t) > 1 else d_t[0]             # (N, R)
        dA = d_t.t() @ xl                                                   # (R, in)
        r0 = 0
        for (_, _, lora), dB in zip(loras, dBs):
            r = lora.A.shape[0]
            grads += [dA[r0:r0 + r], dB]
            r0 += r
        if need_dx:
            dx += (d_t @ A).to(dx.dtype)
    return dx, grads


class ProjFn(torch.autograd.Function):
    """Autograd wrapper of proj_forward / proj_backward: apply(x, proj, loras, *lora_params). The dequantized base
    weight is kept for the backward (one layer's worth at a time in FastDecoder: its recompute runs per layer)."""

    @staticmethod
    def forward(ctx, x, proj, loras, *params):
        ctx.proj, ctx.loras = proj, loras
        ctx.weight = proj.weight(x.dtype, x.device)
        ctx.save_for_backward(x)
        return proj_forward(proj, x, loras, weight=ctx.weight)

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        dx, grads = proj_backward(ctx.proj, x, dy, ctx.loras, need_dx=ctx.needs_input_grad[0], weight=ctx.weight)
        ctx.weight = None
        grads = [g if need else None for g, need in zip(grads, ctx.needs_input_grad[3:])]
        return (dx, None, None, *grads)


def project(proj: Proj, x: torch.Tensor) -> torch.Tensor:
    """proj(x) with autograd when anything needs a gradient, plain otherwise."""
    loras = proj.loras()
    params = lora_params(loras)
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)):
        return ProjFn.apply(x, proj, loras, *params)
    return proj_forward(proj, x, loras)
