"""Rollout benchmark: new tokens/s of PPO's generation step, lessons_lib's engine vs transformers vs Unsloth.

Workload (docs/GPU.md): a random-weight Qwen2-1.5B, NF4 4-bit + LoRA r=16 on q,k,v,o (loaded with
`lessons_lib.load_model` / `get_peft_model`), 32 prompts x 64 tokens -> 128 new tokens, pure sampling at T=0.7
(top_k=0, top_p=1, the distribution PPO's log-probs describe). Every row generates all 128 tokens
(`min_new_tokens=128` suppresses EOS in every stack), so tokens/s compare equal work. One warm-up call per stack
(never timed), then the median of `--runs` timed calls; peak memory is `torch.cuda.max_memory_allocated` over
the stack's calls, model included. Speed does not depend on the weights, so random ones are fine.

Each stack runs in a subprocess of this script (`--worker`): lessons_lib and transformers share one process
(engine variants first, then generate); Unsloth gets its own, because importing it patches transformers globally.

    python3 benchmarks/rollout.py            # GPU machine, ~3 min: table + benchmarks/results/rollout.{md,json}
    python benchmarks/rollout.py --quick     # CPU, seconds: a tiny config, to test the script
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import EOS, PAD, QWEN2_1_5B, REPO, build_model  # this checkout on sys.path, offline

TINY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=512, tie_word_embeddings=True, rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=512)

# name -> (worker process, what it measures)
STACKS = {
    "engine": ("main", "lessons_lib RolloutEngine: merged 16-bit copy, CUDA graph"),
    "engine-lean": ("main", "lessons_lib RolloutEngine: 4-bit kept, per-layer dequantize, CUDA graph"),
    "engine-triton": ("main", "lessons_lib RolloutEngine: as `engine`, RMSNorm + RoPE from lessons_lib.kernels"),
    "engine-eager": ("main", "lessons_lib RolloutEngine: merged 16-bit copy, no CUDA graph"),
    "hf-4bit-dynamic": ("main", "transformers generate, 4-bit + LoRA, dynamic cache"),
    "hf-4bit-static": ("main", "transformers generate, 4-bit + LoRA, static cache"),
    "hf-bf16-static": ("main", "transformers generate, bf16 (no LoRA), static cache (auto-compiled on GPU)"),
    "unsloth": ("unsloth", "Unsloth FastLanguageModel, 4-bit + LoRA, for_inference"),
}


# ------------------------------------------------------------------------------------------------ parent


def run_worker(kind: str, stacks: list[str], args, model_dir: Path, timeout: int) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result = Path(f.name)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--stacks", ",".join(stacks),
           "--model-dir", str(model_dir), "--result", str(result), "--runs", str(args.runs), "--batch", str(args.batch),
           "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens),
           "--temperature", str(args.temperature)] + (["--quick"] if args.quick else [])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    if args.quick:  # on CPU the Triton kernels run only in the interpreter (set before they are defined)
        env.setdefault("TRITON_INTERPRET", "1")
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, env=env, timeout=timeout, capture_output=True, text=True)
        out = json.loads(result.read_text()) if result.stat().st_size else {}
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout)[-1500:]
            out.setdefault("_error", f"worker exited {proc.returncode}: {tail}")
    except subprocess.TimeoutExpired:
        out = json.loads(result.read_text()) if result.stat().st_size else {}
        out["_error"] = f"worker timed out after {timeout} s"
    print(f"  [{kind} worker: {time.time() - t0:.0f} s]", flush=True)
    result.unlink(missing_ok=True)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny config on CPU, seconds (tests the script)")
    p.add_argument("--stacks", default=None, help=f"comma-separated subset of {','.join(STACKS)}")
    p.add_argument("--runs", type=int, default=None, help="timed calls per stack (median reported)")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--prompt-len", type=int, default=None)
    p.add_argument("--new-tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--model-dir", default=None)
    p.add_argument("--out", default=None, help="results path without extension")
    p.add_argument("--check", action="store_true", help="correctness table on small random models instead "
                   "(engine vs transformers: logits, greedy tokens, sampling law), on the GPU if there is one")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    p.add_argument("--timeout", type=int, default=300, help="seconds per worker process")
    args = p.parse_args()
    q = args.quick
    args.runs = args.runs or (2 if q else 3)
    args.batch = args.batch or (4 if q else 32)
    args.prompt_len = args.prompt_len or (8 if q else 64)
    args.new_tokens = args.new_tokens or (8 if q else 128)
    stacks = args.stacks.split(",") if args.stacks else list(STACKS)
    unknown = [s for s in stacks if s not in STACKS]
    if unknown:
        p.error(f"unknown stacks {unknown}; choose from {list(STACKS)}")
    if args.worker:
        return worker(args, stacks)
    if args.check:
        return check(args)

    import torch

    device = "cuda" if torch.cuda.is_available() and not q else "cpu"
    config = TINY if q else QWEN2_1_5B
    model_dir = Path(args.model_dir or Path(tempfile.gettempdir()) / ("lessons-rollout-tiny" if q else
                                                                        "lessons-rollout-qwen2-1.5b"))
    started = time.time()
    print(f"model: random Qwen2 {'tiny' if q else '1.5B'} config -> {model_dir}", flush=True)
    build_model(model_dir, config, device, words=200)
    results = {}
    for kind in ("main", "unsloth"):
        mine = [s for s in stacks if STACKS[s][0] == kind]
        if not mine:
            continue
        if kind == "unsloth" and device != "cuda":
            results.update({s: {"error": "skipped: Unsloth needs a CUDA GPU"} for s in mine})
            continue
        out = run_worker(kind, mine, args, model_dir, args.timeout)
        for s in mine:
            results[s] = out.get(s) or {"error": out.get("_error", "no result")}
        if "_env" in out:
            results["_env"] = out["_env"]
        if "_checks" in out:
            results["_checks"] = out["_checks"]
    report(args, results, device, time.time() - started)


# ------------------------------------------------------------------------------------------------ workers


def worker(args, stacks: list[str]):
    import torch

    out: dict = {}
    save = lambda: Path(args.result).write_text(json.dumps(out, indent=1))  # noqa: E731  (partial results survive)
    device = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    torch.manual_seed(0)
    prompts = torch.randint(3, 200, (args.batch, args.prompt_len), device=device)
    mask = torch.ones_like(prompts)
    gen = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=True,
               temperature=args.temperature, top_k=0, top_p=1.0, eos_token_id=EOS, pad_token_id=PAD)
    out["_env"] = environment(device)
    save()
    if args.worker == "unsloth":
        import unsloth  # noqa: F401  (first: it patches transformers)
        from unsloth import FastLanguageModel

        model, _ = FastLanguageModel.from_pretrained(model_name=args.model_dir, max_seq_length=512,
                                                     dtype=torch.bfloat16, load_in_4bit=True)
        model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, lora_dropout=0, bias="none",
                                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                                 use_gradient_checkpointing="unsloth", random_state=0)
        FastLanguageModel.for_inference(model)
        out["unsloth"] = measure(lambda: hf_generate(model, prompts, mask, gen), args, device)
        return save()

    model, loader = load_policy(args.model_dir, device)
    out["_env"]["loader"] = loader
    for name in [s for s in stacks if s.startswith("engine")]:
        out[name] = engine_stack(name, model, prompts, mask, gen, args, device, out)
        save()
    for name, extra in (("hf-4bit-dynamic", {}), ("hf-4bit-static", {"cache_implementation": "static"})):
        if name in stacks:
            model.eval()
            out[name] = guarded(lambda: measure(lambda: hf_generate(model, prompts, mask, {**gen, **extra}),
                                                args, device))
            save()
    if "hf-bf16-static" in stacks:
        del model
        free(device)
        import transformers

        bf16 = transformers.AutoModelForCausalLM.from_pretrained(
            args.model_dir, dtype=torch.bfloat16 if device == "cuda" else torch.float32, device_map={"": device}).eval()
        out["hf-bf16-static"] = guarded(lambda: measure(
            lambda: hf_generate(bf16, prompts, mask, {**gen, "cache_implementation": "static"}), args, device))
    save()


def load_policy(model_dir, device):
    """4-bit NF4 + LoRA r=16 on q,k,v,o through lessons_lib (falls back to transformers + peft, and says so)."""
    import torch

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    try:
        from lessons_lib import get_peft_model, load_model

        model, _ = load_model(model_dir, max_seq_length=1024, dtype=dtype, load_in_4bit=True, device=device)
        return get_peft_model(model, r=16, lora_alpha=16, lora_dropout=0.0, target_modules=targets,
                              verbose=False), "lessons_lib.load_model + get_peft_model"
    except Exception as err:  # e.g. a loader from another transformers version: measure anyway, and say so
        import peft
        import transformers

        q = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                            bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=q, dtype=dtype,
                                                                  device_map={"": device})
        model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=16, target_modules=targets))
        return model, f"transformers + peft (lessons_lib loader unavailable: {err!r:.200})"


def engine_stack(name, model, prompts, mask, gen, args, device, out):
    import torch

    from lessons_lib.fast_generate import RolloutEngine

    options = {"engine": dict(weights="dense"), "engine-lean": dict(weights="lean"),
               "engine-triton": dict(weights="dense", kernels="triton"),
               "engine-eager": dict(weights="dense", cuda_graphs=False)}[name]

    def body():
        sync(device)
        t0 = time.perf_counter()
        engine = RolloutEngine(model, **options).build()
        sync(device)
        build_s = time.perf_counter() - t0
        kw = {k: v for k, v in gen.items() if k != "do_sample"}
        result = measure(lambda: engine.generate(prompts, mask, **kw).response_ids, args, device)
        with torch.no_grad():  # a stand-in for a PPO update: every LoRA weight changes in place
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.add_(torch.randn_like(p) * 1e-3)
        sync(device)
        t0 = time.perf_counter()
        refreshed = engine.refresh()
        sync(device)
        result.update(build_s=build_s, refresh_ms=1e3 * (time.perf_counter() - t0), refreshed_projections=refreshed,
                      engine_memory=engine.memory(), cuda_graphs_used=engine.cuda_graphs)
        if name == "engine":
            out["_checks"] = logits_check(engine, model, prompts, device)
        engine.release()
        del engine
        free(device)
        return result

    return guarded(body)


def logits_check(engine, model, prompts, device) -> dict:
    """Engine vs the 4-bit + LoRA model on 4 prompts + 8 forced tokens: how far apart are the logits?"""
    import torch

    ids, mask = prompts[:4], torch.ones_like(prompts[:4])
    cont = torch.randint(3, 200, (4, 8), device=device)
    ours = engine.forced_logits(ids, mask, cont)
    with torch.no_grad():
        full = torch.cat([ids, cont], 1)
        ref = model(input_ids=full, attention_mask=torch.ones_like(full)).logits[:, ids.shape[1] - 1:-1].float()
    return {"max_abs_logit_diff": float((ours - ref).abs().max()), "logit_std": float(ref.std()),
            "argmax_agreement": float((ours.argmax(-1) == ref.argmax(-1)).float().mean())}


def hf_generate(model, prompts, mask, gen):
    out = model.generate(input_ids=prompts, attention_mask=mask, **gen)
    return out[:, prompts.shape[1]:]


def measure(call, args, device) -> dict:
    """One warm-up call, then `runs` timed calls; checks that every row produced all new tokens."""
    import torch

    if device == "cuda":
        free(device)
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    tokens = call()
    sync(device)
    warmup_s = time.perf_counter() - t0
    if tuple(tokens.shape) != (args.batch, args.new_tokens):
        raise RuntimeError(f"expected {args.batch} x {args.new_tokens} new tokens, got {tuple(tokens.shape)}")
    rates = []
    for _ in range(args.runs):
        sync(device)
        t0 = time.perf_counter()
        tokens = call()
        sync(device)
        rates.append(tokens.numel() / (time.perf_counter() - t0))
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    return {"tokens_per_s": statistics.median(rates), "runs": rates, "warmup_s": warmup_s, "peak_gib": peak,
            "ms_per_step": 1e3 * args.batch / statistics.median(rates)}


def guarded(fn) -> dict:
    try:
        return fn()
    except Exception as err:  # one broken stack must not sink the others
        import traceback

        return {"error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()[-2000:]}


def sync(device):
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def free(device):
    import gc

    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def environment(device) -> dict:
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
           "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"}
    for pkg in ("transformers", "peft", "bitsandbytes", "triton", "unsloth"):
        try:
            from importlib.metadata import version

            env[pkg] = version(pkg)
        except Exception:
            env[pkg] = None
    return env


# ------------------------------------------------------------------------------------------------ --check


def check(args):
    """Engine vs transformers on small random models with odd sizes: teacher-forced logits (fp32: error relative
    to the logit scale; bf16: error against the fp32 model, next to transformers' own bf16 error), greedy tokens
    (64 new tokens, left padding; in bf16 both sides round differently, so greedy paths part once two logits
    are within rounding of each other), and the first sampled token's law (chi-square p-value, 10,000 draws,
    T=0.7; under a correct sampler p is uniform on [0, 1])."""
    import torch
    import transformers

    from lessons_lib.fast_generate import RolloutEngine

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    common = dict(rms_norm_eps=1e-5, initializer_range=0.2, max_position_embeddings=512)
    models = {
        "qwen2 (5 heads / 1 kv, tied, qkv bias)": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
            hidden_size=40, intermediate_size=72, num_hidden_layers=3, num_attention_heads=5, num_key_value_heads=1,
            vocab_size=97, tie_word_embeddings=True, **common)),
        "llama (head_dim 12, biases, llama3 rope)": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
            hidden_size=48, intermediate_size=100, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            head_dim=12, vocab_size=89, attention_bias=True, mlp_bias=True, rope_parameters={
                "rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 16}, **common)),
    }
    rows = ["| model | variant | max logit error | greedy, 64 tokens: identical to generate (median) | "
            "first-token chi-square p |",
            "|---|---|---|---|---|"]
    for name, make in models.items():
        import peft

        base = make().to(device).eval()
        lora = peft.get_peft_model(make().to(device), peft.LoraConfig(r=4, lora_alpha=12, init_lora_weights=False,
                                                                        target_modules=["q_proj", "v_proj", "o_proj"]))
        V = base.config.vocab_size
        ids = torch.randint(0, V, (8, 12), device=device)
        mask = torch.ones_like(ids)
        for i in range(8):
            mask[i, : i % 5] = 0
        cont = torch.randint(0, V, (8, 10), device=device)
        bf16 = make().to(device)
        bf16.load_state_dict(base.state_dict())
        for variant, model in (("fp32", base), ("fp32 + LoRA", lora.eval()), ("bf16", bf16.to(torch.bfloat16).eval())):
            truth = _forced(base if variant == "bf16" else model, ids, mask, cont)  # bf16: against the fp32 model
            engine = RolloutEngine(model)
            err = (engine.forced_logits(ids, mask, cont) - truth).abs().max().item()
            scale = truth.abs().max().item()
            if variant == "bf16":
                hf_err = (_forced(model, ids, mask, cont) - truth).abs().max().item()
                err_text = f"{err:.3g} vs fp32 model (transformers bf16: {hf_err:.3g})"
            else:
                err_text = f"{err:.2g} ({err / scale:.1g} of the logit scale {scale:.2g})"
            kw = dict(do_sample=False, max_new_tokens=64, pad_token_id=0)
            with torch.no_grad():
                hf = model.generate(input_ids=ids, attention_mask=mask, eos_token_id=None, **kw)[:, ids.shape[1]:]
            ours = engine.generate(ids, mask, eos_token_id=[], **kw).response_ids
            same = _agreement(ours, hf)
            if variant == "bf16":  # how soon do two valid bf16 computations part? compare both with fp32 greedy
                with torch.no_grad():
                    hf32 = base.generate(input_ids=ids, attention_mask=mask, eos_token_id=None, **kw)[:, ids.shape[1]:]
                same += (f" (vs fp32 generate: engine {_agreement(ours, hf32, short=True)}, "
                         f"transformers bf16 {_agreement(hf, hf32, short=True)})")
            n, T = 10_000, 0.7
            first = engine.generate(ids[:1].expand(n, -1), mask[:1].expand(n, -1), max_new_tokens=1, temperature=T,
                                    eos_token_id=[]).response_ids[:, 0]
            with torch.no_grad():
                probs = _forced(model, ids[:1], mask[:1], cont[:1, :1])[0, 0].div(T).softmax(-1)
            pval = _chi2(torch.bincount(first, minlength=V).cpu(), probs.cpu() * n)
            rows.append(f"| {name} | {variant} | {err_text} | {same} | {pval:.2f} |")
            print(rows[-1], flush=True)
    env = environment(device)
    md = "\n".join([f"# Rollout engine correctness ({device})", "",
                    f"`python benchmarks/rollout.py --check` on {datetime.datetime.now().isoformat(timespec='seconds')}"
                    f", {env['device']}; torch {env['torch']}, transformers {env['transformers']}, peft {env['peft']}.",
                    "", check.__doc__.split("\n\n")[0].replace("\n   ", ""), "", *rows, ""])
    out = Path(args.out or REPO / "benchmarks" / "results" / f"rollout-check-{device}")
    out.with_suffix(".md").write_text(md)
    print(f"wrote {out.with_suffix('.md')}")


def _agreement(a, b, short: bool = False) -> str:
    """How many rows of two (R, T) greedy outputs are identical, and where the others first differ (median)."""
    import torch

    differ = a != b
    first = torch.where(differ.any(1), differ.int().argmax(1), torch.full_like(differ[:, 0], a.shape[1],
                                                                               dtype=torch.long))
    same = int((~differ.any(1)).sum())
    if short:
        return f"{same}/{len(a)}, median first difference {int(first.median())}"
    text = f"{same}/{len(a)} rows identical"
    return text + (f"; median first difference at token {int(first.median())}" if differ.any() else "")


def _forced(model, ids, mask, cont):
    import torch

    full = torch.cat([ids, cont], 1)
    fmask = torch.cat([mask, torch.ones_like(cont)], 1)
    with torch.no_grad():
        out = model(input_ids=full, attention_mask=fmask, position_ids=(fmask.cumsum(1) - 1).clamp(min=0))
    return out.logits[:, ids.shape[1] - 1:-1].float()


def _chi2(observed, expected) -> float:
    import torch

    keep = expected >= 5
    obs = torch.cat([observed[keep], observed[~keep].sum()[None]]).double()
    exp = torch.cat([expected[keep], expected[~keep].sum()[None]]).double()
    obs, exp = obs[exp > 0], exp[exp > 0]
    stat = ((obs - exp) ** 2 / exp).sum()
    return float(torch.special.gammaincc(torch.tensor((len(exp) - 1) / 2, dtype=torch.float64), stat / 2))


# ------------------------------------------------------------------------------------------------ report


def report(args, results: dict, device: str, elapsed: float):
    env, checks = results.pop("_env", {}), results.pop("_checks", None)
    base = results.get("unsloth", {}).get("tokens_per_s") or results.get("hf-4bit-dynamic", {}).get("tokens_per_s")
    base_name = "Unsloth" if results.get("unsloth", {}).get("tokens_per_s") else "HF 4-bit dynamic"
    rows = []
    for name, r in results.items():
        if "tokens_per_s" in r:
            runs, peak = r["runs"], "" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
            ratio = f"{r['tokens_per_s'] / base:.1f}×" if base else ""
            rows.append(f"| {name} | {STACKS[name][1]} | {r['tokens_per_s']:,.0f} | "
                        f"{min(runs):,.0f}–{max(runs):,.0f} | {r['ms_per_step']:.2f} | {peak} | {ratio} |")
        else:
            rows.append(f"| {name} | {STACKS[name][1]} | failed: {r.get('error', '?')[:150]} | | | | |")
    header = ["| stack | what | new tokens/s (median) | runs | ms/step | peak GiB | vs " + base_name + " |",
              "|---|---|---|---|---|---|---|"]
    extras = []
    for name in ("engine", "engine-lean", "engine-triton", "engine-eager"):
        r = results.get(name, {})
        if "build_s" in r:
            m = r["engine_memory"]
            extras.append(f"- {name}: build {r['build_s']:.2f} s, refresh after a LoRA update {r['refresh_ms']:.1f} ms "
                          f"({r['refreshed_projections']} projections), engine weights {m['weights'] / 2**30:.2f} GiB, "
                          f"scratch {m['scratch'] / 2**30:.3f} GiB, KV cache {m['kv_cache'] / 2**30:.3f} GiB, "
                          f"warm-up call {r['warmup_s']:.1f} s, CUDA graphs used: {r['cuda_graphs_used']}")
    if checks:
        extras.append(f"- engine vs the 4-bit + LoRA model (4 prompts, 8 forced tokens): max |logit diff| "
                      f"{checks['max_abs_logit_diff']:.3g} (logit std {checks['logit_std']:.3g}), argmax agreement "
                      f"{checks['argmax_agreement']:.3f}")
    command = "python3 benchmarks/rollout.py " + " ".join(sys.argv[1:])
    date = datetime.datetime.now().isoformat(timespec="seconds")
    md = "\n".join([
        f"# Rollout benchmark{' (quick, CPU, tiny config: tests the script, not a measurement)' if args.quick else ''}",
        "", f"`{command}` on {date}, {env.get('device')} ({env.get('cpu_count')} CPUs); torch {env.get('torch')}, "
        f"transformers {env.get('transformers')}, peft {env.get('peft')}, bitsandbytes {env.get('bitsandbytes')}, "
        f"unsloth {env.get('unsloth')}. Policy loaded with {env.get('loader')}.", "",
        f"{args.batch} prompts x {args.prompt_len} tokens -> {args.new_tokens} new tokens each (min_new_tokens = "
        f"max_new_tokens: EOS suppressed in every stack), sampling T={args.temperature}, top_k=0, top_p=1. "
        f"One warm-up call per stack (not timed), median of {args.runs} timed calls. Peak GiB: "
        "max_memory_allocated over the stack's calls, model included.", "", *header, *rows, "", *extras,
        "", f"Whole script: {elapsed:.0f} s.", ""])
    print("\n" + md)
    out = Path(args.out or REPO / "benchmarks" / "results" / ("rollout-quick" if args.quick else "rollout"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(md)
    out.with_suffix(".json").write_text(json.dumps({"command": command, "date": date, "env": env, "config": {
        "batch": args.batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
        "temperature": args.temperature, "runs": args.runs, "quick": args.quick}, "results": results,
        "checks": checks, "elapsed_s": elapsed}, indent=1))
    print(f"wrote {out.with_suffix('.md')} and .json")


if __name__ == "__main__":
    main()
