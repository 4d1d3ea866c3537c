"""Merging, safe folder writes, output checks, and the adapter / merged-16-bit exports (lesson 06).

Merging is the one piece of math here: for every LoRA layer, W' = W + (alpha / r) * B @ A, where W is the base
weight -- dequantized first when the base was loaded in 4-bit (NF4), so the merged model carries the weights the
adapter model really computed with. `merged_state_dict` does it once; the 16-bit folder and the GGUF both use it.
"""

from __future__ import annotations

import contextlib
import copy
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

# A short chat the forward checks run; it exercises the chat template's special tokens and plain text.
PROBE_MESSAGES = [{"role": "user", "content": "Name three fruits, one per line."}]


class ExportVerificationError(RuntimeError):
    """An export whose reloaded outputs or tensors differ from the model it was made from (nothing was written)."""


# --------------------------------------------------------------------------------------------- writing safely


@contextlib.contextmanager
def staged_folder(target, overwrite: bool = False):
    """Yield an empty temporary folder next to `target`; on success it replaces `target`, on error it vanishes.

    Refuses a non-empty `target` unless overwrite=True. The old target is removed only after the new one is
    complete, so an exception (or Ctrl-C) at any point leaves either the old folder or nothing -- never a half.
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} is a file; expected a folder path (or a path that does not exist yet)")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(f"{target} is not empty; pass overwrite=True to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        yield staging
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            target.rename(old / target.name)
        try:
            staging.rename(target)
        except BaseException:
            if old is not None:
                (old / target.name).rename(target)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def folder_size(path) -> int:
    """Bytes on disk under `path` (a file or a folder)."""
    path = Path(path)
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# --------------------------------------------------------------------------------------------- merging


def _base_of(model):
    from peft import PeftModel

    return model.get_base_model() if isinstance(model, PeftModel) else model


def merged_model(model, dtype=torch.float32):
    """A plain transformers model (no peft, no bitsandbytes) with the weights `model` computes with, in `dtype`.

    A LoRA model is merged by `lessons_lib.models.merge_lora` (4-bit bases dequantized first); a model without
    adapters is copied, 4-bit layers dequantized. The config is a copy without `quantization_config`: the
    merged weights are plain tensors, and a stale entry would make transformers reload them as 4-bit.
    """
    from peft import PeftModel

    from lessons_lib.models import _plain_state_dict, merge_lora

    if isinstance(model, PeftModel):
        plain = merge_lora(model, dtype=dtype)
    else:
        plain = type(model)(copy.deepcopy(model.config)).to(dtype)
        missing, unexpected = plain.load_state_dict(_plain_state_dict(model, dtype), strict=False)
        if unexpected or [k for k in missing if k not in _tied_keys(plain)]:
            raise ExportVerificationError(f"could not copy {type(model).__name__}: missing {missing[:5]}, "
                                          f"unexpected {unexpected[:5]}")
        plain.tie_weights()
    plain.config = copy.deepcopy(plain.config)
    if hasattr(plain.config, "quantization_config"):
        del plain.config.quantization_config
    plain.config.dtype = dtype
    return plain.eval()


def merged_state_dict(model) -> dict[str, torch.Tensor]:
    """float32 weights `model` computes with, under the plain transformers names (LoRA merged, 4-bit dequantized)."""
    return {k: v.float() for k, v in merged_model(model, torch.float32).state_dict().items()}


def _tied_keys(model) -> set:
    """Parameter names that share storage with another (lm_head.weight tied to the embeddings)."""
    seen, tied = set(), set()
    for name, p in model.named_parameters(remove_duplicate=False):
        (tied.add(name) if p.data_ptr() in seen else seen.add(p.data_ptr()))
    return tied


# --------------------------------------------------------------------------------------------- checking


# Largest accepted max|logit difference| / max|logit|, by the dtype the exported weights are stored in: a
# float32 merge only reorders sums; 16-bit storage rounds every weight (fp16: 11 bits, bf16: 8 bits of mantissa).
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2, "q8_0": 8e-2}


@dataclass
class ExportResult:
    """What an export wrote and what its checks measured."""

    kind: str
    path: Path
    size_bytes: int
    checks: dict

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.checks.items())
        return f"ExportResult({self.kind}: {self.path}, {self.size_bytes / 2**20:.2f} MiB, {shown})"


def probe_ids(tokenizer) -> torch.Tensor:
    """Token ids (1, T) of a short chat prompt plus a few answer words: the input every forward check uses."""
    from lessons_lib.data import chat_prompt

    text = chat_prompt(tokenizer, PROBE_MESSAGES[0]["content"]) + "apple\nbanana"
    return torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])


@torch.no_grad()
def compare_outputs(reference, candidate, input_ids, max_new_tokens: int = 8) -> dict:
    """Compare two models on `input_ids` (1, T) extended by the candidate's greedy continuation.

    Returns max_abs_diff and rel_diff (max_abs_diff / max|reference logit|) over every position, argmax_agreement
    (fraction of positions whose most likely next token agrees) and same_greedy_tokens: whether the reference,
    fed the candidate's greedy tokens, would have picked each of them too -- the same as generating greedily with
    both, but with one forward pass of the (possibly slow, 4-bit) reference instead of one per token.
    """
    _disable_bnb_cpu_repacking(reference)
    modes = [(m, m.training) for m in (reference, candidate)]
    try:
        for m, _ in modes:
            m.eval()
        ids = input_ids.to(_device(candidate))
        full = candidate.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                  do_sample=False, pad_token_id=0).cpu()                      # (1, T + Tr)
        ref = reference(input_ids=full.to(_device(reference))).logits.float().cpu()           # (1, T + Tr, V)
        got = candidate(input_ids=full.to(_device(candidate))).logits.float().cpu()           # (1, T + Tr, V)
    finally:
        for m, was_training in modes:
            m.train(was_training)
    if ref.shape != got.shape:
        raise ExportVerificationError(f"logits shapes differ: {tuple(ref.shape)} vs {tuple(got.shape)}")
    diff = (ref - got).abs().max().item()
    T = input_ids.shape[1]
    continuation = full[0, T:]                                                                 # (Tr,)
    ref_choice = ref[0, T - 1:-1].argmax(-1)                                                   # (Tr,)
    return {"max_abs_diff": diff, "rel_diff": diff / max(ref.abs().max().item(), 1e-12),
            "argmax_agreement": (ref.argmax(-1) == got.argmax(-1)).float().mean().item(),
            "same_greedy_tokens": bool(torch.equal(ref_choice, continuation))}


def _check(checks: dict, tolerance: float, what: str) -> None:
    if not checks["rel_diff"] <= tolerance:
        raise ExportVerificationError(f"{what}: reloaded logits differ from the source model by "
                                      f"{checks['rel_diff']:.3g} of the logit scale (tolerance {tolerance:g}); "
                                      "nothing was written")


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _disable_bnb_cpu_repacking(model) -> None:
    """The checks run a no-grad forward, which makes bitsandbytes 0.50 repack 4-bit CPU weights and breaks
    training afterwards (docs/ENVIRONMENT.md); `fix_bnb_cpu_repack` switches that off, as load_model does."""
    if any(getattr(getattr(m, "weight", None), "quant_state", None) is not None for m in model.modules()):
        from lessons_lib.models import fix_bnb_cpu_repack

        fix_bnb_cpu_repack(model)


def reload(path, gguf_file: str | None = None):
    """Load an export back the way a learner would: `load_model` (float32, not 4-bit); a GGUF goes through
    transformers' GGUF reader. Returns (model, tokenizer)."""
    import json

    from lessons_lib.models import load_model

    path = Path(path)
    source = path / gguf_file if gguf_file else path
    if gguf_file:  # the context length is GGUF metadata (the reader maps the file; no tensor is read)
        from gguf import GGUFReader

        fields = GGUFReader(str(source)).fields
        arch = fields["general.architecture"].contents()
        limit = fields[f"{arch}.context_length"].contents() if f"{arch}.context_length" in fields else 2048
    else:
        config = path / "config.json"
        limit = json.loads(config.read_text()).get("max_position_embeddings", 2048) if config.is_file() else 2048
    model, tokenizer = load_model(str(source), max_seq_length=limit, dtype=torch.float32, load_in_4bit=False)
    return model.eval(), tokenizer


