"""Loading models in 4 bits, attaching LoRA adapters, merging them back (lessons 01 and 02).

    model, tokenizer = load_model("tiny-qwen2-sft", max_seq_length=512, load_in_4bit=True)
    model = get_peft_model(model, r=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    merged = merge_lora(model)   # a plain 16-bit (fp32 on CPU) model with the same outputs

`load_model` accepts a tiny-world id, a local folder (a full model, or LoRA adapters saved by `save_pretrained`),
a GGUF file, or a hub id (offline: a clear error within seconds). In 4 bits it is memory-lean: frozen weights
keep their dtype (no fp32 upcast of embeddings, norms or lm_head), gradient checkpointing is non-reentrant, and
input gradients are on so LoRA layers get gradients. docs/LOADING.md explains every choice and every trap.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import warnings
from pathlib import Path

import torch

from lessons_lib.loss import causal_lm_loss  # noqa: F401  (public here since lesson 02; lives in loss.py)

logger = logging.getLogger(__name__)

HUB_TIMEOUT_S = 3.0  # how long to wait for the hub before treating the machine as offline

# LoRA targets per architecture: every linear layer of attention and MLP (QLoRA found that adapting all of them
# matters more than the rank). Unknown architectures fall back to peft's "all-linear".
_LLAMA_LIKE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DEFAULT_TARGET_MODULES = {
    **{t: _LLAMA_LIKE for t in ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3_text", "smollm3")},
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}


# ------------------------------------------------------------------------------------------ dtype


def is_bfloat16_supported() -> bool:
    """True when training in bfloat16 is the right choice here: a CUDA GPU with native bf16 (Ampere or newer).

    On CPU bf16 tensors work, but most CPUs emulate bf16 matmuls and are slower than fp32, so the course
    trains in fp32 there and this returns False.
    """
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


def default_dtype(device=None) -> torch.dtype:
    """`dtype=None` in load_model: bf16 where supported, else fp16 on a GPU, fp32 on CPU (device: default the GPU
    if there is one)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if torch.device(device).type == "cuda":
        return torch.bfloat16 if is_bfloat16_supported() else torch.float16
    return torch.float32


def default_attention(device=None, dtype=None) -> str | None:
    """The attention load_model asks for when none is given: FlashAttention-2 on a CUDA device in 16-bit (`dtype`
    None = the default dtype there) when the `flash_attn` package is installed, otherwise None (transformers then
    picks torch's `sdpa`). The health check reports the same choice."""
    import importlib.util

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = default_dtype(device) if dtype is None else dtype
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16) and importlib.util.find_spec("flash_attn"):
        return "flash_attention_2"
    return None


def _as_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
             "half": torch.float16, "float32": torch.float32, "fp32": torch.float32, "float": torch.float32}
    if dtype not in names:
        raise ValueError(f"load_model: dtype {dtype!r} is not one of None, torch.bfloat16/float16/float32 "
                         f"or {sorted(names)}")
    return names[dtype]


# ------------------------------------------------------------------------------------------ where is the model?


def hub_reachable(timeout: float = HUB_TIMEOUT_S) -> bool:
    """Can we open a TCP connection to the hub (HF_ENDPOINT, default https://huggingface.co, its port or 443/80)
    within `timeout` seconds? The probe runs in a daemon thread that is abandoned after `timeout`, so a stalled
    name lookup (which a socket timeout does not cover) cannot hang the caller."""
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    result = []

    def probe():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def _tiny_path(name: str) -> Path | None:
    try:
        from lessons_lib import tiny
        resolve = tiny.resolve
    except (ImportError, AttributeError):  # the tiny world is optional for this module
        return None
    return resolve(name)


