"""`RolloutEngine`: PPO's rollouts (step 1 of the loop) without the launch overhead of `generate` (lesson 08).

Decoding a batch is bound by reading the weights once per new token, but `generate` spends most of each step
launching ~1,000 small kernels from Python. The engine removes that overhead:

1. a decode-time copy of the weights in the fastest form memory allows (`weights.py`: dense = 4-bit dequantized,
   LoRA merged, q|k|v and gate|up fused; or lean = 4-bit kept, dequantized per layer into a shared buffer),
   refreshed in place after each PPO update (automatically: tensors' version counters tell us when);
2. a static KV cache, preallocated for (B, Tq + max_new_tokens), prompt length rounded up to `prompt_bucket`;
3. one eager prefill pass over the left-padded prompts;
4. a decode step (forward + sampling + EOS bookkeeping, all on the device) captured once in a CUDA graph and
   replayed for every new token; the host checks "all rows finished?" every `check_every` steps only.

On CPU the same step runs eagerly, so everything but the capture is tested on a laptop.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from . import sampling
from .inputs import left_padded, special_ids
from .model import Decoder, unwrap_causal_lm
from .refresh import ChangeTracker, build_decoder


@dataclass
class RolloutOutput:
    """What one `generate` call returns (Tr = number of decode steps run, at most max_new_tokens)."""

    response_ids: torch.Tensor
    """(B, Tr) long: sampled tokens, `pad_token_id` after a row's first EOS."""
    lengths: torch.Tensor
    """(B,) long: tokens up to and including the first EOS (Tr when the row never emitted one)."""
    finished: torch.Tensor
    """(B,) bool: the row emitted EOS."""
    logprobs: torch.Tensor | None
    """(B, Tr) fp32 log-prob of each token under the distribution it was drawn from (0 after the end), or None."""

    @property
    def responses(self) -> list[torch.Tensor]:
        """1-D responses cut just after their first EOS (kept), as PPO's step 2 wants them."""
        return [row[:n] for row, n in zip(self.response_ids, self.lengths.tolist())]


class _Workspace:
    """Every buffer a captured decode step reads or writes, for one (batch, cache length)."""

    def __init__(self, dec: Decoder, B: int, Tc: int, vocab: int):
        dev, kw = dec.device, dict(device=dec.device, dtype=dec.dtype)
        # zeros, not empty: masked columns are multiplied by 0 probabilities, and 0 * NaN garbage would be NaN
        self.k = [torch.zeros(B, dec.nkv, Tc, dec.hs, **kw) for _ in dec.layers]   # (B, nkv, Tc, hs) per layer
        self.v = [torch.zeros(B, dec.nkv, Tc, dec.hs, **kw) for _ in dec.layers]
        self.valid = torch.zeros(B, Tc, dtype=torch.bool, device=dev)                # key columns a query may see
        self.tok = torch.zeros(B, dtype=torch.long, device=dev)                      # token fed to the next step
        self.pos = torch.zeros(B, dtype=torch.long, device=dev)                      # its position id
        self.col = torch.zeros(1, dtype=torch.long, device=dev)                      # its cache column
        self.step = torch.zeros(1, dtype=torch.long, device=dev)                     # index of the token chosen next
        self.finished = torch.zeros(B, dtype=torch.bool, device=dev)
        self.out = torch.zeros(B, Tc, dtype=torch.long, device=dev)                  # (B, Tc) chosen tokens
        self.logprobs = torch.zeros(B, Tc, dtype=torch.float32, device=dev)
        self.temperature = torch.ones((), dtype=torch.float32, device=dev)
        self.min_new = torch.zeros((), dtype=torch.long, device=dev)
        self.pad = torch.zeros((), dtype=torch.long, device=dev)
        self.eos_mask = torch.zeros(vocab, dtype=torch.bool, device=dev)             # (V,) True on EOS ids
        self.graphs: dict = {}

    def state(self) -> list[torch.Tensor]:
        return [self.valid, self.tok, self.pos, self.col, self.step, self.finished, self.out, self.logprobs]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [*self.k, *self.v, *self.state()])


