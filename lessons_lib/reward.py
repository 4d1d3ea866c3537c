"""Reward models: a causal-LM backbone with a one-number head, trained on preferences or scores (lesson 03).

    rm = RewardModel.from_backbone("tiny-qwen2-sft")               # any causal LM; LoRA / 4-bit optional
    history = train_reward_model(rm, load_instruction_data(data_file("preferences")))
    rm.fit_normalization_on_policy(sft_model, sft_tokenizer, prompts)  # mean 0, std 1 on the policy's samples
    rm.score(["Write a bullet list of two cats."], ["- cat\\n- dog"])   # (B,) normalised rewards
    rm.save("my-rm"); rm = RewardModel.from_pretrained("my-rm")    # keeps the normalisation statistics

A reward model reads a whole exchange (prompt + response, chat-formatted) and outputs one number, read from the
hidden state of the **last real token** (the end-of-turn token), wherever padding puts it. Two ways to train it:

- preferences (`prompt`, `chosen`, `rejected`): Bradley-Terry, P(chosen > rejected) = sigmoid(r_c - r_r), so the
  loss is -log sigmoid(r_c - r_r) (minus an optional margin inside);
- scores (`instruction`, `response`, `score`): regression of r on the standardised score.

Details from "The N Implementation Details of RLHF with PPO" (Huang et al., 2022) [N]: the head starts as
N(0, 1/sqrt(H+1)) with no bias, and the rewards are normalised to mean 0, std 1 on responses sampled from the
policy PPO starts from (`fit_normalization_on_policy`; `train_reward_model(..., policy=sft_model)`), the
statistics stored with the model. Trained without a policy, the normalisation falls back to the training
responses (chosen and rejected, or the scored ones), whose mean and spread can differ from the policy's.
Rule rewards and the hybrid combinator live in `lessons_lib.rewards_rules`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from lessons_lib.rewards_rules import combine_rewards, constraint_reward, rule_reward  # noqa: F401 (re-exported)

META_FILE = "reward_model.json"


def _parts(model):
    """(backbone, head) of a sequence-classification model, also inside a peft wrapper."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = getattr(base, "score", None) or getattr(base, "classifier", None)
    if head is None:
        raise ValueError(f"{type(base).__name__}: no `score` or `classifier` head; load the backbone with "
                         "AutoModelForSequenceClassification(num_labels=1)")
    return getattr(base, base.base_model_prefix), head


def init_reward_head(model) -> None:
    """[N]: head weights ~ N(0, 1/sqrt(H+1)), bias 0, so initial rewards are O(1) whatever the hidden size."""
    _, head = _parts(model)
    layer = getattr(head, "original_module", head)   # peft's modules_to_save wrapper keeps a trainable copy
    for lin in {layer, *[m for m in head.modules() if isinstance(m, torch.nn.Linear)]}:
        if isinstance(lin, torch.nn.Linear):
            torch.nn.init.normal_(lin.weight, std=1 / math.sqrt(lin.in_features + 1))
            if lin.bias is not None:
                torch.nn.init.zeros_(lin.bias)