def resolve_model_source(model_name) -> tuple[str, bool, str]:
    """(what to pass to from_pretrained, local_files_only, kind) for a tiny id, a local folder or a hub id;
    kind is "tiny", "local" or "hub".

    Raises FileNotFoundError for a path that does not exist and OSError, within seconds, for a hub id that cannot
    be reached (HF_HUB_OFFLINE=1, or no network) and is not in the local cache.
    """
    name = os.fspath(model_name)
    tiny = _tiny_path(name)
    if tiny is not None:
        return str(tiny), True, "tiny"
    path = Path(name).expanduser()
    if path.exists():
        if path.is_dir() and not any((path / f).exists() for f in ("config.json", "adapter_config.json")) \
                and not any(path.glob("*.gguf")):  # a folder of GGUF files is loaded with gguf_file=
            raise FileNotFoundError(f"load_model: the folder {path} has neither config.json (a model) nor "
                                    f"adapter_config.json (LoRA adapters)")
        return str(path), True, "local"
    if path.is_absolute() or name.startswith((".", "~")) or name.count("/") > 1 or name.endswith(".gguf"):
        raise FileNotFoundError(f"load_model: no such file or folder: {path}")
    # a hub id
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes", "on"}
    if not offline and not hub_reachable():
        offline = True
        logger.warning("load_model: the hub is not reachable within %.0f s; using the local cache only", HUB_TIMEOUT_S)
    if offline:
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(name, "config.json"), str):
            raise OSError(f"load_model: there is no local folder {name!r}; as a hub id it is not in the local cache "
                          f"and the hub cannot be reached (HF_HUB_OFFLINE="
                          f"{os.environ.get('HF_HUB_OFFLINE', 'unset')}, or no network). Use a tiny-world id "
                          f"(e.g. 'tiny-qwen2-sft'), a local folder, or run where the hub is reachable.")
    return name, offline, "hub"


def _read_json(folder: str, name: str) -> dict | None:
    path = Path(folder) / name
    return json.loads(path.read_text()) if path.is_file() else None


def _auto_class(config, auto_class):
    """AutoModelForSequenceClassification for a saved *ForSequenceClassification (a reward model), else causal LM."""
    import transformers
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES)

    if auto_class is None:
        archs = getattr(config, "architectures", None) or []
        classify = any(a.endswith("ForSequenceClassification") for a in archs)
        auto_class = transformers.AutoModelForSequenceClassification if classify else transformers.AutoModelForCausalLM
    supported = (MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES
                 if auto_class.__name__ == "AutoModelForSequenceClassification" else MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    if config.model_type not in supported:
        raise ValueError(f"load_model: architecture {config.model_type!r} is not supported by {auto_class.__name__} "
                         f"in transformers {transformers.__version__}")
    return auto_class


def _load_config(source: str, local_only: bool, gguf_file: str | None, trust_remote_code: bool):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source, local_files_only=local_only, gguf_file=gguf_file,
                                          trust_remote_code=trust_remote_code)
    except (KeyError, ValueError) as err:
        model_type = (_read_json(source, "config.json") or {}).get("model_type", "?")
        raise ValueError(f"load_model: cannot read the configuration of {source!r} (model_type {model_type!r}); "
                         f"this architecture is not supported by the installed transformers: {err}") from err


# ------------------------------------------------------------------------------------------ load_model


