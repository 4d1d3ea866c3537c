"""A minibatch's forward + backward, and the no-grad scoring passes, as CUDA graph replays (PPO steps 3-4 and 9 on a
GPU; docs/PPO.md "Performance").

A PPO minibatch of a few short responses is launch-bound: a LoRA forward + backward of a 1.5B model is ~10,000
small kernels, and eager PyTorch spends 5-30 us of CPU on each, far more than the GPU needs. A CUDA graph records
the kernels once and replays them with one call. `GraphedBackward` captures `loss_fn(**batch)` and its backward per
batch shape; the gradients accumulate into the parameters' `.grad` tensors, which therefore stay the same tensors
(zero them in place). The optimizer step stays outside, eager: the trainer checks the gradient norm for NaN before
applying it, and hooks (gradient all-reduce) run as usual.

What capture needs (PyTorch's "whole network capture" recipe, as `lessons_lib.fast_train.step` applies it):
static input tensors (copied into before each replay), no host synchronisation inside the step, lazy
initialisations (cuBLAS handles, Triton autotuning) done by eager warm-up runs on a side stream first; here the
warm-up's gradients are then put back as they were, so capturing changes nothing.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict

import torch


class _Graph:
    def __init__(self, graph, static, outputs):
        self.graph, self.static, self.outputs = graph, static, outputs


class GraphPool:
    """One CUDA graph memory pool shared by every graph of a trainer (update and scoring, every shape), so their
    working memory is the largest graph's, not the sum. Safe because each graph is self-contained (forward and
    backward in one capture, outputs kept alive) and graphs never run concurrently."""

    def __init__(self):
        self.handle = None

    def get(self):
        if self.handle is None:
            self.handle = torch.cuda.graph_pool_handle()
        return self.handle


class _Graphs(OrderedDict):
    """Captured graphs by key, least recently used first; at most `limit` are kept."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit = limit

    def lookup(self, key):
        if key in self:
            self.move_to_end(key)
        return self.get(key)

    def add(self, key, entry):
        while len(self) >= self.limit:
            self.popitem(last=False)
        self[key] = entry
        return entry


def _capture(run, batch: dict, warmup: int, pool: GraphPool, before=None, after=None) -> _Graph:
    """Warm `run(inputs)` up on a side stream, then capture it into a CUDA graph in `pool`. `before` / `after`
    bracket the warm-up and capture (GraphedBackward saves and restores the gradients there)."""
    inputs = {k: v.detach().clone() for k, v in batch.items()}
    state = before() if before else None
    main = torch.cuda.current_stream()
    side = torch.cuda.Stream()
    side.wait_stream(main)
    try:
        with torch.cuda.stream(side):          # lazy initialisations must not happen inside the capture
            for _ in range(warmup):
                run(inputs)
        main.wait_stream(side)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()               # the warm-up's cached blocks: the graph's own pool cannot use them
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool.get()):
            outputs = run(inputs)
        torch.cuda.synchronize()
    finally:
        if after:
            after(state)
    return _Graph(graph, inputs, outputs)


def _key(batch: dict, static: dict) -> tuple:
    return tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(batch.items())), tuple(sorted(static.items()))


def _replay(entry: _Graph, batch: dict):
    for name, value in batch.items():
        entry.static[name].copy_(value, non_blocking=True)
    entry.graph.replay()


class GraphedBackward:
    """`step(batch, **static) -> (loss, stats)`: runs `loss_fn(**batch, **static)` and `loss.backward()`.

    batch: tensors (their shapes and dtypes, with the `static` keyword values, key the captured graphs);
    loss_fn returns (loss, dict of tensors). With `enabled=False` (or on a CPU) it runs eagerly, the same way.
    A capture that fails warns once and leaves every later call eager.
    """

    def __init__(self, loss_fn, params: list[torch.Tensor], enabled: bool = True, warmup: int = 2,
                 pool: GraphPool | None = None, max_graphs: int = 8):
        self.loss_fn = loss_fn
        self.params = [p for p in params if p.requires_grad]
        self.enabled = enabled and bool(self.params) and self.params[0].is_cuda
        self.warmup, self.pool = max(1, warmup), pool or GraphPool()
        self.graphs = _Graphs(max_graphs)
        self.captures = 0          # how many graphs were captured (for tests and the benchmark)
        self._grads: list[torch.Tensor] | None = None

    def _eager(self, batch: dict, static: dict):
        loss, stats = self.loss_fn(**batch, **static)
        loss.backward()
        return loss.detach(), {k: v.detach() for k, v in stats.items()}

    def _bind_grads(self):
        """Every parameter's .grad is the tensor the graphs write into (a zero_grad(set_to_none) is undone)."""
        if self._grads is None:
            self._grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        for p, g in zip(self.params, self._grads):
            if p.grad is not g:
                if p.grad is None:
                    g.zero_()
                else:
                    g.copy_(p.grad)
                p.grad = g

    def _capture(self, batch: dict, static: dict) -> _Graph:
        def run(inputs):
            loss, stats = self.loss_fn(**inputs, **static)
            loss.backward()
            return loss.detach(), {k: v.detach() for k, v in stats.items()}

        def restore(saved):                        # warm-up (and capture) must not change the gradients
            for g, s in zip(self._grads, saved):
                g.copy_(s)

        entry = _capture(run, batch, self.warmup, self.pool, lambda: [g.clone() for g in self._grads], restore)
        self.captures += 1
        return entry

    def __call__(self, batch: dict, **static):
        if not self.enabled:
            return self._eager(batch, static)
        self._bind_grads()
        key = _key(batch, static)
        entry = self.graphs.lookup(key)
        if entry is None:
            try:
                entry = self.graphs.add(key, self._capture(batch, static))
            except Exception as err:  # a run should not die because one op could not be captured
                self.enabled = False
                warnings.warn(f"PPO update: CUDA graph capture failed ({type(err).__name__}: {err}); running the "
                              "minibatch forward + backward eagerly from now on", stacklevel=3)
                return self._eager(batch, static)
        _replay(entry, batch)
        loss, stats = entry.outputs
        return loss.clone(), {k: v.clone() for k, v in stats.items()}


class GraphedForward:
    """`call(batch, **static) -> dict of tensors`: `fn(**batch, **static)` without autograd, replayed from a CUDA
    graph per batch shape (PPO's no-grad scoring passes). Eager when disabled or off a GPU; a failed capture warns
    once and leaves every later call eager. The returned tensors are copies (the next replay overwrites the graph's)."""

    def __init__(self, fn, enabled: bool = True, warmup: int = 2, pool: GraphPool | None = None,
                 max_graphs: int = 8):
        self.fn, self.enabled, self.warmup = fn, enabled and torch.cuda.is_available(), max(1, warmup)
        self.pool, self.graphs = pool or GraphPool(), _Graphs(max_graphs)
        self.captures = 0

    @torch.no_grad()
    def __call__(self, batch: dict, **static) -> dict:
        if not self.enabled:
            return self.fn(**batch, **static)
        key = _key(batch, static)
        entry = self.graphs.lookup(key)
        if entry is None:
            try:
                entry = self.graphs.add(key, _capture(lambda inputs: self.fn(**inputs, **static), batch,
                                                      self.warmup, self.pool))
                self.captures += 1
            except Exception as err:  # noqa: BLE001
                self.enabled = False
                warnings.warn(f"PPO scoring: CUDA graph capture failed ({type(err).__name__}: {err}); running the "
                              "scoring passes eagerly from now on", stacklevel=3)
                return self.fn(**batch, **static)
        _replay(entry, batch)
        return {k: v.clone() for k, v in entry.outputs.items()}