class RewardModel:
    """A sequence classifier with one output, its tokenizer, and the statistics that normalise its rewards."""

    def __init__(self, model, tokenizer, mean: float = 0.0, std: float = 1.0, max_length: int = 512,
                 base: str | None = None, load_in_4bit: bool = False, target_stats: tuple | None = None):
        if getattr(model.config, "num_labels", 1) != 1:
            raise ValueError(f"RewardModel: expected a model with num_labels=1, got {model.config.num_labels}")
        self.model, self.tokenizer = model, tokenizer
        self.mean, self.std, self.max_length = float(mean), float(std), max_length
        self.base, self.load_in_4bit = base, load_in_4bit          # how to rebuild a LoRA model's backbone
        self.target_stats = tuple(target_stats) if target_stats else None   # score mode: (mean, std) of targets
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id

    # ------------------------------------------------------------------------------------------ building
    @classmethod
    def from_backbone(cls, name_or_path, *, tokenizer=None, dtype=None, load_in_4bit: bool = False,
                      lora_r: int | None = None, lora_alpha: int | None = None, lora_dropout: float = 0.0,
                      target_modules=None, gradient_checkpointing: bool = False, max_length: int = 512,
                      seed: int = 0):
        """A fresh reward model on a causal LM's backbone (tiny id, folder or hub id); the head is newly made.

        `load_in_4bit=True` loads NF4 + double quantization and needs `lora_r` (a frozen 4-bit backbone
        learns nothing by itself); `lora_r` alone trains LoRA adapters on a 16/32-bit backbone.
        `gradient_checkpointing` recomputes activations in backward (non-reentrant): less memory, ~30% more time.
        """
        from transformers import AutoTokenizer

        if load_in_4bit and not lora_r:
            raise ValueError("RewardModel.from_backbone: load_in_4bit=True needs lora_r (4-bit weights are frozen)")
        source = _resolve(name_or_path)
        tokenizer = tokenizer or AutoTokenizer.from_pretrained(source)
        torch.manual_seed(seed)
        model = _load_classifier(source, tokenizer, dtype, load_in_4bit)
        init_reward_head(model)
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if lora_r:
            from peft import LoraConfig, get_peft_model

            targets = target_modules or ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
            config = LoraConfig(task_type="SEQ_CLS", r=lora_r, lora_alpha=lora_alpha or lora_r,
                                lora_dropout=lora_dropout, target_modules=targets)
            model = get_peft_model(model, config)   # SEQ_CLS: the `score` head is trained and saved too
        return cls(model, tokenizer, max_length=max_length, base=str(name_or_path), load_in_4bit=load_in_4bit)

    @classmethod
    def from_pretrained(cls, path, dtype=None):
        """Load a reward model saved by `save` (or any one-label sequence classifier folder, or a tiny id)."""
        from transformers import AutoTokenizer

        path = Path(_resolve(path))
        meta = json.loads((path / META_FILE).read_text()) if (path / META_FILE).is_file() else {}
        tokenizer = AutoTokenizer.from_pretrained(path)
        if (path / "adapter_config.json").is_file():
            from peft import PeftModel

            if not meta.get("base"):
                raise ValueError(f"{path}: LoRA reward model without its base model name in {META_FILE}")
            base = _load_classifier(_resolve(meta["base"]), tokenizer, dtype,
                                    meta.get("load_in_4bit", False))
            model = PeftModel.from_pretrained(base, path)   # adapters and the trained head
        else:
            model = _load_classifier(str(path), tokenizer, dtype)
        model.eval()
        return cls(model, tokenizer, mean=meta.get("mean", 0.0), std=meta.get("std", 1.0),
                   max_length=meta.get("max_length", 512), base=meta.get("base"),
                   load_in_4bit=meta.get("load_in_4bit", False), target_stats=meta.get("target_stats"))

    load = from_pretrained

    def save(self, path, metrics: dict | None = None) -> Path:
        """Weights (or LoRA adapters + head), tokenizer, and `reward_model.json` with the normalisation."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        meta = {"mean": self.mean, "std": self.std, "max_length": self.max_length, "base": self.base,
                "load_in_4bit": self.load_in_4bit, "target_stats": self.target_stats, "metrics": metrics or {}}
        (path / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        return path

    save_pretrained = save

    # ------------------------------------------------------------------------------------------ scoring
    @property
    def device(self):
        return next(self.model.parameters()).device

    def encode(self, prompts: list[str], responses: list[str]) -> dict:
        """Chat-format each (prompt, response) and tokenize, left-padded and truncated from the left."""
        from lessons_lib.data import chat_text

        if len(prompts) != len(responses):
            raise ValueError(f"RewardModel: {len(prompts)} prompts but {len(responses)} responses")
        if not prompts:
            raise ValueError("RewardModel: empty batch (no prompts)")
        eos = self.tokenizer.eos_token or ""
        texts = [chat_text(self.tokenizer, p, r[:-len(eos)] if eos and r.endswith(eos) else r)
                 for p, r in zip(prompts, responses)]
        sides = self.tokenizer.padding_side, self.tokenizer.truncation_side
        self.tokenizer.padding_side, self.tokenizer.truncation_side = "left", "left"
        try:
            enc = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True,
                                 max_length=self.max_length, add_special_tokens=False)
        finally:
            self.tokenizer.padding_side, self.tokenizer.truncation_side = sides
        return {k: v.to(self.device) for k, v in enc.items()}

    def rewards(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Raw (unnormalised) rewards with gradients: the head applied at each row's last real token.

        Works with left or right padding: positions count real tokens only, and the index of the last real token
        comes from the attention mask (not from the pad id, which may equal the end-of-turn id).
        """
        backbone, head = _parts(self.model)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)                       # (B, T)
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask,
                          position_ids=position_ids).last_hidden_state                     # (B, T, H)
        T = attention_mask.shape[1]
        last = (attention_mask * torch.arange(T, device=attention_mask.device)).argmax(-1)  # (B,)
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]          # (B, H)
        return head(pooled.to(_head_dtype(head))).squeeze(-1).float()                      # (B,)

    @torch.no_grad()
    def score(self, prompts: list[str], responses: list[str], normalize: bool = True,
              batch_size: int = 64) -> torch.Tensor:
        """(B,) float32 rewards on CPU, normalised with the stored mean/std unless `normalize=False`."""
        if len(prompts) != len(responses) or not prompts:
            self.encode(prompts, responses)   # raises the explanatory error
        was_training = self.model.training
        self.model.eval()
        try:
            out = torch.cat([self.rewards(**self.encode(prompts[i:i + batch_size], responses[i:i + batch_size]))
                             for i in range(0, len(prompts), batch_size)]).cpu()
        finally:
            self.model.train(was_training)
        return (out - self.mean) / self.std if normalize else out

    __call__ = score

    def fit_normalization(self, prompts: list[str], responses: list[str]) -> tuple[float, float]:
        """Set mean/std so these responses' rewards have mean 0 and std 1 [N]; returns (mean, std)."""
        raw = self.score(prompts, responses, normalize=False)
        self.mean, self.std = raw.mean().item(), max(raw.std().item(), 1e-6)
        return self.mean, self.std

    def fit_normalization_on_policy(self, policy, tokenizer, prompts: list[str], samples_per_prompt: int = 1,
                                    temperature: float = 0.7, max_new_tokens: int = 128, batch_size: int = 64,
                                    seed: int = 0, progress: bool = True) -> tuple[float, float]:
        """Normalise on the policy's own answers: sample, score, set mean/std [N]; returns (mean, std).

        For each prompt (a raw instruction) `samples_per_prompt` responses y ~ policy(. | x) are sampled with the
        policy's chat template (`tokenizer`: the policy's), left-padded, at `temperature` with no top-k / top-p
        (PPO's rollout law; the defaults are `PPOConfig`'s), cut at EOS or after `max_new_tokens`, and decoded
        without special tokens, as PPOTrainer passes them to the reward model. With the N raw rewards r_i:

            mean = (1/N) sum_i r_i,   std = sqrt(1/(N-1) sum_i (r_i - mean)^2),   score = (r - mean) / std

        so at the start of PPO the policy's rewards have mean 0 and std 1, whatever the offset and scale training
        left: a KL coefficient or a rule weight means the same for every reward model. Source: Huang et al., "The
        N Implementation Details of RLHF with PPO" (2022), reward normalisation, following Ziegler et al.,
        "Fine-Tuning Language Models from Human Preferences" (2019), who normalise on samples of the initial policy.

        Deterministic given `seed` (the caller's random state is left as it was) on the same machine and number
        of threads. `progress`: a tqdm bar over the sampling batches.
        """
        from lessons_lib.tiny.measure import sample_responses

        prompts = list(prompts)
        if not prompts:
            raise ValueError("fit_normalization_on_policy: no prompts")
        if samples_per_prompt < 1:
            raise ValueError(f"fit_normalization_on_policy: samples_per_prompt must be >= 1, got {samples_per_prompt}")
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            answers = sample_responses(policy, tokenizer, prompts, num_samples=samples_per_prompt,
                                       temperature=temperature, max_new_tokens=max_new_tokens,
                                       batch_size=batch_size, seed=seed, progress=progress)
        return self.fit_normalization([p for p in prompts for _ in range(samples_per_prompt)],
                                      [a for group in answers for a in group])