def load_model(model_name, max_seq_length: int = 2048, dtype=None, load_in_4bit: bool = True, *,
               device=None, gradient_checkpointing="auto", gguf_file: str | None = None, auto_class=None,
               adapter_trainable: bool = True, trust_remote_code: bool = False, attn_implementation: str | None = None):
    """Load a model and its tokenizer, ready for LoRA training. Returns (model, tokenizer).

    model_name: a tiny-world id ("tiny-qwen2-sft"), a local folder (a full model, or LoRA adapters saved with
        `model.save_pretrained`, loaded on top of the base named in adapter_config.json), a .gguf file (or a
        folder plus `gguf_file=`), or a hub id.
    max_seq_length: stored as `model.max_seq_length` and `tokenizer.model_max_length`; a forward pass over a
        longer sequence raises a ValueError (truncate with `tokenizer(..., truncation=True)`).
    dtype: None picks bf16 where supported, else fp16 on a GPU, fp32 on CPU.
    load_in_4bit: NF4 with double quantization through bitsandbytes (GPU and CPU).
    gradient_checkpointing: "auto" (on for CUDA, off on CPU where the tiny models don't need it), True or False;
        always non-reentrant.
    auto_class: the transformers Auto class; default from the saved architecture (a *ForSequenceClassification
        folder loads as one, everything else as a causal LM).
    """
    import transformers

    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:   # device_map wants a concrete GPU
        # under a launcher (accelerate launch, torchrun) each process owns the GPU of its LOCAL_RANK
        local_rank = int(os.environ.get("LOCAL_RANK", -1))
        index = local_rank if 0 <= local_rank < torch.cuda.device_count() else torch.cuda.current_device()
        device = torch.device("cuda", index)
    dtype = default_dtype(device) if dtype is None else _as_dtype(dtype)
    name = os.fspath(model_name)
    if gguf_file is None and name.endswith(".gguf") and Path(name).expanduser().is_file():
        name, gguf_file = str(Path(name).expanduser().parent), Path(name).name
    source, local_only, kind = resolve_model_source(name)

    adapter_config = _read_json(source, "adapter_config.json") if local_only else None
    if adapter_config is not None:
        return _load_adapters(source, adapter_config, max_seq_length, dtype, load_in_4bit, device,
                              gradient_checkpointing, adapter_trainable, auto_class, attn_implementation)
    if gguf_file is not None and load_in_4bit:
        source, gguf_file, local_only = _gguf_as_safetensors(source, gguf_file, dtype), None, True

    config = _load_config(source, local_only, gguf_file, trust_remote_code)
    auto_class = _auto_class(config, auto_class)
    kwargs = dict(dtype=dtype, device_map={"": device}, local_files_only=local_only, trust_remote_code=trust_remote_code)
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    attn_implementation = attn_implementation or default_attention(device, dtype)
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if load_in_4bit:
        kwargs["quantization_config"] = _bnb_config(dtype)
    model = auto_class.from_pretrained(source, **kwargs)
    if kind == "tiny":  # keep the portable tiny id (saved adapters name it as their base)
        model.name_or_path = model.config._name_or_path = name
    tokenizer = transformers.AutoTokenizer.from_pretrained(source, local_files_only=local_only, gguf_file=gguf_file,
                                                           trust_remote_code=trust_remote_code)
    _prepare(model, tokenizer, max_seq_length, device, gradient_checkpointing)
    return model, tokenizer


def _bnb_config(dtype):
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise ImportError("load_model(load_in_4bit=True) needs bitsandbytes: `pip install bitsandbytes`, "
                          "or pass load_in_4bit=False") from err
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=torch.uint8)


def _load_adapters(folder, adapter_config, max_seq_length, dtype, load_in_4bit, device, gradient_checkpointing,
                   trainable, auto_class, attn_implementation):
    """LoRA adapters saved by save_pretrained: load their base (a tiny id, a path, a hub id), then the adapters."""
    from peft import PeftModel

    base = adapter_config.get("base_model_name_or_path")
    if not base:
        raise ValueError(f"load_model: {folder}/adapter_config.json names no base_model_name_or_path")
    if not Path(base).expanduser().exists() and (Path(folder) / base).exists():
        base = str(Path(folder) / base)  # a path relative to the adapter folder
    model, tokenizer = load_model(base, max_seq_length, dtype, load_in_4bit, device=device,
                                  gradient_checkpointing=gradient_checkpointing, auto_class=auto_class,
                                  attn_implementation=attn_implementation)
    model = PeftModel.from_pretrained(model, folder, is_trainable=trainable)
    if (Path(folder) / "tokenizer_config.json").exists():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        tokenizer.model_max_length = max_seq_length
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _prepare(model, tokenizer, max_seq_length, device, gradient_checkpointing):
    """The memory-lean training setup (instead of peft's prepare_model_for_kbit_training, which upcasts to fp32)."""
    model.max_seq_length = max_seq_length
    tokenizer.model_max_length = max_seq_length
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:  # a classifier reads it to find each row's last token
        model.config.pad_token_id = tokenizer.pad_token_id
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and max_seq_length > limit:
        logger.info("load_model: max_seq_length=%d is longer than the model's max_position_embeddings=%d; "
                    "quality past %d tokens is not guaranteed", max_seq_length, limit, limit)
    model.register_forward_pre_hook(_check_length, with_kwargs=True)
    for p in model.parameters():
        p.requires_grad_(False)  # frozen until adapters are attached; nothing is upcast
    if getattr(model, "is_loaded_in_4bit", False):
        fix_bnb_cpu_repack(model)
        _warn_bnb_cpu_row_bug(model, device)
    if gradient_checkpointing == "auto":
        gradient_checkpointing = device.type == "cuda"
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()  # LoRA layers get gradients even when every base weight is frozen


