"""Write a GGUF file (llama.cpp / Ollama) for a Qwen2 or Llama model, then read it back and check it (lesson 06).

GGUF is one file: a header of key/value metadata (the architecture's hyperparameters, the whole tokenizer, the
chat template), then the tensors, each under llama.cpp's name (`blk.3.attn_q.weight`) and in its storage type.
The names and keys follow llama.cpp's `convert_hf_to_gguf.py` and the GGUF spec (ggml/docs/gguf.md); the code is
ours. Two details matter for correctness:

- Llama's q/k rows are permuted. transformers' rotary embedding pairs dimension j with j + hs/2 ("rotate half");
  llama.cpp's Llama kernel pairs neighbours (2j, 2j+1). Reordering each head's rows turns one into the other.
  Qwen2 runs with llama.cpp's NeoX-style rope, which already pairs like transformers: no permutation.
- 1-D tensors (norms, biases) stay float32, as llama.cpp expects; 2-D weights take the chosen type.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch

from .core import (TOLERANCE, ExportResult, ExportVerificationError, _base_of, _check, compare_outputs, folder_size,
                   merged_state_dict, probe_ids, reload, staged_folder)

# transformers name inside `model.layers.{i}.` -> llama.cpp name inside `blk.{i}.`
LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
TOP_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
SUPPORTED = ("qwen2", "llama")
OUT_TYPES = ("f32", "f16", "bf16", "q8_0")
# probe texts whose tokenization must survive the round trip: ASCII, digits, spacing, Chinese, emoji, a chat turn
PROBE_TEXTS = ["Hello world! 123 4567", "  two  spaces\nand\ttabs", "请用一句话解释什么是量子纠缠。", "emoji 🙂 ok"]


def gguf_name(hf_name: str) -> str:
    """llama.cpp's tensor name for a transformers parameter name of a Qwen2/Llama model."""
    module, kind = hf_name.rsplit(".", 1)
    if module in TOP_NAMES:
        return f"{TOP_NAMES[module]}.{kind}"
    match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", module)
    if match is None or match.group(2) not in LAYER_NAMES:
        raise NotImplementedError(f"{hf_name}: no GGUF name for this tensor (supported: {', '.join(SUPPORTED)})")
    return f"blk.{match.group(1)}.{LAYER_NAMES[match.group(2)]}.{kind}"