def _load_classifier(source: str, tokenizer, dtype=None, load_in_4bit: bool = False):
    """A one-label sequence classifier on `source`'s backbone, on the GPU if there is one (NF4 if asked)."""
    from transformers import AutoModelForSequenceClassification

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = dtype or (torch.float32 if device == "cpu" else _gpu_dtype())
    kwargs = dict(num_labels=1, dtype=dtype)
    if load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs.update(device_map={"": device}, quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype))
    model = AutoModelForSequenceClassification.from_pretrained(source, **kwargs)
    if load_in_4bit:
        from lessons_lib.models import fix_bnb_cpu_repack

        fix_bnb_cpu_repack(model)   # bitsandbytes' CPU repack would break training after a no-grad forward
    else:
        model.to(device)
    model.config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else \
        tokenizer.eos_token_id
    return model


def _resolve(name_or_path) -> str:
    from lessons_lib.tiny import resolve

    return str(resolve(str(name_or_path)) or name_or_path) if isinstance(name_or_path, (str, os.PathLike)) \
        else name_or_path


def _gpu_dtype():
    from lessons_lib.models import default_dtype

    return default_dtype("cuda")


def _head_dtype(head):
    return next(head.parameters()).dtype


# ------------------------------------------------------------------------------------------ losses and metrics