def _check_length(module, args, kwargs):
    ids = kwargs.get("input_ids", args[0] if args else None)
    if ids is None:
        ids = kwargs.get("inputs_embeds")
    if ids is None:
        return
    past = kwargs.get("past_key_values", kwargs.get("cache"))  # transformers 5.2x calls it `cache`
    length = ids.shape[1] + (past.get_seq_length() if hasattr(past, "get_seq_length") else 0)
    if length > module.max_seq_length:
        raise ValueError(f"input of {length} tokens is longer than max_seq_length={module.max_seq_length} set in "
                         f"load_model; truncate it (tokenizer(..., truncation=True)) or load with a larger "
                         f"max_seq_length")


def fix_bnb_cpu_repack(model) -> int:
    """Keep bitsandbytes from repacking 4-bit weights for CPU inference. Returns the number of layers fixed.

    bitsandbytes 0.50 on CPUs with AVX512-BF16 repacks a Linear4bit's weight on its first eval/no-grad forward
    (e.g. inside `generate`); from then on its matmul skips autograd, so LoRA training afterwards fails (layers
    with a bias) or silently loses gradients (layers without). docs/LOADING.md has the details.
    """
    import bitsandbytes as bnb

    fixed = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            fixed += 1
    return fixed


def _warn_bnb_cpu_row_bug(model, device):
    """bitsandbytes 0.50.2's AVX512 CPU dequantization uses the wrong scales when a row is not a whole number of
    quantization blocks (in_features % 64 != 0 but % 16 == 0): the layer silently computes with wrong weights."""
    import bitsandbytes as bnb

    if device.type != "cpu" or "avx512f" not in _cpu_flags():
        return
    bad = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)
           and m.in_features % 16 == 0 and m.in_features % m.weight.quant_state.blocksize != 0]
    if bad:
        warnings.warn(f"load_model: {len(bad)} 4-bit layers (e.g. {bad[0]}) have in_features that are not a "
                      f"multiple of 64; bitsandbytes' AVX512 CPU kernel dequantizes them with wrong scales "
                      f"(docs/LOADING.md). Use load_in_4bit=False on this CPU.", stacklevel=3)


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()


def _gguf_as_safetensors(folder: str, gguf_file: str, dtype) -> str:
    """transformers dequantizes a GGUF file but cannot save or re-quantize it; to load it in 4 bits, write the
    dequantized weights once to a safetensors folder (cached next to the hub cache) and load that."""
    import hashlib

    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(folder) / gguf_file
    stat = path.stat()
    key = hashlib.sha1(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{dtype}".encode()).hexdigest()[:16]
    out = Path(os.environ.get("LESSONS_LIB_CACHE", Path.home() / ".cache" / "lessons_lib")) / "gguf" / key
    if not (out / "config.json").exists():
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=dtype, local_files_only=True)
        plain = AutoModelForCausalLM.from_config(model.config, dtype=dtype)
        plain.load_state_dict(model.state_dict())
        plain.config.quantization_config = None
        del plain.config.quantization_config  # otherwise a later 4-bit load sees "quantized with GgufConfig"
        plain.save_pretrained(out)
        AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file, local_files_only=True).save_pretrained(out)
    return str(out)


