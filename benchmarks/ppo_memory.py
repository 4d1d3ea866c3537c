"""PPO on a 7B model within 24 GiB and a 13B model within 48 GiB: one full iteration, measured (issue 8).

The seed article claims a 7B PPO fine-tune fits a 24 GB card and 13B a 48 GB card. This script runs the whole
iteration the library performs for a user (rollout of 128-token responses with the RolloutEngine, a 4-bit reward
model's scores, policy / reference / value passes, GAE, 4 PPO epochs of minibatch updates) with

- the policy as `load_model(..., load_in_4bit=True)` + `get_peft_model(r=16, q,k,v,o)` would return it: NF4 with
  double quantization on every decoder projection, embeddings and LM head in bf16; the reference = the same model
  with adapters disabled; a value head on its hidden states;
- a reward model as `RewardModel.from_backbone(..., load_in_4bit=True, lora_r=16)` builds it: its own 4-bit backbone
  (the library loads two models; it does not share the policy's), LoRA on every projection, a one-output head;
- random weights, built straight on the GPU and quantized layer by layer (`random_4bit_model`): no 15-26 GB
  checkpoint is written or read, and speed and memory do not depend on the values.

The GPU is capped with `torch.cuda.set_per_process_memory_fraction` at the target size (24 or 48 GiB): going over
is an out-of-memory error, not a number in a table. The rollout engine gets the budget its default rule would pick on
a GPU of that size (min(half the free memory, a quarter of the GPU) for dense layers; the rest stay 4-bit).
Reported: peak `torch.cuda.max_memory_allocated` and `max_memory_reserved` over every iteration (warm-up and CUDA
graph captures included), per phase (rollout, reward, step = scoring + update), what the memory holds, and the time
per iteration (median of the timed iterations; the first is a warm-up).

    python3 benchmarks/ppo_memory.py           # GPU machine (H200), ~3 min: benchmarks/results/ppo_memory.{md,json}
    python benchmarks/ppo_memory.py --quick    # CPU, tiny configs: tests the script (no memory numbers)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import EOS, PAD, REPO, word_tokenizer  # this checkout on sys.path, offline
from ppo_iteration import QKVO, environment

ALL_PROJ = QKVO + ["gate_proj", "up_proj", "down_proj"]
SIZES = {  # name -> (architecture, config, GPU size to fit in, GiB)
    "qwen2-7b": ("qwen2", dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                               num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False, rope_theta=1e6,
                               rms_norm_eps=1e-6, max_position_embeddings=4096), 24),
    "llama2-13b": ("llama", dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                                 num_attention_heads=40, num_key_value_heads=40, vocab_size=32000,
                                 tie_word_embeddings=False, rope_theta=1e4, rms_norm_eps=1e-5,
                                 max_position_embeddings=4096), 48),
}
# RolloutEngine options beyond the default budget rule. Llama-2-13B has no grouped-query attention: its KV cache for
# 64 x 192 tokens is 10 GiB on top of the dense layers' 12 GiB, so at 48 GiB the engine frees both after each
# rollout (keep_weights=False; rebuilt at the next rollout) and the update gets the memory.
ENGINE = {"qwen2-7b": {}, "llama2-13b": {"keep_weights": False}}
TINY = {  # --quick: the same code on CPU
    "qwen2-7b": ("qwen2", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False,
                               max_position_embeddings=512), 24),
    "llama2-13b": ("llama", dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=4, vocab_size=384, tie_word_embeddings=False,
                                 max_position_embeddings=512), 48),
}


# ------------------------------------------------------------------------------------------------ random 4-bit models


def quantize_layers_(model, dtype):
    """Replace every nn.Linear of the decoder layers by a bitsandbytes NF4 Linear4bit (double quantization, compute
    dtype `dtype`), quantizing the existing weight where it lies, layer by layer: what transformers' bitsandbytes
    loader does with the weights it reads (the LM head / score head stay as they are). Marks the model as 4-bit."""
    import bitsandbytes as bnb
    import torch
    from transformers import BitsAndBytesConfig

    for layer in model.model.layers:
        for name, lin in list(layer.named_modules()):
            if type(lin) is not torch.nn.Linear:
                continue
            new = bnb.nn.Linear4bit(lin.in_features, lin.out_features, lin.bias is not None, dtype,
                                    compress_statistics=True, quant_type="nf4", quant_storage=torch.uint8,
                                    device="meta")
            new.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, compress_statistics=True,
                                           quant_type="nf4", quant_storage=torch.uint8, module=new
                                           ).to(lin.weight.device)              # quantized here
            if lin.bias is not None:
                new.bias = torch.nn.Parameter(lin.bias.data, requires_grad=False)
            parent, _, child = name.rpartition(".")
            setattr(layer.get_submodule(parent) if parent else layer, child, new)
            del lin
    model.config.quantization_config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=torch.uint8)
    model.is_loaded_in_4bit = model.is_quantized = True
    return model


def random_4bit_model(arch: str, config: dict, device: str, dtype, classifier: bool = False, seed: int = 0):
    """A random model of `config`, built on `device` in `dtype` and quantized to NF4 layer by layer."""
    import torch
    import transformers

    cfg_cls = transformers.Qwen2Config if arch == "qwen2" else transformers.LlamaConfig
    cfg = cfg_cls(**config, eos_token_id=EOS, pad_token_id=PAD, bos_token_id=None, num_labels=1)
    auto = transformers.AutoModelForSequenceClassification if classifier else transformers.AutoModelForCausalLM
    torch.manual_seed(seed)
    with torch.device(device):
        model = auto.from_config(cfg, dtype=dtype)
    return quantize_layers_(model, dtype)


def build_policy(arch, config, device, dtype):
    """What `load_model(..., load_in_4bit=True)` + `get_peft_model(r=16, q,k,v,o)` return, with random weights."""
    from lessons_lib import get_peft_model
    from lessons_lib.models import _prepare  # load_model's set-up: frozen weights, no upcast, checkpointing, hooks

    import torch

    model = random_4bit_model(arch, config, device, dtype)
    tok = word_tokenizer(config["vocab_size"])
    _prepare(model, tok, 1024, torch.device(device), "auto")
    return get_peft_model(model, r=16, lora_alpha=16, lora_dropout=0.0, target_modules=QKVO, verbose=False), tok


def build_reward_model(arch, config, device, dtype, tok):
    """What `RewardModel.from_backbone(..., load_in_4bit=True, lora_r=16)` builds, with random weights."""
    from peft import LoraConfig, get_peft_model

    from lessons_lib.models import fix_bnb_cpu_repack
    from lessons_lib.reward import RewardModel, init_reward_head

    model = random_4bit_model(arch, config, device, dtype, classifier=True, seed=1)
    fix_bnb_cpu_repack(model)
    for p in model.parameters():
        p.requires_grad_(False)
    init_reward_head(model)
    model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=16, lora_alpha=16, lora_dropout=0.0,
                                             target_modules=ALL_PROJ))
    return RewardModel(model, tok, load_in_4bit=True)


# ------------------------------------------------------------------------------------------------ worker


def worker(args):
    import gc

    import torch

    from lessons_lib import PPOConfig, PPOTrainer

    out: dict = {}
    save = lambda: Path(args.result).write_text(json.dumps(out, indent=1))  # noqa: E731
    device = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    gib = 2**30
    out["_env"] = environment(device)
    arch, config, cap_gib = (TINY if args.quick else SIZES)[args.worker]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    mem = (lambda: torch.cuda.memory_allocated()) if device == "cuda" else (lambda: 0)  # noqa: E731
    t0 = time.perf_counter()
    base = mem()
    policy, tok = build_policy(arch, config, device, dtype)
    after_policy = mem()
    rm = build_reward_model(arch, config, device, dtype, tok)
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    after_rm = mem()
    r = out[args.worker] = {"cap_gib": cap_gib, "setup_s": time.perf_counter() - t0, "batch": args.batch,
                            "policy_gib": (after_policy - base) / gib, "reward_model_gib": (after_rm - after_policy) / gib}
    engine_options = {}
    if device == "cuda":
        total = torch.cuda.get_device_properties(0).total_memory
        cap = cap_gib * gib
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total))
        # the engine's default budget rule, on a GPU of `cap` bytes: min(half the free memory, a quarter of the GPU)
        engine_options["max_extra_memory"] = int(min(0.5 * (cap - torch.cuda.memory_reserved()), 0.25 * cap))
        engine_options.update(ENGINE[args.worker])
        r["engine_budget_gib"] = engine_options["max_extra_memory"] / gib
        torch.cuda.reset_peak_memory_stats()
    mb = min(8, args.batch)
    cfg = PPOConfig(batch_size=args.batch, mini_batch_size=mb, gradient_accumulation_steps=2 if args.batch >= 2 * mb
                    else 1, ppo_epochs=4, learning_rate=1e-5, temperature=0.7, max_new_tokens=args.response_len,
                    missing_eos_penalty=None, forward_batch_size=32, progress=False, rollout_engine=engine_options,
                    **({"fast_rollout": True, "fast_forward": True, "length_bucket": 32} if args.quick else {}))
    trainer = PPOTrainer(cfg, model=policy, tokenizer=tok, reward_model=rm)
    r.update(forward_backend=trainer.forward_backend, config={k: getattr(cfg, k) for k in (
        "batch_size", "mini_batch_size", "gradient_accumulation_steps", "ppo_epochs", "forward_batch_size")})
    save()
    gen = {"max_new_tokens": args.response_len, "min_new_tokens": args.response_len, "temperature": 0.7}
    g = torch.Generator().manual_seed(0)
    rows = []
    for it in range(1 + args.iterations):
        queries = [torch.randint(3, config["vocab_size"], (args.prompt_len,), generator=g) for _ in range(args.batch)]
        row, t = {}, time.perf_counter()
        for phase, call in (("rollout", lambda: trainer.generate(queries, return_prompt=False, generate_kwargs=gen)),
                            ("reward", lambda: trainer.compute_reward(responses=row["_responses"], queries=queries)),
                            ("step", lambda: trainer.step(queries=queries, responses=row["_responses"],
                                                          rewards=row["_rewards"]))):
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            value = call()
            if device == "cuda":
                torch.cuda.synchronize()
                row[f"{phase}_peak_gib"] = torch.cuda.max_memory_allocated() / gib
                row[f"{phase}_reserved_gib"] = torch.cuda.max_memory_reserved() / gib
            row[f"{phase}_s"] = time.perf_counter() - start
            row["_responses" if phase == "rollout" else "_rewards" if phase == "reward" else "_stats"] = value
        row["total_s"] = time.perf_counter() - t
        stats = row.pop("_stats")
        row.pop("_responses"), row.pop("_rewards")
        row.update(scoring_s=stats["time/ppo/forward"], update_s=stats["time/ppo/optimize"],
                   kl=stats["objective/kl"])
        rows.append(row)
        print(f"  {args.worker} iteration {it}{' (warm-up)' if it == 0 else ''}: " + ", ".join(
            f"{k} {v:.3f}" for k, v in row.items()), flush=True)
        r["iterations"] = rows
        save()
    timed = rows[1:]
    r["median"] = {k: statistics.median(x[k] for x in timed) for k in timed[0]}
    if device == "cuda":
        r["peak_gib"] = max(x[k] for x in rows for k in x if k.endswith("_peak_gib"))
        r["reserved_gib"] = max(x[k] for x in rows for k in x if k.endswith("_reserved_gib"))
        state = [t for s in trainer.optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
        trainable = [p for p in trainer._params]
        r["holds_gib"] = {
            "policy (4-bit layers, bf16 embeddings and head)": r["policy_gib"],
            "reward model (4-bit backbone, LoRA, head)": r["reward_model_gib"],
            "trainable LoRA + value head, their gradients and AdamW state": sum(
                t.numel() * t.element_size() for t in trainable + [p.grad for p in trainable if p.grad is not None]
                + state) / gib,
            **({f"rollout engine {k}": v / gib for k, v in trainer._engine.memory().items()
                if k not in ("dense_layers", "layers")} if trainer._engine else {})}
        if trainer._engine:
            m = trainer._engine.memory()
            r["engine_dense_layers"] = f"{m['dense_layers']}/{m['layers']}"
        r["update_graphs"] = None if trainer._graphed is None else trainer._graphed.captures
    save()


# ------------------------------------------------------------------------------------------------ parent


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny configs on CPU (tests the script)")
    p.add_argument("--sizes", default=",".join(SIZES), help=f"comma-separated, from {','.join(SIZES)}")
    p.add_argument("--batch", type=int, default=None, help="rollout batch (default 64; quick: 8)")
    p.add_argument("--iterations", type=int, default=None, help="timed iterations after 1 warm-up (default 2)")
    p.add_argument("--prompt-len", type=int, default=None)
    p.add_argument("--response-len", type=int, default=None)
    p.add_argument("--out", default=None, help="results path without extension")
    p.add_argument("--timeout", type=int, default=300)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    q = args.quick
    args.batch = args.batch or (8 if q else 64)
    args.iterations = args.iterations or (1 if q else 2)
    args.prompt_len = args.prompt_len or (16 if q else 64)
    args.response_len = args.response_len or (8 if q else 128)
    if args.worker:
        return worker(args)
    sizes = args.sizes.split(",")
    if any(s not in SIZES for s in sizes):
        p.error(f"unknown sizes {sizes}; choose from {list(SIZES)}")
    started, results, env = time.time(), {}, {}
    for name in sizes:
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            result = Path(f.name)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--result", str(result), "--batch",
               str(args.batch), "--iterations", str(args.iterations), "--prompt-len", str(args.prompt_len),
               "--response-len", str(args.response_len)] + (["--quick"] if q else [])
        envvars = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        if q:
            envvars.setdefault("TRITON_INTERPRET", "1")
        print(f"[{name}] {SIZES[name][1]['num_hidden_layers']} layers, hidden {SIZES[name][1]['hidden_size']}, "
              f"within {SIZES[name][2]} GiB", flush=True)
        t0 = time.time()
        try:
            proc = subprocess.run(cmd, env=envvars, timeout=args.timeout, stderr=subprocess.PIPE, text=True)
            out = json.loads(result.read_text()) if result.stat().st_size else {}
            if proc.returncode != 0:
                out.setdefault("_error", f"worker exited {proc.returncode}: {proc.stderr[-1500:]}")
        except subprocess.TimeoutExpired:
            out = json.loads(result.read_text()) if result.stat().st_size else {}
            out["_error"] = f"worker timed out after {args.timeout} s"
        result.unlink(missing_ok=True)
        print(f"  [{name} worker: {time.time() - t0:.0f} s]", flush=True)
        results[name] = out.get(name, {})
        if "_error" in out:
            results[name]["error"] = out["_error"]
            print(f"  [{name}] failed: {out['_error'][-800:]}", flush=True)
        env = out.get("_env") or env
    report(args, results, env, time.time() - started)


def report(args, results: dict, env: dict, elapsed: float):
    header = ["| model | fits in | batch | peak allocated GiB | peak reserved GiB | verdict | s / iteration | rollout "
              "s | reward s | scoring s | update s | peak rollout / reward / step GiB |", "|" + "---|" * 12]
    rows, notes = [], []
    for name, r in results.items():
        cap = SIZES[name][2]
        if "median" not in r:
            last = [line for line in str(r.get("error", "no result")).splitlines() if line.strip()][-1]
            rows.append(f"| {name} | {cap} GiB | {args.batch} | failed: {last[:200].replace('|', '/')} |" + " |" * 8)
            continue
        m = r["median"]
        if r.get("peak_gib") is not None:
            peak, reserved = f"{r['peak_gib']:.2f}", f"{r['reserved_gib']:.2f}"
            verdict = "fits" if r["reserved_gib"] <= cap else "over"
            phases = " / ".join(f"{max(x[f'{p}_peak_gib'] for x in r['iterations']):.2f}"
                                for p in ("rollout", "reward", "step"))
        else:
            peak = reserved = phases = ""
            verdict = "(CPU: no memory numbers)"
        rows.append(f"| {name} | {cap} GiB | {r['batch']} | {peak} | {reserved} | {verdict} | {m['total_s']:.2f} | "
                    f"{m['rollout_s']:.2f} | {m['reward_s']:.2f} | {m['scoring_s']:.2f} | {m['update_s']:.2f} | "
                    f"{phases} |")
        if r.get("holds_gib"):
            held = ", ".join(f"{k} {v:.2f}" for k, v in r["holds_gib"].items())
            notes.append(f"- {name}: holds (GiB) {held}; engine {r.get('engine_dense_layers')} layers dense within "
                         f"a budget of {r.get('engine_budget_gib', 0):.2f} GiB"
                         f"{'' if ENGINE.get(name, {}).get('keep_weights', True) else ', freed after each rollout'}; "
                         f"forward {r['forward_backend']}; "
                         f"update graphs captured: {r.get('update_graphs')}; set-up {r['setup_s']:.0f} s; "
                         f"config {r['config']}")
    command = "python3 benchmarks/ppo_memory.py " + " ".join(sys.argv[1:])
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    md = "\n".join([
        "# PPO at 7B within 24 GiB and 13B within 48 GiB" + (" (quick: CPU, tiny configs; tests the script)"
                                                             if args.quick else ""), "",
        f"- command: `{command}`", f"- date: {date}",
        f"- hardware: {env.get('device')} ({env.get('cpu_count')} CPUs); torch {env.get('torch')}, transformers "
        f"{env.get('transformers')}, peft {env.get('peft')}, bitsandbytes {env.get('bitsandbytes')}, triton "
        f"{env.get('triton')}",
        f"- one iteration: rollout of {args.batch} prompts x {args.prompt_len} tokens -> {args.response_len} new tokens "
        "(RolloutEngine), 4-bit reward model, policy / reference / value passes, GAE, 4 PPO epochs (minibatch 8, 2 "
        "accumulated per optimizer step). Policy: NF4 + LoRA r=16 q,k,v,o; reference: adapters disabled; value head; "
        "reward model: its own NF4 backbone + LoRA r=16 + head. Random weights built on the GPU. The process is "
        "capped at the target size (set_per_process_memory_fraction): exceeding it is an out-of-memory error. "
        f"1 warm-up iteration + {args.iterations} timed (medians). Peaks over all iterations, captures included.",
        "", *header, *rows, "", *notes, "", f"Whole script: {elapsed:.0f} s.", ""])
    print("\n" + md)
    out = Path(args.out or REPO / "benchmarks" / "results" / ("ppo_memory-quick" if args.quick else "ppo_memory"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(md)
    out.with_suffix(".json").write_text(json.dumps({"command": command, "date": date, "env": env, "config": {
        "batch": args.batch, "prompt_len": args.prompt_len, "response_len": args.response_len,
        "iterations": args.iterations, "quick": args.quick}, "results": results, "elapsed_s": elapsed}, indent=1))
    print(f"wrote {out.with_suffix('.md')} and .json")


if __name__ == "__main__":
    main()