def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None):
    """-log sigmoid(r_c - r_r - margin), averaged: the negative log-likelihood of the preferences."""
    diff = chosen - rejected - (margin if margin is not None else 0.0)
    return -F.logsigmoid(diff).mean()


def regression_loss(predicted: torch.Tensor, target: torch.Tensor):
    return F.mse_loss(predicted, target)


def pairwise_metrics(chosen: torch.Tensor, rejected: torch.Tensor, bins: int = 10) -> dict:
    """Accuracy (r_c > r_r), mean margin, BT loss and expected calibration error of P = sigmoid(r_c - r_r).

    Calibration: the model predicts the answer it scores higher, with confidence max(P, 1-P); ECE is the
    size-weighted gap between confidence and accuracy over `bins` confidence bins (0 = perfectly calibrated).
    """
    diff = (chosen - rejected).float()
    p = torch.sigmoid(diff)
    conf, correct = torch.maximum(p, 1 - p), (diff > 0).float()
    edges = torch.linspace(0.5, 1.0, bins + 1)
    ece, table = 0.0, []
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf >= lo) & ((conf < hi) if hi < 1 else (conf <= hi))
        if m.any():
            gap = (conf[m].mean() - correct[m].mean()).abs().item()
            ece += m.float().mean().item() * gap
            table.append((lo.item(), hi.item(), int(m.sum()), conf[m].mean().item(), correct[m].mean().item()))
    return {"accuracy": correct.mean().item(), "margin": diff.mean().item(),
            "loss": -F.logsigmoid(diff).mean().item(), "ece": ece, "calibration": table}