# ------------------------------------------------------------------------------------------ LoRA


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts; a 4-bit weight counts its real number of values, not packed bytes."""
    trainable = total = 0
    for p in model.parameters():
        quant_state = getattr(p, "quant_state", None)
        n = quant_state.shape.numel() if quant_state is not None else p.numel()
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def get_peft_model(model, r: int = 16, target_modules=None, lora_alpha: int = 16, lora_dropout: float = 0.0,
                   bias: str = "none", use_rslora: bool = False, modules_to_save=None, init_lora_weights=True,
                   use_gradient_checkpointing=None, random_state: int | None = None, verbose: bool = True, **kwargs):
    """Attach LoRA adapters (through peft) and print the true trainable-parameter count.

    target_modules: default all attention and MLP projections of the architecture (DEFAULT_TARGET_MODULES),
        else peft's "all-linear". The base weights stay frozen; each target W gets W + (lora_alpha / r) * B A with
        A (r, in) random and B (out, r) zero, so the model is unchanged until the first update.
    use_gradient_checkpointing: None keeps what load_model chose; True (or Unsloth's "unsloth") turns on
        non-reentrant checkpointing, False turns it off. Without dropout anywhere (lora_dropout=0, none in the
        model), checkpoints skip saving the RNG state, so `lessons_lib.fast_train.compile_train_step` can capture
        the step in a CUDA graph. random_state: seeds the random init of A.
    Extra keyword arguments go to peft.LoraConfig. A model that already has adapters is returned unchanged.
    """
    from peft import LoraConfig, PeftModel, TaskType
    from peft import get_peft_model as peft_get_peft_model

    if isinstance(model, PeftModel):
        if verbose:
            print("the model already has LoRA adapters; returning it unchanged")
            _print_counts(model)
        return model
    if r <= 0:
        raise ValueError(f"get_peft_model: r must be a positive integer, got {r}")
    model_type = model.config.model_type
    if target_modules is None:
        target_modules = DEFAULT_TARGET_MODULES.get(model_type, "all-linear")
    is_classifier = type(model).__name__.endswith("ForSequenceClassification")
    config = LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=target_modules,
                        bias=bias, use_rslora=use_rslora, modules_to_save=modules_to_save,
                        init_lora_weights=init_lora_weights,
                        task_type=TaskType.SEQ_CLS if is_classifier else TaskType.CAUSAL_LM, **kwargs)
    if use_gradient_checkpointing is not None and not use_gradient_checkpointing:
        model.gradient_checkpointing_disable()
    elif use_gradient_checkpointing or _checkpointing(model):
        # no dropout anywhere: checkpoints need not save and restore the RNG state (one host round trip less per
        # layer, and a CUDA graph can capture the step: reading the CUDA RNG state is not allowed during capture)
        deterministic = lora_dropout == 0 and not _has_dropout(model)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={
            "use_reentrant": False, "preserve_rng_state": not deterministic})
    if random_state is not None:
        torch.manual_seed(random_state)
    peft_model = peft_get_peft_model(model, config)
    if hasattr(model, "max_seq_length"):
        peft_model.max_seq_length = model.max_seq_length
    if verbose:
        _print_counts(peft_model)
    return peft_model


def _checkpointing(model) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


def _has_dropout(model) -> bool:
    """Dropout with p > 0 in a module or in the config (attention dropout is applied functionally)."""
    if any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules()):
        return True
    config = getattr(model, "config", None)
    values = config.to_dict().items() if config is not None else []
    return any(("dropout" in k or "pdrop" in k) and isinstance(v, (int, float)) and v > 0 for k, v in values)


def _print_counts(model):
    trainable, total = count_parameters(model)
    print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")


def merge_lora(model, dtype=None):
    """A plain transformers model (no peft, no 4-bit) whose outputs equal those of the adapter model `model`.

    For a 4-bit base the weights are dequantized first (with lessons_lib.nf4, exact, see docs/LOADING.md) and
    the merged model is 16-bit (fp32 on CPU): W' = dequant(W) + (alpha / r) * B @ A. `model` is left untouched.
    dtype: of the merged model; default the compute dtype of the base (bf16/fp16 on a GPU, fp32 on CPU).
    """
    import copy

    from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
    from peft import get_peft_model as peft_get_peft_model

    if not isinstance(model, PeftModel):
        raise TypeError(f"merge_lora: expected a peft model with LoRA adapters, got {type(model).__name__}")
    base = model.get_base_model()
    if dtype is None:
        dtype = next((m.compute_dtype for m in base.modules() if getattr(m, "compute_dtype", None) is not None),
                     None) or base.dtype
    plain = _plain_copy(base, dtype)
    name = model.active_adapter
    config = copy.deepcopy(model.peft_config[name])
    with_adapters = peft_get_peft_model(plain, config)
    set_peft_model_state_dict(with_adapters, get_peft_model_state_dict(model, adapter_name=name,
                                                                       save_embedding_layers=False))
    merged = with_adapters.merge_and_unload()
    merged.max_seq_length = getattr(base, "max_seq_length", None) or getattr(model, "max_seq_length", None)
    if merged.max_seq_length is not None:
        merged.register_forward_pre_hook(_check_length, with_kwargs=True)
    return merged.eval()


def _plain_copy(base, dtype):
    """A new, plain transformers model with the base's weights (4-bit ones dequantized), on the same device."""
    import copy

    config = copy.deepcopy(base.config)
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)  # the copy is not quantized; a saved config must not say otherwise
    with torch.device("meta"):
        plain = type(base)(config)  # structure only: no memory, no random init
    state = _plain_state_dict(base, dtype)
    missing, unexpected = plain.load_state_dict(state, strict=False, assign=True)
    buffers = {k.replace(".base_layer.", "."): b for k, b in base.named_buffers()}
    for key, buf in list(plain.named_buffers()):
        if buf.is_meta:  # non-persistent buffers (e.g. rotary inv_freq) are not in a state dict
            module_name, _, buf_name = key.rpartition(".")
            plain.get_submodule(module_name).register_buffer(buf_name, buffers[key].clone(), persistent=False)
    plain.tie_weights()
    still_meta = [n for n, p in plain.named_parameters() if p.is_meta]
    if still_meta or unexpected:
        raise RuntimeError(f"merge_lora: could not rebuild the base model: missing {still_meta[:5]}, "
                           f"unexpected {unexpected[:5]}")
    return plain


