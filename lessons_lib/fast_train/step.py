"""`compile_train_step`: a whole training step (forward, backward, clip, optimizer) as CUDA graph replays (lesson 09).

A LoRA step on a 1.5B model issues ~10,000 small kernels; from Python each costs 5-30 us of CPU time, so eager
PyTorch spends 100-300 ms per step launching work the GPU finishes in far less. A CUDA graph records the kernels of
one step once and replays them with one call: no Python, no dispatcher, no launch latency per kernel.

What capture needs, and how this module provides it (the recipe of PyTorch's "whole network capture" example):

- static inputs: the batch is copied into tensors allocated once per shape; each new shape is captured once;
- static gradients: every trainable tensor gets a `.grad` before capture; the backward graph accumulates into it
  and the optimizer graph zeroes it after the update (so `update=False` accumulates, as eager code would);
- an optimizer that can run inside a graph: Adam/AdamW get `capturable=True` (their step count lives on the GPU);
- no host synchronisation inside the step (no `.item()`, no Python branch on a tensor value);
- lazy initialisations (cuBLAS handles, kernel autotuning, host buffers, optimizer state) done before capture: a
  few eager warm-up steps run on a side stream, then parameters and optimizer state are put back as they were, so
  compiling a step changes nothing.

`loss_fn(**batch)` returns the loss, or (loss, dict of tensors to report). On a CPU, or with `cuda_graph=False`,
or if a capture fails (with a warning), the same step runs eagerly. The learning rate is a constant of the
captured graph unless it is a tensor (Adam/AdamW accept `lr=torch.tensor(...)` with capturable=True).
"""

from __future__ import annotations

import time
import warnings

import torch


def _split(out):
    if isinstance(out, tuple):
        loss, stats = out
        return loss, dict(stats)
    return out, {}


class _Captured:
    """The graphs and static tensors of one batch shape."""

    def __init__(self, static, loss, stats, forward_backward, update):
        self.static, self.loss, self.stats = static, loss, stats
        self.forward_backward, self.update = forward_backward, update


