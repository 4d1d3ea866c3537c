"""Adam with TensorFlow's epsilon placement: the `optimizer="adam_tf"` choice of PPOConfig (lesson 08).

[N] ("PyTorch Adam optimizer numerical issues w.r.t. RLHF") found that the original RLHF code's TensorFlow Adam
and PyTorch's Adam differ in where epsilon enters, and that PyTorch's form makes the first updates of RLHF more
aggressive. With m, v the moment estimates after t steps:

    PyTorch:     theta -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
    TensorFlow:  theta -= lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)

They coincide when eps = 0; early on (small t) TensorFlow's effective epsilon, eps / sqrt(1 - b2^t), is larger.
"""

from __future__ import annotations

import math

import torch


class AdamTFStyle(torch.optim.Optimizer):
    """Adam (decoupled weight decay, as AdamW) with TensorFlow's epsilon; same arguments as torch.optim.AdamW."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-5, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t, m, v = state["step"], state["exp_avg"], state["exp_avg_sq"]
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                m.mul_(beta1).add_(p.grad, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                lr_t = group["lr"] * math.sqrt(1 - beta2 ** t) / (1 - beta1 ** t)
                p.addcdiv_(m, v.sqrt().add_(group["eps"]), value=-lr_t)
        return loss