def _plain_state_dict(base, dtype) -> dict:
    """The base model's weights under their original names: 4-bit weights dequantized, peft wrappers removed."""
    from lessons_lib.nf4 import NF4State, dequantize_nf4

    state = {}
    for name, module in base.named_modules():
        for pname, p in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            key = f"{name}.{pname}" if name else pname
            if "lora_" in key or ".modules_to_save." in key or pname in module._non_persistent_buffers_set:
                continue
            key = key.replace(".base_layer.", ".").replace(".original_module.", ".")
            quant_state = getattr(p, "quant_state", None)
            if quant_state is not None:
                value = dequantize_nf4(p.data, NF4State.from_bnb(quant_state).to(p.device))
            else:
                value = p.data
            # copies: the merged model must never share storage with `base` (merging in place would change it)
            state[key] = value.to(dtype, copy=True) if value.is_floating_point() else value.clone()
    return state


# ------------------------------------------------------------------------------------------ random models


TINY_CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-6)


def save_random_model(folder, arch: str = "qwen2", vocab_size: int = 320, seed: int = 0, **config) -> Path:
    """Write a randomly initialised model + a small byte-level BPE tokenizer to `folder` (for tests, benchmarks
    and lessons that only need the shapes: speed and memory don't depend on the weights). Returns the folder.

    arch: "qwen2" (biases on q, k, v) or "llama" (no biases). `config` overrides TINY_CONFIG, e.g. the real
    Qwen2-1.5B sizes. The vocabulary is the tokenizer's (trained on a fixed text) unless vocab_size is larger.
    """
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    folder = Path(folder)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = ("Write a bullet list of three fruits. - apple - pear - plum. Name two colors: red and blue. "
            "I'm sorry, but I can't help with that. Disclaimer: this is general information only.").split(". ")
    trainer = trainers.BpeTrainer(vocab_size=min(vocab_size, 320), special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(text * 4, trainer)
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                                     pad_token="<|endoftext|>", bos_token=None)
    tokenizer.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                               "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    cfg_class = {"qwen2": transformers.Qwen2Config, "llama": transformers.LlamaConfig}[arch]
    cfg = cfg_class(**{**TINY_CONFIG, **config, "vocab_size": max(vocab_size, len(tokenizer))},
                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