class RolloutEngine:
    """Fast sampling for a Qwen2/Llama causal LM (plain, peft LoRA, or bitsandbytes 4-bit + LoRA).

    Args:
        model: the policy. The engine reads its weights; it never modifies the model.
        dtype: compute dtype of the rollout (default: the dtype of the model's embeddings, i.e. what its hidden
            states use; bf16 for a 4-bit model loaded by `lessons_lib.load_model` on a GPU).
        weights: "dense" (merged compute-dtype copy of every layer), "lean" (keep 4-bit weights, dequantize per
            layer each step; use plain weights in place), or "auto" (dense layers while `max_extra_memory` lasts).
        max_extra_memory: bytes the dense copies may take in "auto" (default: half the free GPU memory at build
            time, at most a quarter of the GPU; unlimited on CPU).
        cuda_graphs: capture the decode step in a CUDA graph (CUDA only).
        kernels: "torch" (plain PyTorch ops) or "triton" (`lessons_lib.kernels` RMSNorm and RoPE: one kernel each
            instead of two and four; on CPU only under TRITON_INTERPRET=1, slowly).
        prompt_bucket: prompts are left-padded to a multiple of this, so graphs are reused across batches.
        check_every: decode steps between two "all rows finished?" checks (each check synchronises).
        keep_weights: keep the dense copy, KV cache and graphs between calls (fast); False frees them after each
            call (the memory is then free for the PPO update; the next call rebuilds them, a few ms on a GPU).
    """

    def __init__(self, model, *, dtype: torch.dtype | None = None, weights: str = "auto",
                 max_extra_memory: int | None = None, cuda_graphs: bool = True, kernels: str = "torch",
                 prompt_bucket: int = 32, check_every: int = 16, keep_weights: bool = True):
        if weights not in ("auto", "dense", "lean"):
            raise ValueError(f"weights must be 'auto', 'dense' or 'lean', got {weights!r}")
        if kernels not in ("torch", "triton"):
            raise ValueError(f"kernels must be 'torch' or 'triton', got {kernels!r}")
        self.model = model
        lm = unwrap_causal_lm(model)
        self.vocab_size = lm.lm_head.weight.shape[0] if not hasattr(lm.lm_head, "lora_A") else \
            lm.lm_head.get_base_layer().weight.shape[0]
        embed = lm.model.embed_tokens.weight
        self.device, self.dtype = embed.device, dtype or embed.dtype
        self.weights, self.max_extra_memory = weights, max_extra_memory
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self.kernels = kernels
        self.prompt_bucket, self.check_every = max(1, prompt_bucket), max(1, check_every)
        self.keep_weights = keep_weights
        self.generation_config = getattr(lm, "generation_config", None)
        self.decoder: Decoder | None = None
        self._tracker: ChangeTracker | None = None
        self._workspaces: dict = {}
        self._pool = None
        self.refreshes = 0  # how many projections were re-read after the model changed (for tests and stats)

    # ------------------------------------------------------------------ weights
    def _budget(self) -> float:
        if self.max_extra_memory is not None:
            return float(self.max_extra_memory)
        if self.device.type == "cuda":  # leave room for the PPO update that follows the rollout
            free, total = torch.cuda.mem_get_info(self.device)
            return min(0.5 * free, 0.25 * total)
        return math.inf

    @torch.no_grad()
    def build(self):
        """Read the model into the engine's own form (`refresh.build_decoder`); forget workspaces and graphs."""
        self.decoder = build_decoder(self.model, self.dtype, self.weights, self._budget(), self.kernels)
        self._tracker = ChangeTracker(self.decoder)
        self._workspaces.clear()
        if self.cuda_graphs:
            self._pool = torch.cuda.graph_pool_handle()
        return self

    def refresh(self, force: bool = False) -> int:
        """Re-read the projections whose weights or adapters changed since the last call (all with `force`).

        Called by `generate` automatically. A change is seen when adapters are switched, added or merged, when a
        tensor is replaced or written in place (version counter), and, for LoRA tensors, whenever their values
        differ. Base weights written by an optimizer that does not bump version counters (fused AdamW on a full
        fine-tune) need `refresh(force=True)`, or `weights="lean"`, which reads plain weights where they lie.
        Returns how many projections were re-read.
        """
        if self.decoder is None:
            self.build()
            return 0
        count, stale_graphs = self._tracker.refresh(force)
        if stale_graphs:
            for ws in self._workspaces.values():
                ws.graphs.clear()
        self.refreshes += count
        return count

    def __repr__(self) -> str:
        mem = self.memory()
        held = sum(v for k, v in mem.items() if "layers" not in k) / 2**20
        return (f"RolloutEngine({type(unwrap_causal_lm(self.model)).__name__}, dtype={self.dtype}, weights="
                f"{self.weights!r} ({mem['dense_layers']}/{mem['layers']} layers dense), "
                f"cuda_graphs={self.cuda_graphs}, kernels={self.kernels!r}, holds {held:.1f} MiB)")

    def release(self):
        """Free the dense copy, KV caches and graphs (the next `generate` rebuilds them)."""
        self.decoder, self._tracker, self._pool = None, None, None
        self._workspaces.clear()

    def memory(self) -> dict:
        """Bytes held by the engine, by kind."""
        if self.decoder is None:
            return {"weights": 0, "scratch": 0, "kv_cache": 0, "lora_snapshot": 0, "dense_layers": 0, "layers": 0}
        dec = self.decoder
        scratch = dec.layers[0].qkv.scratch.get("buf")
        return {"weights": sum(p.nbytes() for p in dec.projs),
                "scratch": 0 if scratch is None else scratch.numel() * scratch.element_size(),
                "kv_cache": sum(ws.nbytes() for ws in self._workspaces.values()),
                "lora_snapshot": self._tracker.nbytes(),
                "dense_layers": sum(all(p.dense for p in layer.projs) for layer in dec.layers),
                "layers": len(dec.layers)}

    # ------------------------------------------------------------------ inputs
    def _workspace(self, B: int, Tc: int) -> _Workspace:
        key = (B, Tc)
        if key not in self._workspaces:
            self._workspaces.clear()  # one shape at a time: KV caches are big
            self._workspaces[key] = _Workspace(self.decoder, B, Tc, self.vocab_size)
        return self._workspaces[key]

    # ------------------------------------------------------------------ the step that gets captured
    def _choose(self, ws: _Workspace, logits: torch.Tensor, mode: tuple):
        """Pick token number `ws.step` for every row from fp32 logits (B, V); all bookkeeping stays on the device."""
        greedy, top_k, top_p, with_logprobs = mode
        scores = sampling.block_eos(logits, ws.eos_mask, ws.step, ws.min_new)
        if greedy:
            tok = scores.argmax(dim=-1)
        else:
            scores = sampling.warp(scores, ws.temperature, top_k, top_p)
            tok = sampling.gumbel_argmax(scores)
        done = ws.finished.clone()
        tok = torch.where(done, ws.pad, tok)                                       # finished rows emit padding
        ws.out.index_copy_(1, ws.step, tok[:, None])
        if with_logprobs:
            lp = sampling.chosen_logprobs(scores, tok).masked_fill(done, 0.0)
            ws.logprobs.index_copy_(1, ws.step, lp[:, None])
        ws.finished |= ws.eos_mask[tok]
        ws.tok.copy_(tok)
        ws.step += 1

    def _step(self, ws: _Workspace, mode: tuple):
        logits = self.decoder.decode(ws.tok, ws.pos, ws.col, ws.valid, ws.k, ws.v)  # (B, V)
        ws.pos += 1
        ws.col += 1
        self._choose(ws, logits, mode)

    def _capture(self, ws: _Workspace, mode: tuple):
        """Record one decode step in a CUDA graph. Warm-up runs change the workspace, so its state is restored."""
        saved = [t.clone() for t in ws.state()]
        try:
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(2):  # lazy initialisations (cuBLAS handles, workspaces) must not happen in capture
                    self._step(ws, mode)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                self._step(ws, mode)
        finally:
            for t, s in zip(ws.state(), saved):
                t.copy_(s)
        ws.graphs[mode] = graph
        return graph

    def _stepper(self, ws: _Workspace, mode: tuple):
        """The captured step's `replay`; if capture fails, a warning and eager steps from then on."""
        graph = ws.graphs.get(mode)
        if graph is None:
            try:
                graph = self._capture(ws, mode)
            except Exception as err:  # a PPO run should not die because one op could not be captured
                self.cuda_graphs = False
                warnings.warn(f"RolloutEngine: CUDA graph capture failed ({type(err).__name__}: {err}); decoding "
                              "eagerly from now on (correct, but launch-bound)", stacklevel=3)
                return lambda: self._step(ws, mode)
        return graph.replay

    # ------------------------------------------------------------------ generate
    @torch.no_grad()
    def generate(self, input_ids, attention_mask: torch.Tensor | None = None, *, max_new_tokens: int = 128,
                 do_sample: bool = True, temperature: float = 1.0, top_k: int | None = 0, top_p: float | None = 1.0,
                 min_new_tokens: int = 0, eos_token_id=None, pad_token_id: int | None = None,
                 return_logprobs: bool = False, progress: bool = False) -> RolloutOutput:
        """Sample up to `max_new_tokens` per prompt.

        input_ids: left-padded (B, Tq) with `attention_mask`, or a list of 1-D token tensors (padded here).
        eos_token_id: int or list (default: the model's generation_config); [] never stops early.
        Sampling is softmax(logits / temperature), optionally top-k / top-p filtered (PPO wants neither).
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if do_sample and not temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        eos, pad = special_ids(eos_token_id, pad_token_id, self.generation_config, self.vocab_size)
        ids, mask = left_padded(input_ids, attention_mask, pad, self.prompt_bucket, self.device)
        self.refresh()
        B, Tq = ids.shape
        Tc = Tq + max_new_tokens
        if self.decoder.window is not None and Tc > self.decoder.window:
            raise NotImplementedError(f"sliding-window attention (window {self.decoder.window}) with a cache of "
                                      f"{Tc} columns is not supported")
        mode = (not do_sample, int(top_k or 0) if do_sample else 0, float(top_p or 1.0) if do_sample else 1.0,
                bool(return_logprobs))
        ws = self._workspace(B, Tc)
        ws.valid.zero_()
        ws.valid[:, :Tq] = mask
        ws.temperature.fill_(float(temperature) if do_sample else 1.0)
        ws.min_new.fill_(int(min_new_tokens))
        ws.pad.fill_(pad)
        ws.eos_mask.zero_()
        if eos:
            ws.eos_mask[eos] = True
        ws.finished.zero_()
        ws.step.zero_()
        ws.out.fill_(pad)
        ws.logprobs.zero_()

        logits = self.decoder.prefill(ids, mask, ws.k, ws.v)                     # (B, V)
        ws.pos.copy_(mask.sum(1))                                                 # position of the first new token
        ws.col.fill_(Tq)
        self._choose(ws, logits, mode)
        step = self._stepper(ws, mode) if self.cuda_graphs and max_new_tokens > 3 else lambda: self._step(ws, mode)
        from tqdm.auto import tqdm

        n = 1
        with tqdm(total=max_new_tokens, initial=1, unit="tok", desc="rollout", leave=False,
                  disable=not progress) as bar:
            while n < max_new_tokens:
                if n % self.check_every == 0 and bool(ws.finished.all()):
                    break
                step()
                n += 1
                bar.update(1)
        out = self._output(ws, n, return_logprobs)
        if not self.keep_weights:
            self.release()
        return out

    @torch.no_grad()
    def forced_logits(self, input_ids, attention_mask, continuation: torch.Tensor) -> torch.Tensor:
        """Logits the engine computes for prompts followed by given tokens (teacher forcing), through the same
        prefill + decode path `generate` uses: (B, Tq), (B, Tq), (B, n) -> fp32 (B, n, V), where [:, t] predicts
        continuation[:, t]. For checking the engine against the model it copies."""
        ids, mask = left_padded(input_ids, attention_mask, 0, self.prompt_bucket, self.device)
        self.refresh()
        B, Tq = ids.shape
        n = continuation.shape[1]
        ws = self._workspace(B, Tq + n)
        ws.valid.zero_()
        ws.valid[:, :Tq] = mask
        logits = [self.decoder.prefill(ids, mask, ws.k, ws.v)]
        ws.pos.copy_(mask.sum(1))
        ws.col.fill_(Tq)
        for t in range(n - 1):
            ws.tok.copy_(continuation[:, t])
            logits.append(self.decoder.decode(ws.tok, ws.pos, ws.col, ws.valid, ws.k, ws.v))
            ws.pos += 1
            ws.col += 1
        return torch.stack(logits, dim=1)

    def _output(self, ws: _Workspace, n: int, with_logprobs: bool) -> RolloutOutput:
        tokens = ws.out[:, :n]                                                     # (B, n)
        is_eos = ws.eos_mask[tokens]
        finished = is_eos.any(1)
        lengths = torch.where(finished, is_eos.int().argmax(1) + 1, torch.full_like(finished, n, dtype=torch.long))
        if bool(finished.all()):  # like generate: stop at the step where the last row finished
            n = int(lengths.max())
        return RolloutOutput(response_ids=tokens[:, :n].clone(), lengths=lengths, finished=finished,
                             logprobs=ws.logprobs[:, :n].clone() if with_logprobs else None)