def permute_for_ggml_rope(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder each head's rows from "rotate half" pairing (j, j + hs/2) to neighbour pairing (2j, 2j+1).

    weight: (n_heads * hs, ...) -- a q/k projection weight (out, in) or bias (out,).
    """
    hs = weight.shape[0] // n_heads
    w = weight.reshape(n_heads, 2, hs // 2, *weight.shape[1:])  # (nh, 2, hs/2, ...): the two halves
    return w.transpose(1, 2).reshape(weight.shape)              # (nh, hs/2, 2, ...): pairs side by side


def _config_values(config) -> dict:
    """The hyperparameters GGUF stores, from a transformers config, with checks for what this writer supports."""
    arch = config.model_type
    if arch not in SUPPORTED:
        raise NotImplementedError(f"GGUF export supports {SUPPORTED}, got model_type {arch!r}")
    rope = dict(getattr(config, "rope_parameters", None) or {})
    rope_theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
    if rope.get("rope_type", "default") != "default":
        raise NotImplementedError(f"rope scaling {rope.get('rope_type')!r} is not supported by this GGUF writer")
    if arch == "llama" and (getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False)):
        raise NotImplementedError("Llama models with attention/MLP biases are not supported by this GGUF writer")
    if arch == "qwen2" and getattr(config, "use_sliding_window", False):
        raise NotImplementedError("Qwen2 with sliding-window attention is not supported by this GGUF writer")
    n_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    return {"arch": arch, "n_layers": config.num_hidden_layers, "hidden": config.hidden_size,
            "ffn": config.intermediate_size, "n_heads": n_heads, "n_kv_heads": config.num_key_value_heads,
            "head_dim": head_dim, "context": config.max_position_embeddings, "rope_theta": float(rope_theta),
            "rms_eps": float(config.rms_norm_eps), "vocab": config.vocab_size,
            "tied": bool(getattr(config, "tie_word_embeddings", False))}


def gguf_tensors(state: dict, hp: dict) -> dict[str, np.ndarray]:
    """float32 numpy arrays under llama.cpp names, q/k permuted for Llama, the tied output matrix left out."""
    out = {}
    for name, tensor in state.items():
        if name == "lm_head.weight" and hp["tied"]:
            continue  # llama.cpp reuses token_embd when output.weight is absent
        if hp["arch"] == "llama" and ".self_attn.q_proj." in name:
            tensor = permute_for_ggml_rope(tensor, hp["n_heads"])
        elif hp["arch"] == "llama" and ".self_attn.k_proj." in name:
            tensor = permute_for_ggml_rope(tensor, hp["n_kv_heads"])
        out[gguf_name(name)] = tensor.detach().to("cpu", torch.float32).contiguous().numpy()
    return out


def _encode(array: np.ndarray, out_type: str):
    """(data, ggml type) for one tensor: 1-D stays f32; q8_0 falls back to f16 where rows don't fill 32-blocks."""
    import gguf

    types = gguf.GGMLQuantizationType
    if array.ndim == 1 or out_type == "f32":
        return array.astype(np.float32), types.F32
    if out_type == "f16" or (out_type == "q8_0" and array.shape[-1] % 32):
        return array.astype(np.float16), types.F16
    qtype = types.BF16 if out_type == "bf16" else types.Q8_0
    return gguf.quants.quantize(array, qtype), qtype


# --------------------------------------------------------------------------------------------- the tokenizer


# The split regexes of the two byte-level BPE families this exporter names, as they appear in the models'
# tokenizer.json (a `Split` before a regex-free `ByteLevel`), keyed by llama.cpp's `tokenizer.ggml.pre` name.
# They differ in one place: Qwen2 splits digits one by one (\p{N}), Llama 3 in runs of up to three (\p{N}{1,3}).
# (Our own table: transformers keeps a similar one, but privately, and it is not in every 5.x release.)
PRE_TOKENIZER_SPLITS = {
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}


def _pre_tokenizer_name(spec: dict) -> str:
    """llama.cpp's name for how this byte-level BPE splits text before merging (`tokenizer.ggml.pre`)."""
    pre = spec.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True) and not parts[0].get("add_prefix_space", False):
        return "gpt-2"  # GPT-2's own split regex
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"  # digits one by one, then GPT-2's split
    if kinds == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True):
        regex = parts[0].get("pattern", {}).get("Regex")
        for name, split in PRE_TOKENIZER_SPLITS.items():
            if regex == split:
                return name
    raise NotImplementedError(f"unknown pre-tokenizer {json.dumps(pre)[:200]}: cannot name it for llama.cpp")


