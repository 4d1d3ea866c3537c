"""Building the engine's copy of a model, and noticing when the model changed (lesson 08, fast rollouts).

`build_decoder` chooses, layer by layer, between a dense merged copy and the lean form (`weights.py`) within a
memory budget. `ChangeTracker` answers, before every rollout, "which projections must be re-read?", cheaply:

- adapters switched on or off, added, merged, or a tensor replaced: structural signatures (Python only);
- a tensor written in place: its version counter (every in-place op bumps it...);
- ...except fused optimizers (`torch.optim.AdamW(fused=True)` leaves version counters alone), so the LoRA
  tensors, which are small, are also compared with a snapshot: one foreach subtraction, one foreach max-norm
  (not the 2-norm: squares of tiny differences underflow to 0), one host sync for all of them.

It also tells when a captured CUDA graph is stale: when a tensor the graph reads in place has moved.
"""

from __future__ import annotations

import torch

from .model import Decoder, unwrap_causal_lm
from .weights import Proj


def build_decoder(model, dtype: torch.dtype, weights: str, budget: float, kernels: str) -> Decoder:
    """A Decoder over `model`: "dense", "lean", or "auto" (dense layers from the first while `budget` bytes last).

    Everything starts lean (nothing copied); "auto" then densifies whole layers, so the cost is paid where it buys
    the most uniform speed-up. Projections that cannot be lean (plain weights in another dtype) are always dense.
    """
    if weights not in ("auto", "dense", "lean"):
        raise ValueError(f"weights must be 'auto', 'dense' or 'lean', got {weights!r}")
    scratch: dict = {}
    n_layers = len(unwrap_causal_lm(model).model.layers)
    dec = Decoder(model, dtype, dense_layers=[weights == "dense"] * n_layers, scratch=scratch, kernels=kernels)
    if weights == "auto":
        left = budget
        for layer in dec.layers:
            cost = sum(p.dense_nbytes() for p in layer.projs if not p.dense)
            if cost > left:
                break
            for p in layer.projs:
                p.make_dense()
            left -= cost
    need = max((p.scratch_numel() for p in dec.projs), default=0)
    if need:  # one buffer, as big as the largest lean 4-bit matrix, shared by every layer
        scratch["buf"] = torch.empty(need, device=dec.device, dtype=dtype)
    return dec


def lora_tensors(proj: Proj) -> list[torch.Tensor]:
    return [t for s in proj.sources for lora in s.loras() for t in (lora.A, lora.B, lora.bias) if t is not None]


class ChangeTracker:
    """What each projection of a Decoder looked like when it was last read from the model."""

    def __init__(self, dec: Decoder):
        self.dec = dec
        self.signatures = [self.signature(p) for p in dec.projs]
        self.snapshots = [[t.detach().clone() for t in lora_tensors(p)] for p in dec.projs]
        self.pointers = self.pointer_signature()

    @staticmethod
    def signature(proj: Proj) -> tuple:
        return tuple(s.signature() for s in proj.sources)

    def pointer_signature(self) -> tuple:
        """Addresses of the model tensors a captured graph reads where they lie."""
        dec = self.dec
        tensors = [dec.embed, dec.norm, *[t for layer in dec.layers for t in (layer.ln1, layer.ln2)]]
        for p in dec.projs:
            if not p.dense:
                tensors += [s.packed if s.quantized else s.base.weight for s in p.sources]
        return tuple(t.data_ptr() for t in tensors)

    def lora_changed(self) -> set[int]:
        """Indices of projections whose LoRA tensors differ from their snapshot (NaN counts as a difference)."""
        owners, current, snapshot = [], [], []
        device = self.dec.device
        for i, p in enumerate(self.dec.projs):
            tensors = lora_tensors(p)
            if len(tensors) != len(self.snapshots[i]) or any(
                    a.shape != b.shape or a.dtype != b.dtype for a, b in zip(tensors, self.snapshots[i])):
                owners.append(i)  # a structural change: stale whatever the values
                current.append(torch.ones(1, device=device))
                snapshot.append(torch.zeros(1, device=device))
                continue
            owners += [i] * len(tensors)
            current += tensors
            snapshot += self.snapshots[i]
        if not current:
            return set()
        diffs = torch._foreach_norm(torch._foreach_sub(current, snapshot), ord=float("inf"))
        changed = (torch.stack([d.float() for d in diffs]) != 0).tolist()
        return {i for i, c in zip(owners, changed) if c}

    @torch.no_grad()
    def refresh(self, force: bool = False) -> tuple[int, bool]:
        """Re-read every projection that changed (all with `force`), in place where shapes allow.

        Returns (how many were re-read, whether captured graphs are now stale).
        """
        stale_graphs = self.pointer_signature() != self.pointers
        changed = self.lora_changed()
        count = 0
        for i, p in enumerate(self.dec.projs):
            sig = self.signature(p)
            if force or i in changed or sig != self.signatures[i]:
                stale_graphs |= p.refresh()
                self.signatures[i] = sig
                self.snapshots[i] = [t.detach().clone() for t in lora_tensors(p)]
                count += 1
        if stale_graphs:
            self.pointers = self.pointer_signature()
        return count, stale_graphs

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for ts in self.snapshots for t in ts)
