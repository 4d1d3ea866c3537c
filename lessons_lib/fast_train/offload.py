"""Checkpoints in CPU memory: each layer's input goes to pinned host memory in the forward and comes back, one layer
ahead, in the backward (lesson 09). Unsloth's "unsloth" gradient checkpointing does the same idea.

With recomputation, all a training step keeps per layer is the layer's input, (B, T, H): for Qwen2-1.5B at B=8,
T=512 that is 12.6 MB in bf16, 352 MB over 28 layers. Copying it to the host costs no GPU memory, and the copies
run on a side stream, overlapping the layers' compute:

    forward, layer i:   side stream waits for x_i, then copies x_i -> host[i] (device-to-host, pinned)
                        the main stream waits for that copy only at layer i+1's end, so x_i's memory is not
                        reused before it is read
    backward, layer i:  x_i is already in slot[i % 2] (prefetched during layer i+1's backward); the main stream
                        waits for it, and the side stream starts bringing x_{i-1} into the other slot

Everything is stream-ordered (events, no host synchronisation), so a CUDA graph can capture it: the host buffers
are allocated once per shape, outside the capture. On a CPU the same code copies between plain tensors (that is
how the tests check the bookkeeping). The H2D/D2H traffic is 2 x 352 MB per step (~15 ms at PCIe 5 speed, hidden
behind ~100 ms of compute when the copies overlap).
"""

from __future__ import annotations

import torch


class Offloader:
    """Host copies of the layer inputs of the latest forward pass with autograd, two device slots for the way back."""

    def __init__(self):
        self._buffers: dict = {}            # shape key -> (host list, two device slots); kept: graphs hold them
        self.host: list[torch.Tensor] = []
        self.slots: list[torch.Tensor] = []
        self.owner: list[int] = []          # which forward pass (generation) wrote host[i]
        self.loaded: list[int | None] = [None, None]  # layer whose input each slot holds (or is receiving)
        self.pending = None                 # the input whose device-to-host copy may still be running
        self.stream = self.events = None

    def nbytes(self) -> dict:
        """Bytes held for every shape seen: pinned host memory and device slots."""
        size = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
        return {"host": sum(size(h) for h, _ in self._buffers.values()),
                "device": sum(size(s) for _, s in self._buffers.values())}

    def prepare(self, n_layers: int, like: torch.Tensor):
        """Select the buffers of this shape, allocating them on its first forward (never during a graph capture).
        Buffers are kept for every shape seen, since a captured graph reads and writes them."""
        key = (n_layers, tuple(like.shape), like.dtype, like.device)
        cuda = like.is_cuda
        if key not in self._buffers:
            if cuda and torch.cuda.is_current_stream_capturing():
                raise RuntimeError(f"offload: no host buffers for shape {tuple(like.shape)}; run one step of this "
                                   f"shape before capturing a CUDA graph (compile_train_step does)")
            self._buffers[key] = ([torch.empty(like.shape, dtype=like.dtype, pin_memory=cuda) for _ in range(n_layers)],
                                  [torch.empty_like(like) for _ in range(2)])
        self.host, self.slots = self._buffers[key]
        if len(self.owner) != n_layers:
            self.owner = [-1] * n_layers
        self.loaded = [None, None]
        if cuda and self.stream is None:
            self.stream = torch.cuda.Stream(like.device)
            self.events = [torch.cuda.Event() for _ in range(2)]

    def save(self, i: int, x: torch.Tensor, generation: int):
        """Copy the input of layer i to the host (asynchronously on a GPU)."""
        self.owner[i] = generation
        self.loaded = [None, None]          # slots hold nothing of this new pass
        if not x.is_cuda:
            self.host[i].copy_(x)
            return
        main = torch.cuda.current_stream(x.device)
        self._join(main)                    # the previous copy is done before its source memory can be reused
        self.stream.wait_stream(main)       # x is computed
        with torch.cuda.stream(self.stream):
            self.host[i].copy_(x, non_blocking=True)
        self.pending = x

    def finish_forward(self, device):
        if self.pending is not None:
            self._join(torch.cuda.current_stream(device))

    def _join(self, main):
        if self.pending is not None:
            main.wait_stream(self.stream)
            self.pending = None

    def _prefetch(self, i: int):
        slot = i % 2
        self.loaded[slot] = i
        if not self.slots[slot].is_cuda:
            self.slots[slot].copy_(self.host[i])
            return
        main = torch.cuda.current_stream(self.slots[slot].device)
        self.stream.wait_stream(main)       # whoever read this slot before (layer i+2's backward) is done
        with torch.cuda.stream(self.stream):
            self.slots[slot].copy_(self.host[i], non_blocking=True)
            self.events[slot].record(self.stream)

    def load(self, i: int, generation: int) -> torch.Tensor:
        """The input of layer i, on the device; starts bringing layer i-1's input into the other slot."""
        if self.owner[i] != generation:
            raise RuntimeError(f"offload: the saved input of layer {i} belongs to another forward pass; with "
                               f"offload=True, call backward after each forward before running the next one")
        slot = i % 2
        if self.loaded[slot] != i:
            self._prefetch(i)
        x = self.slots[slot]
        if x.is_cuda:
            torch.cuda.current_stream(x.device).wait_event(self.events[slot])
        if i > 0 and self.owner[i - 1] == generation:  # layers before the first trainable one saved nothing
            self._prefetch(i - 1)
        return x