def gguf_vocab(tokenizer, vocab_size: int) -> dict:
    """The tokenizer as GGUF metadata: tokens and their types in id order, merges, special ids, chat template."""
    from gguf import TokenType

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec["model"]
    if model.get("type") != "BPE" or not spec.get("decoder") or spec["decoder"].get("type") != "ByteLevel":
        raise NotImplementedError("GGUF export supports byte-level BPE tokenizers (Qwen2, Llama 3, SmolLM2, GPT-2 "
                                  f"style); this one is {model.get('type')} with decoder {spec.get('decoder')}")
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    if max(by_id) >= vocab_size:
        raise ExportVerificationError(f"token id {max(by_id)} does not fit the model's vocab_size {vocab_size}")
    added = tokenizer.added_tokens_decoder  # id -> AddedToken
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:  # the embedding matrix has rows no token uses (padding to a round size)
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(TokenType.NORMAL if i not in added else
                         TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    ids = {name: getattr(tokenizer, f"{name}_token_id") for name in ("bos", "eos", "pad", "unk")}
    sample = tokenizer("a")["input_ids"]
    template = tokenizer.chat_template
    if isinstance(template, dict):
        template = template.get("default")
    return {"pre": _pre_tokenizer_name(spec), "tokens": tokens, "types": [int(t) for t in types], "merges": merges,
            "ids": {k: v for k, v in ids.items() if v is not None}, "chat_template": template,
            "add_bos": bool(sample) and sample[0] == ids["bos"], "add_eos": bool(sample) and sample[-1] == ids["eos"]}


# --------------------------------------------------------------------------------------------- writing


def write_gguf(path, tensors: dict[str, np.ndarray], hp: dict, vocab: dict, out_type: str, name: str) -> None:
    """Write one GGUF file: metadata (hyperparameters, tokenizer, chat template) then the tensors."""
    import gguf

    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[out_type]
    w = gguf.GGUFWriter(str(path), hp["arch"])
    w.add_name(name)
    w.add_file_type(int(file_type))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(hp["context"])
    w.add_embedding_length(hp["hidden"])
    w.add_block_count(hp["n_layers"])
    w.add_feed_forward_length(hp["ffn"])
    w.add_head_count(hp["n_heads"])
    w.add_head_count_kv(hp["n_kv_heads"])
    w.add_rope_freq_base(hp["rope_theta"])
    w.add_rope_dimension_count(hp["head_dim"])
    if hp["head_dim"] != hp["hidden"] // hp["n_heads"]:
        w.add_key_length(hp["head_dim"])
        w.add_value_length(hp["head_dim"])
    w.add_layer_norm_rms_eps(hp["rms_eps"])
    w.add_vocab_size(hp["vocab"])
    w.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
    w.add_tokenizer_pre(vocab["pre"])
    w.add_token_list(vocab["tokens"])
    w.add_token_types(vocab["types"])
    w.add_token_merges(vocab["merges"])
    adders = {"bos": w.add_bos_token_id, "eos": w.add_eos_token_id, "pad": w.add_pad_token_id,
              "unk": w.add_unk_token_id}
    for key, token_id in vocab["ids"].items():
        adders[key](token_id)
    w.add_add_bos_token(vocab["add_bos"])
    w.add_add_eos_token(vocab["add_eos"])
    if vocab["chat_template"]:
        w.add_chat_template(vocab["chat_template"])
    for tensor_name, array in tensors.items():
        data, qtype = _encode(array, out_type)
        w.add_tensor(tensor_name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# --------------------------------------------------------------------------------------------- reading back


def read_gguf(path) -> tuple[dict, dict]:
    """(metadata, tensors) of a GGUF file: metadata values decoded, tensors as (raw data, ggml type, float32)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    meta = {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}
    tensors = {t.name: (np.asarray(t.data), t.tensor_type, gguf.quants.dequantize(t.data, t.tensor_type))
               for t in reader.tensors}
    return meta, tensors


# Largest accepted max|stored - float32 source| / max|source| per tensor, by storage type.
STORAGE_TOLERANCE = {"F32": 0.0, "F16": 1e-3, "BF16": 8e-3, "Q8_0": 1e-2}


def check_gguf_file(path, tensors: dict[str, np.ndarray], hp: dict, vocab: dict, out_type: str) -> dict:
    """Read the file back with `gguf.GGUFReader`; compare every tensor and every metadata value with the source."""
    meta, stored = read_gguf(path)
    arch = hp["arch"]
    expected_meta = {
        "general.architecture": arch, f"{arch}.block_count": hp["n_layers"],
        f"{arch}.embedding_length": hp["hidden"], f"{arch}.feed_forward_length": hp["ffn"],
        f"{arch}.attention.head_count": hp["n_heads"], f"{arch}.attention.head_count_kv": hp["n_kv_heads"],
        f"{arch}.context_length": hp["context"], "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": vocab["pre"],
        "tokenizer.ggml.tokens": vocab["tokens"], "tokenizer.ggml.token_type": vocab["types"],
        "tokenizer.ggml.merges": vocab["merges"], "tokenizer.ggml.eos_token_id": vocab["ids"]["eos"],
        "tokenizer.ggml.add_bos_token": vocab["add_bos"],
    }
    if vocab["chat_template"]:
        expected_meta["tokenizer.chat_template"] = vocab["chat_template"]
    wrong = [key for key, value in expected_meta.items() if meta.get(key) != value]
    for key, value in ((f"{arch}.rope.freq_base", hp["rope_theta"]),
                       (f"{arch}.attention.layer_norm_rms_epsilon", hp["rms_eps"])):
        if not np.isclose(meta.get(key, np.nan), value, rtol=1e-6):  # stored as float32
            wrong.append(key)
    if wrong:
        raise ExportVerificationError(f"GGUF metadata read back differs for {wrong[:6]}")
    if set(stored) != set(tensors):
        raise ExportVerificationError(f"GGUF tensors differ: missing {sorted(set(tensors) - set(stored))[:4]}, "
                                      f"unexpected {sorted(set(stored) - set(tensors))[:4]}")
    worst = {}
    for name, source in tensors.items():
        raw, qtype, values = stored[name]
        data, expected_type = _encode(source, out_type)
        if qtype != expected_type or values.shape != source.shape or not np.array_equal(raw.view(np.uint8).ravel(),
                                                                                         data.view(np.uint8).ravel()):
            raise ExportVerificationError(f"GGUF tensor {name}: stored {qtype.name} {values.shape} is not what "
                                          f"was written ({expected_type.name} {source.shape})")
        error = float(np.abs(values - source).max() / max(np.abs(source).max(), 1e-12))
        worst[qtype.name] = max(worst.get(qtype.name, 0.0), error)
        if error > STORAGE_TOLERANCE[qtype.name]:
            raise ExportVerificationError(f"GGUF tensor {name}: {qtype.name} values differ from the source by "
                                          f"{error:.3g} of its scale (tolerance {STORAGE_TOLERANCE[qtype.name]})")
    return {"tensors": len(stored), "metadata_keys": len(meta),
            **{f"storage_error_{k.lower()}": v for k, v in worst.items()}}


def check_tokenizer_round_trip(original, reloaded) -> dict:
    """The tokenizer rebuilt from GGUF metadata must encode every probe text and a chat prompt exactly as before.

    The chat template and EOS token are in the file: check_gguf_file compares that metadata, and is the check that
    counts. transformers' GGUF reader does not always carry them onto the tokenizer it rebuilds (5.17 leaves the
    template off and names <|endoftext|> as EOS where the file says <|im_end|>; 5.24 keeps both), so whether the
    reader kept them is reported in the returned checks, not enforced."""
    from lessons_lib.data import chat_prompt

    texts = PROBE_TEXTS + [chat_prompt(original, PROBE_TEXTS[2]) + "answer" + original.eos_token]
    for text in texts:
        a, b = original(text)["input_ids"], reloaded(text)["input_ids"]
        if a != b:
            raise ExportVerificationError(f"tokenizer read back from GGUF encodes {text[:40]!r} as {b[:12]}..., "
                                          f"the original as {a[:12]}...")
    return {f"reader_kept_{what}": getattr(reloaded, what, None) == getattr(original, what)
            for what in ("chat_template", "eos_token")}


def save_gguf(model, tokenizer, out_dir, out_type: str = "f16", name: str | None = None, overwrite: bool = False,
              verify: bool = True, modelfile: bool = True) -> ExportResult:
    """Merge, convert and write `out_dir/model-<out_type>.gguf` (+ an Ollama `Modelfile`); verify; return the result.

    out_type: "f32", "f16" (default), "bf16" or "q8_0" (8-bit blocks of 32 with an fp16 scale).
    Verification: the file is read back with gguf.GGUFReader (every tensor and metadata value compared), then
    transformers loads it (`gguf_file=`): its tokenizer must encode probe texts identically and its logits must
    match `model` within the storage type's tolerance. Any failure raises and leaves nothing on disk.
    """
    if out_type not in OUT_TYPES:
        raise ValueError(f"out_type: found {out_type!r}, expected one of {OUT_TYPES}")
    config = _base_of(model).config
    hp = _config_values(config)
    vocab = gguf_vocab(tokenizer, hp["vocab"])
    tensors = gguf_tensors(merged_state_dict(model), hp)
    file_name = f"model-{out_type}.gguf"
    with staged_folder(out_dir, overwrite) as staging:
        write_gguf(staging / file_name, tensors, hp, vocab, out_type,
                   name or Path(str(getattr(config, "_name_or_path", "") or "model")).name)
        checks = {"out_type": out_type}
        if modelfile:
            from .modelfile import write_modelfile

            write_modelfile(staging / "Modelfile", tokenizer, f"./{file_name}")
        if verify:
            checks.update(check_gguf_file(staging / file_name, tensors, hp, vocab, out_type))
            reloaded, reloaded_tokenizer = reload(staging, gguf_file=file_name)  # transformers reads GGUF too
            checks.update(check_tokenizer_round_trip(tokenizer, reloaded_tokenizer))
            checks.update(compare_outputs(model, reloaded, probe_ids(tokenizer)))
            tolerance = TOLERANCE[{"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16,
                                   "q8_0": "q8_0"}[out_type]]
            _check(checks, tolerance, f"GGUF {out_type} export")
    path = Path(out_dir) / file_name
    return ExportResult("gguf", path, folder_size(path), checks)