# --------------------------------------------------------------------------------------------- adapter, merged


def save_adapter(model, tokenizer, out_dir, overwrite: bool = False) -> ExportResult:
    """Save only the LoRA weights (+ adapter_config.json) and the tokenizer; checks every saved tensor."""
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file

    if not isinstance(model, PeftModel):
        raise TypeError(f"save_adapter needs a PeftModel (a model with LoRA adapters), got {type(model).__name__}; "
                        "use save_merged for a model without adapters")
    with staged_folder(out_dir, overwrite) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        saved = load_file(staging / "adapter_model.safetensors")
        expected = get_peft_model_state_dict(model)  # exactly what peft means to save
        if set(saved) != set(expected):
            raise ExportVerificationError(f"adapter file tensors {sorted(set(saved) ^ set(expected))[:4]} "
                                          "differ from the model's adapter tensors")
        worst = max((saved[k].float() - expected[k].detach().cpu().float()).abs().max().item() for k in saved)
        if worst != 0.0:
            raise ExportVerificationError(f"adapter tensors changed on the way to disk (max diff {worst:.3g})")
        checks = {"tensors": len(saved), "max_abs_diff": worst}
    return ExportResult("adapter", Path(out_dir), folder_size(out_dir), checks)


def save_merged(model, tokenizer, out_dir, dtype=None, overwrite: bool = False, verify: bool = True) -> ExportResult:
    """Merge LoRA into the base (4-bit bases dequantized) and save a standard 16-bit transformers folder.

    dtype: torch.float16 / torch.bfloat16 / torch.float32; None picks bf16 when the model computes in bf16, else
    fp16. With verify=True the saved folder is reloaded and its logits compared with `model`'s (tolerance by
    dtype, `TOLERANCE`); a failure raises ExportVerificationError and leaves nothing on disk.
    """
    if dtype is None:
        dtype = torch.bfloat16 if _compute_dtype(model) == torch.bfloat16 else torch.float16
    plain = merged_model(model, dtype)
    with staged_folder(out_dir, overwrite) as staging:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        checks = {"dtype": str(dtype).replace("torch.", "")}
        if verify:
            reloaded, _ = reload(staging)
            checks.update(compare_outputs(model, reloaded, probe_ids(tokenizer)))
            _check(checks, TOLERANCE[dtype], f"merged {checks['dtype']} export")
    return ExportResult("merged", Path(out_dir), folder_size(out_dir), checks)


def _compute_dtype(model) -> torch.dtype:
    for module in model.modules():
        compute = getattr(module, "compute_dtype", None)
        if isinstance(compute, torch.dtype):
            return compute
    return next(p.dtype for p in model.parameters() if p.is_floating_point())
