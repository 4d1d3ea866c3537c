"""One full PPO iteration, lessons_lib vs TRL 1.12: episodes/s and peak GPU memory (issue 8).

Workload: TRL's standard PPO sizes on a random-weight Qwen2-1.5B (docs/GPU.md): rollout batch 8, prompts of 64
tokens, responses of exactly 128 tokens (TRL has no stop token by default; ours suppress EOS with min_new_tokens, so
both do the same work), sampling at T=0.7, 4 PPO epochs of 4 minibatches (16 optimizer steps). One iteration =
rollout, reward-model scores, policy / reference / value passes, GAE, the 16 minibatch updates.

- trl: `trl.experimental.ppo.PPOTrainer` (1.12.0, the last TRL with PPO): bf16 policy + LoRA r=16 on q,k,v,o (its
  4-bit policy crashes at generation), full bf16 value and reward models of the same config, gradient checkpointing
  on the policy. Timed by a callback at the end of every iteration.
- lessons*: `lessons_lib.PPOTrainer` as a user writes it: `load_model(..., load_in_4bit=True)` + `get_peft_model`
  (r=16, q,k,v,o), the reference = adapters disabled, a value head, a 4-bit `RewardModel` (NF4 + LoRA r=16 + head,
  `RewardModel.from_backbone`), the article's loop: `generate`, `compute_reward`, `step`. Levers "auto" (every one
  on, on a GPU) unless the stack turns one off.

Every stack runs in its own subprocess (clean peak memory; TRL's imports stay out of ours). The first iteration
(CUDA graph captures, Triton autotuning, cuBLAS set-up) is never timed; episodes/s = episodes / seconds over the
iterations after it. Peak = torch.cuda.max_memory_allocated over the whole process (loading included).

    python3 benchmarks/ppo_iteration.py            # GPU machine, ~4 min: table + benchmarks/results/ppo_iteration.{md,json}
    python benchmarks/ppo_iteration.py --quick     # CPU, a tiny config, ~1 min: tests the script (not a measurement)
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

from common import QWEN2_1_5B, REPO, build_model  # this checkout on sys.path, offline

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=512, tie_word_embeddings=True, rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=512)
QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]

# name -> (what it is, PPO rollout batch, PPOConfig levers)
STACKS = {
    "trl": ("TRL 1.12 PPOTrainer: bf16 policy + LoRA r=16 qkvo, bf16 value and reward models, grad. checkpointing",
            8, {}),
    "lessons": ("lessons_lib PPOTrainer, every lever on: 4-bit + LoRA policy, RolloutEngine, FastDecoder, CUDA "
                "graphs; 4-bit reward model", 8, {}),
    "lessons-64": ("the same, rollout batch 64 (4 minibatches of 16): how one would run it", 64, {}),
    "lessons-no-graphs": ("lessons, update without CUDA graphs", 8, {"cuda_graphs": False}),
    "lessons-hf-forward": ("lessons, transformers' forward (policy: lean log-probs; reward model) instead of "
                           "FastDecoder, CUDA graphs kept", 8, {"fast_forward": False, "cuda_graphs": True}),
    "lessons-generate": ("lessons, model.generate instead of the RolloutEngine", 8, {"fast_rollout": False}),
    "lessons-plain": ("lessons, every lever off: generate, transformers' forward, eager update", 8,
                      {"fast_rollout": False, "fast_forward": False, "cuda_graphs": False}),
}
DEFAULT_STACKS = ["trl", "lessons", "lessons-64", "lessons-no-graphs", "lessons-hf-forward"]


# ------------------------------------------------------------------------------------------------ the model


# ------------------------------------------------------------------------------------------------ workers


def lessons_worker(args, name: str, out: dict, save) -> dict:
    import torch

    from lessons_lib import PPOConfig, PPOTrainer, get_peft_model, load_model
    from lessons_lib.reward import RewardModel

    device = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    _, batch, levers = STACKS[name]
    if args.quick:  # "auto" is off on a CPU: force the levers that can run there, so the quick run exercises them
        levers = {"fast_rollout": True, "fast_forward": True, "length_bucket": 32, **levers}
        levers = {k: v for k, v in levers.items() if k != "cuda_graphs"}
    batch = args.batch or batch
    t0 = time.perf_counter()
    model, tok = load_model(args.model_dir, max_seq_length=1024, load_in_4bit=True, device=device)
    model = get_peft_model(model, r=16, lora_alpha=16, lora_dropout=0.0, target_modules=QKVO, verbose=False)
    rm = RewardModel.from_backbone(args.model_dir, tokenizer=tok, load_in_4bit=True, lora_r=16)
    cfg = PPOConfig(batch_size=batch, mini_batch_size=batch // 4, gradient_accumulation_steps=1, ppo_epochs=4,
                    learning_rate=1e-5, temperature=0.7, max_new_tokens=args.response_len, missing_eos_penalty=None,
                    forward_batch_size=min(batch, 64), progress=False, **levers)
    trainer = PPOTrainer(cfg, model=model, tokenizer=tok, reward_model=rm)
    sync(device)
    out[name] = result = {"load_s": time.perf_counter() - t0, "batch": batch, "levers": levers,
                          "forward_backend": trainer.forward_backend, "forward_reason": trainer.forward_reason}
    gen = {"max_new_tokens": args.response_len, "min_new_tokens": args.response_len, "do_sample": True,
           "temperature": 0.7}
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    rows = []
    for it in range(1 + args.iterations):
        queries = [torch.randint(3, vocab, (args.prompt_len,), generator=g) for _ in range(batch)]
        times = [time.perf_counter()]
        responses = trainer.generate(queries, return_prompt=False, generate_kwargs=gen)
        sync(device)
        times.append(time.perf_counter())
        rewards = trainer.compute_reward(responses=responses, queries=queries)
        sync(device)
        times.append(time.perf_counter())
        stats = trainer.step(queries=queries, responses=responses, rewards=rewards)
        sync(device)
        times.append(time.perf_counter())
        # EOS is suppressed, but a sampled pad token at the very end is cut off (as padding): rare, allowed
        mean_len = sum(len(r) for r in responses) / len(responses)
        if mean_len < 0.95 * args.response_len:
            raise RuntimeError(f"expected responses of {args.response_len} tokens, got {mean_len:.1f} on average")
        bad = [k for k, v in stats.items() if v != v or v in (float("inf"), float("-inf"))]
        if bad:
            raise RuntimeError(f"non-finite stats {bad}")
        rows.append({"total_s": times[3] - times[0], "rollout_s": times[1] - times[0], "reward_s": times[2] - times[1],
                     "scoring_s": stats["time/ppo/forward"], "update_s": stats["time/ppo/optimize"],
                     "step_s": times[3] - times[2], "response_tokens": mean_len})
        print(f"  {name} iteration {it}{' (warm-up)' if it == 0 else ''}: " + ", ".join(
            f"{k} {v:.3f}" for k, v in rows[-1].items()), flush=True)
        result["iterations"] = rows
        save()
    timed = rows[1:]
    result.update(
        episodes_per_s=batch * len(timed) / sum(r["total_s"] for r in timed),
        median={k: statistics.median(r[k] for r in timed) for k in timed[0]}, warmup_s=rows[0]["total_s"],
        engine=None if not trainer._engine else {
            "memory_gib": {k: v / 2**30 for k, v in trainer._engine.memory().items() if k not in ("dense_layers",
                                                                                               "layers")},
            "dense_layers": trainer._engine.memory()["dense_layers"], "cuda_graphs": trainer._engine.cuda_graphs,
            "kernels": trainer._engine.kernels},
        update_graphs=None if trainer._graphed is None else {"enabled": trainer._graphed.enabled,
                                                              "captures": trainer._graphed.captures},
        last_stats={k: stats[k] for k in ("objective/kl", "objective/scores", "ppo/loss/total", "ppo/policy/clipfrac")},
        **memory(device))
    return result


def trl_worker(args, name: str, out: dict, save) -> dict:
    import torch
    import transformers
    from peft import LoraConfig

    device = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    import datasets
    import trl
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    batch = args.batch or STACKS[name][1]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    t0 = time.perf_counter()
    tok = transformers.AutoTokenizer.from_pretrained(args.model_dir)
    tok.padding_side = "left"
    kw = dict(dtype=dtype, device_map={"": device})
    policy = transformers.AutoModelForCausalLM.from_pretrained(args.model_dir, **kw)
    policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    value = transformers.AutoModelForSequenceClassification.from_pretrained(args.model_dir, num_labels=1, **kw)
    reward = transformers.AutoModelForSequenceClassification.from_pretrained(args.model_dir, num_labels=1, **kw)
    iterations = 1 + args.iterations
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, policy.config.vocab_size, (batch * iterations, args.prompt_len), generator=g)
    dataset = datasets.Dataset.from_dict({"input_ids": prompts.tolist()})
    config = PPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-ppo-"), per_device_train_batch_size=batch,
        gradient_accumulation_steps=1, num_mini_batches=4, num_ppo_epochs=4, response_length=args.response_len,
        total_episodes=batch * iterations, temperature=0.7, learning_rate=1e-5, bf16=device == "cuda",
        report_to="none", logging_steps=1, save_strategy="no", num_sample_generations=0, disable_tqdm=True,
        local_rollout_forward_batch_size=batch, seed=0, stop_token=None, missing_eos_penalty=None,
        use_cpu=device == "cpu")
    marks = []

    class Timer(transformers.TrainerCallback):
        def on_train_begin(self, *a, **k):
            sync(device)
            marks.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            sync(device)
            marks.append(time.perf_counter())
            print(f"  trl iteration {len(marks) - 2}: {marks[-1] - marks[-2]:.3f} s", flush=True)

    trainer = PPOTrainer(args=config, processing_class=tok, model=policy, ref_model=None, reward_model=reward,
                         train_dataset=dataset, value_model=value, eval_dataset=dataset, callbacks=[Timer()],
                         peft_config=LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=QKVO,
                                                task_type="CAUSAL_LM"))
    out[name] = result = {"load_s": time.perf_counter() - t0, "batch": batch, "trl": trl.__version__}
    save()
    trainer.train()
    steps = [b - a for a, b in zip(marks, marks[1:])]
    if len(steps) != iterations:
        raise RuntimeError(f"expected {iterations} iterations, the callback saw {len(steps)}")
    timed = steps[1:]
    result.update(episodes_per_s=batch * len(timed) / sum(timed), iterations=[{"total_s": s} for s in steps],
                  median={"total_s": statistics.median(timed)}, warmup_s=steps[0], **memory(device))
    return result


def worker(args):
    out: dict = {}
    save = lambda: Path(args.result).write_text(json.dumps(out, indent=1))  # noqa: E731  (partial results survive)
    import torch

    device = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    if device == "cpu":
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    out["_env"] = environment(device)
    save()
    run = trl_worker if args.worker == "trl" else lessons_worker
    run(args, args.worker, out, save)
    save()


def memory(device) -> dict:
    import torch

    if device != "cuda":
        return {"peak_gib": None, "reserved_gib": None}
    return {"peak_gib": torch.cuda.max_memory_allocated() / 2**30,
            "reserved_gib": torch.cuda.max_memory_reserved() / 2**30}


def sync(device):
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def environment(device) -> dict:
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
           "platform": platform.platform(),
           "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"}
    from importlib.metadata import PackageNotFoundError, version

    for pkg in ("transformers", "peft", "bitsandbytes", "triton", "trl", "datasets", "accelerate"):
        try:
            env[pkg] = version(pkg)
        except PackageNotFoundError:
            env[pkg] = None
    return env


# ------------------------------------------------------------------------------------------------ parent


def run_worker(name: str, args, timeout: int) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result = Path(f.name)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--result", str(result),
           "--model-dir", str(args.model_dir), "--iterations", str(args.iterations), "--prompt-len",
           str(args.prompt_len), "--response-len", str(args.response_len)] + (["--quick"] if args.quick else []) + (
        ["--batch", str(args.batch)] if args.batch else [])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    if args.quick:  # on CPU the Triton kernels run only in the interpreter (set before they are defined)
        env.setdefault("TRITON_INTERPRET", "1")
    t0 = time.time()
    print(f"[{name}] {STACKS[name][0]}", flush=True)
    try:
        proc = subprocess.run(cmd, env=env, timeout=timeout, stdout=None, stderr=subprocess.PIPE, text=True)
        out = json.loads(result.read_text()) if result.stat().st_size else {}
        if proc.returncode != 0:
            out.setdefault("_error", f"worker exited {proc.returncode}: {proc.stderr[-1500:]}")
    except subprocess.TimeoutExpired:
        out = json.loads(result.read_text()) if result.stat().st_size else {}
        out["_error"] = f"worker timed out after {timeout} s"
    print(f"  [{name} worker: {time.time() - t0:.0f} s]", flush=True)
    result.unlink(missing_ok=True)
    r = out.get(name, {})
    if "_error" in out:
        r["error"] = out["_error"]
        print(f"  [{name}] failed: {out['_error'][-600:]}", flush=True)
    return {**r, "_env": out.get("_env")}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny config on CPU (tests the script, not a measurement)")
    p.add_argument("--stacks", default=None, help=f"comma-separated, from {','.join(STACKS)}; default "
                   f"{','.join(DEFAULT_STACKS)}; 'all' for every one")
    p.add_argument("--iterations", type=int, default=None, help="timed iterations per stack (after 1 warm-up)")
    p.add_argument("--batch", type=int, default=None, help="override every stack's rollout batch")
    p.add_argument("--prompt-len", type=int, default=None)
    p.add_argument("--response-len", type=int, default=None)
    p.add_argument("--model-dir", default=None)
    p.add_argument("--out", default=None, help="results path without extension")
    p.add_argument("--timeout", type=int, default=300, help="seconds per worker process")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    q = args.quick
    args.iterations = args.iterations or (2 if q else 4)
    args.prompt_len = args.prompt_len or (16 if q else 64)
    args.response_len = args.response_len or (8 if q else 128)
    if args.worker:
        return worker(args)
    stacks = list(STACKS) if args.stacks == "all" else args.stacks.split(",") if args.stacks else DEFAULT_STACKS
    unknown = [s for s in stacks if s not in STACKS]
    if unknown:
        p.error(f"unknown stacks {unknown}; choose from {list(STACKS)}")
    import torch

    device = "cuda" if torch.cuda.is_available() and not q else "cpu"
    args.model_dir = Path(args.model_dir or Path(tempfile.gettempdir()) / ("lessons-ppo-tiny" if q else
                                                                           "lessons-ppo-qwen2-1.5b"))
    started = time.time()
    print(f"model: random Qwen2 {'tiny' if q else '1.5B'} config -> {args.model_dir}", flush=True)
    build_model(args.model_dir, TINY if q else QWEN2_1_5B, device)
    results, env = {}, {}
    for name in stacks:
        results[name] = run_worker(name, args, args.timeout)
        env = results[name].pop("_env", None) or env
    report(args, results, env, device, time.time() - started)


# ------------------------------------------------------------------------------------------------ report


def report(args, results: dict, env: dict, device: str, elapsed: float):
    trl = results.get("trl", {})
    base_eps, base_peak = trl.get("episodes_per_s"), trl.get("peak_gib")
    header = ["| stack | what | batch | episodes/s | s / iteration | rollout s | reward s | scoring s | update s | "
              "peak GiB | reserved GiB | speed vs TRL | peak vs TRL |", "|" + "---|" * 13]
    rows = []
    for name, r in results.items():
        if "episodes_per_s" not in r:
            last = [line for line in str(r.get("error", "no result")).splitlines() if line.strip()][-1]
            rows.append(f"| {name} | {STACKS[name][0]} | {r.get('batch', '')} | failed: "
                        f"{last[:200].replace('|', '/')} |" + " |" * 9)
            continue
        m = r["median"]
        cell = lambda k: f"{m[k]:.3f}" if k in m else ""  # noqa: E731
        peak = "" if r.get("peak_gib") is None else f"{r['peak_gib']:.2f}"
        reserved = "" if r.get("reserved_gib") is None else f"{r['reserved_gib']:.2f}"
        speed = f"{r['episodes_per_s'] / base_eps:.1f}×" if base_eps and name != "trl" else ""
        mem = f"{r['peak_gib'] / base_peak:.2f}×" if base_peak and r.get("peak_gib") and name != "trl" else ""
        rows.append(f"| {name} | {STACKS[name][0]} | {r['batch']} | {r['episodes_per_s']:.2f} | {m['total_s']:.3f} | "
                    f"{cell('rollout_s')} | {cell('reward_s')} | {cell('scoring_s')} | {cell('update_s')} | {peak} | "
                    f"{reserved} | {speed} | {mem} |")
    notes = []
    ours = results.get("lessons", {})
    if base_eps and ours.get("episodes_per_s") and base_peak and ours.get("peak_gib"):
        s, mem = ours["episodes_per_s"] / base_eps, ours["peak_gib"] / base_peak
        verdict = "met" if s >= 10 and mem <= 0.5 else "NOT met"
        notes.append(f"- Target (issue 8): >= 10x TRL's episodes/s at <= 50% of its peak memory, same workload "
                     f"(batch 8): **{verdict}** ({s:.1f}x the speed, {100 * mem:.0f}% of the peak).")
    for name, r in results.items():
        if name.startswith("lessons") and "episodes_per_s" in r:
            extra = [f"forward: {r['forward_backend']} ({r['forward_reason']})"]
            if r.get("engine"):
                e = r["engine"]
                extra.append(f"engine: {e['dense_layers']} dense layers, kernels {e['kernels']}, CUDA graphs "
                             f"{e['cuda_graphs']}, {sum(e['memory_gib'].values()):.2f} GiB")
            else:
                extra.append("rollout: model.generate")
            if r.get("update_graphs"):
                g = r["update_graphs"]
                extra.append(f"update graphs: {'on' if g['enabled'] else 'off'}, {g['captures']} captured")
            extra.append(f"load {r['load_s']:.1f} s, warm-up iteration {r['warmup_s']:.1f} s")
            notes.append(f"- {name}: " + "; ".join(extra))
        elif name == "trl" and "episodes_per_s" in r:
            notes.append(f"- trl {r.get('trl')}: load {r['load_s']:.1f} s, warm-up iteration {r['warmup_s']:.1f} s")
    command = "python3 benchmarks/ppo_iteration.py " + " ".join(sys.argv[1:])
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    title = "# PPO iteration: lessons_lib vs TRL 1.12" + (" (quick: CPU, tiny config; tests the script, timings "
                                                          "meaningless)" if args.quick else "")
    md = "\n".join([
        title, "", f"- command: `{command}`", f"- date: {date}",
        f"- hardware: {env.get('device')} ({env.get('cpu_count')} CPUs); python {env.get('python')}, torch "
        f"{env.get('torch')}, transformers {env.get('transformers')}, peft {env.get('peft')}, bitsandbytes "
        f"{env.get('bitsandbytes')}, triton {env.get('triton')}, trl {env.get('trl')}, datasets {env.get('datasets')}",
        f"- workload: random Qwen2 {'tiny' if args.quick else '1.5B'} config, prompts {args.prompt_len} tokens, "
        f"responses exactly {args.response_len} tokens, T=0.7, 4 PPO epochs x 4 minibatches; 1 warm-up iteration, then "
        f"{args.iterations} timed (episodes/s over the timed ones; s / iteration and the parts are medians). Peak: "
        "torch.cuda.max_memory_allocated of the whole process. scoring s = policy, reference and value passes + GAE "
        "(time/ppo/forward); update s = the 16 minibatch updates (time/ppo/optimize).", "", *header, *rows, "",
        *notes, "", f"Whole script: {elapsed:.0f} s.", ""])
    print("\n" + md)
    out = Path(args.out or REPO / "benchmarks" / "results" / ("ppo_iteration-quick" if args.quick else "ppo_iteration"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(md)
    out.with_suffix(".json").write_text(json.dumps({
        "command": command, "date": date, "env": env, "device": device, "config": {
            "prompt_len": args.prompt_len, "response_len": args.response_len, "iterations": args.iterations,
            "quick": args.quick}, "results": results, "elapsed_s": elapsed}, indent=1))
    print(f"wrote {out.with_suffix('.md')} and .json")


if __name__ == "__main__":
    main()
