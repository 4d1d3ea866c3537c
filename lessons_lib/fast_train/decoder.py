"""`FastDecoder`: the training forward of a Qwen2/Llama LoRA model (4-bit or not) in few kernels and little memory.

    dec = FastDecoder(model, offload=False)        # reads the model's tensors in place; the model is unchanged
    loss = dec.loss(input_ids)                     # == model(input_ids, labels=input_ids).loss, same LoRA gradients
    hidden = dec(input_ids, attention_mask)        # (B, T, H) after the final norm, e.g. for PPO's log-probs

Each layer is one autograd node (`_LayerFn`) that keeps only its input (on the device, or in pinned host memory
with `offload=True`) and recomputes the layer in the backward (`layer.py`), with the MLP's forward and backward
fused per chunk of positions. The loss is `lessons_lib.loss.linear_cross_entropy` (no full logits). Gradients go
to the model's own LoRA parameters, so any optimizer over `model.parameters()` works, and so does
`compile_train_step`, which captures the whole step in a CUDA graph.

Differences from calling the model: `attention_mask=None` means no padding (the causal flash kernel runs); pass a
mask only when there is padding. A query that sees no key at all (left padding) gets a zero attention output, as
transformers gets from PyTorch's SDPA. Dropout must be off (lora_dropout=0, attention_dropout=0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..fastgen.model import unwrap_causal_lm as _unwrap  # one model-type check for rollouts and training
from ..loss import linear_cross_entropy, next_token_targets
from .layer import Layer, Run, layer_backward, layer_forward, rms_norm
from .offload import Offloader
from .proj import lora_params


def unwrap_causal_lm(model):
    """The transformers causal LM inside a peft model (or the model itself), checked to be supported."""
    return _unwrap(model, "FastDecoder", "train it through transformers instead")


class _LayerFn(torch.autograd.Function):
    """One decoder layer as one autograd node: forward without autograd, backward = recompute + differentiate."""

    @staticmethod
    def forward(ctx, x, dec, run, index, loras, *params):
        ctx.dec, ctx.run, ctx.index, ctx.loras = dec, run, index, loras
        if dec.offload:
            ctx.generation = dec.generation
            dec._offloader.save(index, x, dec.generation)
        else:
            ctx.save_for_backward(x)
        return layer_forward(dec.layers[index], x, run, loras)

    @staticmethod
    def backward(ctx, dy):
        dec = ctx.dec
        x = dec._offloader.load(ctx.index, ctx.generation) if dec.offload else ctx.saved_tensors[0]
        dx, grads = layer_backward(dec.layers[ctx.index], x, dy, ctx.run, ctx.loras, ctx.needs_input_grad[0],
                                   list(ctx.needs_input_grad[5:]))
        return (dx, None, None, None, None, *grads)


class FastDecoder:
    """Training forward of a Qwen2/Llama causal LM with LoRA adapters (peft) on frozen, 4-bit or 16-bit weights.

    Args:
        model: a transformers Qwen2/Llama causal LM, or a peft model around one. Read in place, never modified.
        offload: keep each layer's input (the checkpoint) in pinned host memory instead of on the GPU.
        mlp_chunk_tokens: rows of the MLP computed at a time (memory of its (rows, intermediate) activations).
        loss_chunk_tokens: rows of logits at a time in the loss (default: about 2**25 logits).
    """

    def __init__(self, model, *, offload: bool = False, mlp_chunk_tokens: int = 1024,
                 loss_chunk_tokens: int | None = None):
        lm = unwrap_causal_lm(model)
        inner, cfg = lm.model, lm.config
        if getattr(cfg, "hidden_act", "silu") != "silu":
            raise NotImplementedError(f"hidden_act={cfg.hidden_act!r}; FastDecoder implements SwiGLU with silu")
        if getattr(cfg, "mlp_bias", False):
            raise NotImplementedError("mlp_bias=True is not supported by FastDecoder")
        self.model, self.config = model, cfg
        embed = inner.embed_tokens
        if hasattr(embed, "lora_embedding_A") or embed.weight.requires_grad:
            raise NotImplementedError("trainable embeddings (or LoRA on them) are not supported by FastDecoder")
        head = lm.get_output_embeddings()   # None for a sequence classifier: hidden states only, no loss()
        if head is not None and (hasattr(head, "modules_to_save") or hasattr(head, "lora_A")
                                 or head.weight.requires_grad):
            raise NotImplementedError("a trainable LM head (modules_to_save or LoRA) is not supported by FastDecoder")
        self.embed = embed.weight                                            # (V, H)
        self.head = None if head is None else head.weight                    # (V, H), maybe the same tensor
        self.layers = [Layer(layer, i) for i, layer in enumerate(inner.layers)]
        self.norm, self.norm_eps = inner.norm.weight, inner.norm.variance_epsilon
        self.rotary = inner.rotary_emb
        attn = inner.layers[0].self_attn
        self.nh, self.nkv, self.hs = cfg.num_attention_heads, cfg.num_key_value_heads, attn.head_dim
        self.attention_dropout = float(getattr(cfg, "attention_dropout", 0.0) or 0.0)
        self.dtype = self.embed.dtype
        for layer in self.layers:
            for proj in layer.projs:
                for part in proj.parts:
                    if part.compute_dtype not in (None, self.dtype):
                        raise NotImplementedError(f"{part.name} computes in {part.compute_dtype} but the hidden "
                                                  f"states are {self.dtype}: load with compute dtype == dtype")
        self.offload, self.mlp_chunk_tokens, self.loss_chunk_tokens = offload, mlp_chunk_tokens, loss_chunk_tokens
        self._offloader = Offloader()
        self.generation = 0  # forward passes with autograd so far (offload checks backward reads its own pass)

    def trainable_parameters(self) -> list[torch.Tensor]:
        """The LoRA tensors that require grad (what an optimizer of this step should hold)."""
        return [p for layer in self.layers for loras in layer.loras() for p in lora_params(loras) if p.requires_grad]

    def _run(self, x, attention_mask, position_ids) -> Run:
        B, T, _ = x.shape
        for layer in self.layers:
            if layer.window is not None and layer.window < T:
                raise NotImplementedError(f"sliding-window attention (window {layer.window}) over {T} positions")
        if position_ids is None:
            position_ids = torch.arange(T, device=x.device)[None]           # (1, T), as transformers
        cos, sin = self.rotary(x, position_ids)                              # (B or 1, T, hs) each
        attn_mask = keep = None
        if attention_mask is not None:
            valid = attention_mask.bool()                                    # (B, T)
            causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            allowed = causal[None] & valid[:, None, :]                       # (B, T, T): query i sees key j
            has_key = allowed.any(-1, keepdim=True)                          # (B, T, 1)
            allowed |= torch.eye(T, dtype=torch.bool, device=x.device)[None] & ~has_key  # finite softmax ...
            attn_mask, keep = allowed[:, None], has_key[:, None].to(x.dtype)  # ... whose output is zeroed
        return Run(cos, sin, attn_mask, keep, self.nh, self.nkv, self.hs, self.mlp_chunk_tokens)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, T) -> hidden states after the final norm (B, T, H), differentiable w.r.t. the LoRA tensors."""
        x = F.embedding(input_ids, self.embed)                               # (B, T, H)
        run = self._run(x, attention_mask, position_ids)
        if self.attention_dropout > 0 and self.model.training:
            raise NotImplementedError(f"attention_dropout={self.attention_dropout} in training mode")
        grad = torch.is_grad_enabled()
        tracked = False
        for i, layer in enumerate(self.layers):
            loras = layer.loras()
            params = [p for group in loras for p in lora_params(group)]
            if grad and (x.requires_grad or any(p.requires_grad for p in params)):
                if not tracked and self.offload:
                    self.generation += 1
                    self._offloader.prepare(len(self.layers), x)
                tracked = True
                x = _LayerFn.apply(x, self, run, i, loras, *params)
            else:
                x = layer_forward(layer, x, run, loras)
        if tracked and self.offload and x.is_cuda:
            self._offloader.finish_forward(x.device)
        return rms_norm(x, self.norm, self.norm_eps)

    __call__ = forward

    def loss(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
             labels: torch.Tensor | None = None, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Mean next-token cross-entropy (labels: default input_ids; -100 and padding ignored), as transformers'."""
        if self.head is None:
            raise NotImplementedError(f"{type(unwrap_causal_lm(self.model)).__name__} has no LM head: FastDecoder "
                                      "gives its hidden states (call it), not a language-model loss")
        hidden = self.forward(input_ids, attention_mask, position_ids)      # (B, T, H)
        targets = next_token_targets(input_ids, attention_mask, labels)     # (B, T), last column -100
        return linear_cross_entropy(hidden, self.head, targets, self.loss_chunk_tokens)