def regression_metrics(predicted: torch.Tensor, target: torch.Tensor) -> dict:
    """MSE, Pearson correlation and Spearman (rank) correlation."""
    def pearson(a, b):
        a, b = a - a.mean(), b - b.mean()
        return (a @ b / (a.norm() * b.norm()).clamp(min=1e-12)).item()

    def ranks(x):
        return torch.argsort(torch.argsort(x)).float()

    predicted, target = predicted.float(), target.float()
    return {"mse": F.mse_loss(predicted, target).item(), "pearson": pearson(predicted, target),
            "spearman": pearson(ranks(predicted), ranks(target))}


# ------------------------------------------------------------------------------------------ training

@dataclass
class RewardTrainingConfig:
    epochs: int = 2
    """passes over the training data"""
    batch_size: int = 32
    """pairs (preference mode) or scored answers (score mode) per optimizer step"""
    lr: float = 1e-3
    """peak learning rate (1e-3 suits the 1M-parameter tiny model; ~1e-5 full / ~1e-4 LoRA for real models)"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    warmup_steps: int = 10
    """linear warm-up, then linear decay to 0"""
    max_steps: int | None = None
    """stop after this many steps (a short run in a notebook or a test)"""
    margin_column: str | None = None
    """preference mode: a column whose value r_c - r_r should exceed (e.g. a rating difference); None: 0"""
    seed: int = 0
    """seeds the batch order (and the policy samples of the normalisation)"""
    progress: bool = True
    """show a tqdm progress bar"""
    norm_samples_per_prompt: int = 1
    """normalisation on a policy: responses sampled per distinct training prompt"""
    norm_temperature: float = 0.7
    """normalisation on a policy: sampling temperature (use PPO's)"""
    norm_max_new_tokens: int = 128
    """normalisation on a policy: response length limit (use PPO's)"""


def data_mode(data) -> str:
    """'preference' for prompt/chosen/rejected rows, 'score' for instruction/response/score rows."""
    row = _rows(data)[0]
    if {"prompt", "chosen", "rejected"} <= set(row):
        return "preference"
    if {"response", "score"} <= set(row) and ("instruction" in row or "prompt" in row):
        return "score"
    raise ValueError(f"reward data: found fields {sorted(row)}, expected prompt/chosen/rejected (preference mode) "
                     "or instruction/response/score (score mode)")


def _rows(data) -> list[dict]:
    rows = data.to_list() if hasattr(data, "to_list") else list(data)
    if not rows:
        raise ValueError("reward data: no rows")
    return rows


def _batch_rewards(rm: RewardModel, rows: list[dict], mode: str):
    """Preference mode: (r_chosen, r_rejected) in one forward pass; score mode: (r, None)."""
    if mode == "preference":
        prompts = [r["prompt"] for r in rows]
        r = rm.rewards(**rm.encode(prompts * 2, [r["chosen"] for r in rows] + [r["rejected"] for r in rows]))
        return r[:len(rows)], r[len(rows):]                                               # (B,), (B,)
    prompts = [r.get("instruction", r.get("prompt")) for r in rows]
    return rm.rewards(**rm.encode(prompts, [r["response"] for r in rows])), None


def train_reward_model(rm: RewardModel, train_data, eval_data=None, config: RewardTrainingConfig | None = None,
                       mode: str | None = None, policy=None, policy_tokenizer=None,
                       normalization_prompts: list[str] | None = None) -> dict:
    """Train `rm` in place (Bradley-Terry on preferences, regression on scores: picked from the data), then set its
    normalisation. Returns {"mode", "loss" (per step), "eval" (metrics or None)}.

    Normalisation [N]: with `policy` (the model PPO will start from, usually the SFT model; `policy_tokenizer`
    defaults to the reward model's), on responses sampled from it (`RewardModel.fit_normalization_on_policy`,
    `config.norm_*` settings, seed `config.seed`) for `normalization_prompts` (default: the distinct training
    prompts; pass PPO's prompts when they differ). Without a policy it falls back to the training responses (chosen
    and rejected, or the scored responses): mean 0 / std 1 there, not necessarily on what the policy writes.
    """
    from tqdm.auto import tqdm

    cfg = config or RewardTrainingConfig()
    rows = _rows(train_data)
    mode = mode or data_mode(rows)
    if mode == "score":   # regress on standardised scores: the head needs no bias, the loss is O(1)
        scores = torch.tensor([float(r["score"]) for r in rows])
        rm.target_stats = (scores.mean().item(), max(scores.std().item(), 1e-6))
    params = [p for p in rm.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, len(rows) // cfg.batch_size)
    total = cfg.epochs * steps_per_epoch if cfg.max_steps is None else min(cfg.max_steps, cfg.epochs * steps_per_epoch)
    order = torch.Generator().manual_seed(cfg.seed)
    losses, step = [], 0
    rm.model.train()
    bar = tqdm(total=total, desc=f"reward model ({mode})", disable=not cfg.progress)
    while step < total:
        perm = torch.randperm(len(rows), generator=order).tolist()
        for k in range(steps_per_epoch):
            if step >= total:
                break
            batch = [rows[i] for i in perm[k * cfg.batch_size:(k + 1) * cfg.batch_size]]
            for group in optimizer.param_groups:   # linear warm-up, then linear decay to 0
                group["lr"] = cfg.lr * min((step + 1) / cfg.warmup_steps, (total - step) / max(1, total - cfg.warmup_steps))
            r, r_rejected = _batch_rewards(rm, batch, mode)
            if mode == "preference":
                margin = (torch.tensor([float(b[cfg.margin_column]) for b in batch], device=r.device)
                          if cfg.margin_column else None)
                loss = bradley_terry_loss(r, r_rejected, margin)
            else:
                mu, sigma = rm.target_stats
                loss = regression_loss(r, (torch.tensor([float(b["score"]) for b in batch], device=r.device) - mu)
                                       / sigma)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            losses.append(loss.item())
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    rm.model.eval()
    prompts = [r["prompt"] for r in rows] if mode == "preference" else [r.get("instruction", r.get("prompt"))
                                                                         for r in rows]
    if policy is not None:
        rm.fit_normalization_on_policy(
            policy, policy_tokenizer or rm.tokenizer,
            normalization_prompts if normalization_prompts is not None else list(dict.fromkeys(prompts)),
            samples_per_prompt=cfg.norm_samples_per_prompt, temperature=cfg.norm_temperature,
            max_new_tokens=cfg.norm_max_new_tokens, seed=cfg.seed, progress=cfg.progress)
    elif mode == "preference":
        rm.fit_normalization(prompts * 2, [r["chosen"] for r in rows] + [r["rejected"] for r in rows])
    else:
        rm.fit_normalization(prompts, [r["response"] for r in rows])
    return {"mode": mode, "loss": losses, "eval": evaluate_reward_model(rm, eval_data, mode) if eval_data else None}


@torch.no_grad()
def evaluate_reward_model(rm: RewardModel, data, mode: str | None = None, batch_size: int = 64) -> dict:
    """Pairwise metrics (accuracy, margin, ECE) on preferences, or MSE/correlations on scored answers.

    Uses raw rewards: Bradley-Terry probabilities are defined on them (normalising would rescale the margins).
    """
    rows = _rows(data)
    mode = mode or data_mode(rows)
    was_training = rm.model.training
    rm.model.eval()
    chosen, rejected = [], []
    try:
        for i in range(0, len(rows), batch_size):
            a, b = _batch_rewards(rm, rows[i:i + batch_size], mode)
            chosen.append(a.cpu())
            rejected.append(b.cpu() if b is not None else a.cpu())
    finally:
        rm.model.train(was_training)
    chosen, rejected = torch.cat(chosen), torch.cat(rejected)
    if mode == "preference":
        return pairwise_metrics(chosen, rejected)
    mu, sigma = rm.target_stats or (0.0, 1.0)
    return regression_metrics(chosen * sigma + mu, torch.tensor([float(r["score"]) for r in rows]))