class TrainStep:
    """A training step `step(batch, update=True) -> loss` (or (loss, stats)); see compile_train_step."""

    def __init__(self, loss_fn, optimizer, example_batch: dict | None = None, *, cuda_graph="auto",
                 max_grad_norm: float | None = None, warmup_steps: int = 2):
        self.loss_fn, self.optimizer, self.max_grad_norm = loss_fn, optimizer, max_grad_norm
        self.params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
        if not self.params:
            raise ValueError("compile_train_step: the optimizer holds no parameter that requires grad")
        self.device = self.params[0].device
        if cuda_graph not in ("auto", True, False):
            raise ValueError(f"cuda_graph must be 'auto', True or False, got {cuda_graph!r}")
        if cuda_graph is True and self.device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs parameters on a CUDA device, they are on {self.device}")
        self.graphed = cuda_graph is not False and self.device.type == "cuda"
        self.warmup_steps = max(1, warmup_steps)
        self._captured: dict = {}
        self._grads: list[torch.Tensor] = []
        self.capture_s = 0.0  # seconds spent warming up and capturing (all shapes)
        self.grad_norm: torch.Tensor | None = None  # the last step's gradient norm before clipping (max_grad_norm)
        if self.graphed and example_batch is not None:
            self._get(example_batch)

    # ------------------------------------------------------------------ eager pieces (also what gets captured)
    def _update(self):
        if self.max_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm, foreach=True)
            if self.grad_norm is None:
                self.grad_norm = norm.detach().clone()
            else:  # a buffer made before any capture: graph memory would be reused by the next replay
                self.grad_norm.copy_(norm)
        self.optimizer.step()
        grads = [p.grad for p in self.params if p.grad is not None]
        if self.graphed:
            torch._foreach_zero_(grads)          # keep the tensors: graphs hold their addresses
        else:
            self.optimizer.zero_grad(set_to_none=True)

    def _eager(self, batch: dict, update: bool):
        loss, stats = _split(self.loss_fn(**batch))
        loss.backward()
        if update:
            self._update()
        return loss.detach(), {k: v.detach() for k, v in stats.items()}

    # ------------------------------------------------------------------ capture
    def _snapshot(self):
        state = {id(p): {k: v.clone() for k, v in self.optimizer.state[p].items() if torch.is_tensor(v)}
                 for p in self.params if p in self.optimizer.state}
        return [p.detach().clone() for p in self.params], state

    @torch.no_grad()
    def _restore(self, snapshot):
        values, state = snapshot
        for p, v in zip(self.params, values):
            p.copy_(v)
        for p in self.params:
            for k, v in self.optimizer.state.get(p, {}).items():
                if torch.is_tensor(v):  # state created by the warm-up (Adam: step, exp_avg, exp_avg_sq) starts at 0
                    if id(p) in state and k in state[id(p)]:
                        v.copy_(state[id(p)][k])
                    else:
                        v.zero_()
            p.grad.zero_()

    def _make_capturable(self):
        for group in self.optimizer.param_groups:
            if "capturable" in group and not group["capturable"]:
                if any(p in self.optimizer.state for p in group["params"]):
                    raise ValueError("compile_train_step: the optimizer has already stepped without "
                                     "capturable=True; create it with capturable=True")
                group["capturable"] = True

    def _capture(self, batch: dict) -> _Captured:
        start = time.perf_counter()
        static = {k: v.detach().to(self.device).clone() for k, v in batch.items()}
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self._grads = [p.grad for p in self.params]
        if self.max_grad_norm is not None and self.grad_norm is None:
            self.grad_norm = torch.zeros((), dtype=torch.float32, device=self.device)
        self._make_capturable()
        snapshot = self._snapshot()
        main = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):  # lazy initialisations must not happen inside the capture
            for _ in range(self.warmup_steps):
                self._eager(static, update=True)
        main.wait_stream(side)
        self._restore(snapshot)
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()  # the warm-up's cached blocks: the graph's private pool cannot reuse them
        pool = torch.cuda.graph_pool_handle()
        forward_backward, update = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with torch.cuda.graph(forward_backward, pool=pool):
            loss, stats = _split(self.loss_fn(**static))
            loss.backward()
        with torch.cuda.graph(update, pool=pool):
            self._update()
        torch.cuda.synchronize(self.device)
        self.capture_s += time.perf_counter() - start
        return _Captured(static, loss.detach(), {k: v.detach() for k, v in stats.items()}, forward_backward, update)

    def _get(self, batch: dict) -> _Captured | None:
        key = tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(batch.items()))
        if key not in self._captured:
            try:
                self._captured[key] = self._capture(batch)
            except Exception as err:  # a training run should not die because one op could not be captured
                self.graphed = False
                warnings.warn(f"compile_train_step: CUDA graph capture failed ({type(err).__name__}: {err}); "
                              "running the step eagerly from now on", stacklevel=3)
                for p in self.params:
                    p.grad = None
                return None
        return self._captured[key]

    # ------------------------------------------------------------------ the step
    def __call__(self, batch: dict, update: bool = True):
        """Forward + backward on `batch` (a dict of tensors, the keyword arguments of loss_fn); with `update`, also
        clip, optimizer step and zero the gradients. Returns the loss (detached), or (loss, stats) when loss_fn
        returns stats."""
        captured = self._get(batch) if self.graphed else None
        if captured is None:
            loss, stats = self._eager(batch, update)
        else:
            for p, g in zip(self.params, self._grads):
                if p.grad is not g:  # someone set grads to None (zero_grad): put the captured tensors back
                    g.zero_() if p.grad is None else g.copy_(p.grad)
                    p.grad = g
            for k, v in batch.items():
                captured.static[k].copy_(v, non_blocking=True)
            captured.forward_backward.replay()
            if update:
                captured.update.replay()
            loss, stats = captured.loss.clone(), {k: v.clone() for k, v in captured.stats.items()}
        return (loss, stats) if stats else loss


def compile_train_step(loss_fn, optimizer, example_batch: dict | None = None, *, cuda_graph="auto",
                       max_grad_norm: float | None = None, warmup_steps: int = 2) -> TrainStep:
    """A training step for `loss_fn(**batch)` and `optimizer`, captured as CUDA graphs on a GPU.

    example_batch: captured right away (compile time is `step.capture_s`); other shapes are captured on first use.
    cuda_graph: "auto" (on CUDA), True (error elsewhere), False (eager: the same step, for comparison and CPU).
    max_grad_norm: clip the global gradient norm before the update (the norm is kept in `step.grad_norm`).
    Returns a `TrainStep`: `step(batch, update=True)`; with update=False gradients accumulate for a later update.
    """
    return TrainStep(loss_fn, optimizer, example_batch, cuda_graph=cuda_graph, max_grad_norm=max_grad_norm,
                     warmup_steps=warmup_steps)
