"""Scaling benchmark: PPO episodes per second on 1 process vs 2 processes (data parallel, docs/SCALING.md).

Workload: a random-weight Qwen2-1.5B (docs/GPU.md), NF4 4-bit + LoRA r=16 on q,k,v,o through `lessons_lib.load_model`
/ `get_peft_model`; `PPOTrainer` with a fixed batch *per process* (16 prompts x 64 tokens, 128 new tokens sampled
at T=0.7, minibatches of 8 per process, 4 PPO epochs), so 2 processes do twice the work per iteration (weak
scaling). The reward is a cheap rule on the response's token ids (the share of even ids), so the time measured is
PPO's own: rollout, scoring passes, update and the gradient sums between the processes. Speed does not depend on the
weights, so random ones are fine; the model is built once (bf16, on the GPU) and saved to /tmp before the launches.

Each configuration is one `accelerate launch --num_processes N` of this script (`--worker`), one after the other in
the same run; every process gets NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1
(NVLink multicast off). Per process: `--warmup` iterations (not timed), then `--iters` timed iterations between two
barriers. Episodes/s per process = per-process batch x iterations / time; total = global batch x iterations / time;
scaling efficiency = total(N=2) / (2 x total(N=1)).

    python3 benchmarks/scaling.py            # the two-GPU machine, ~3 min: table + benchmarks/results/scaling.{md,json}
    python benchmarks/scaling.py --quick     # CPU, gloo, a tiny config: tests the script (scaling-quick.{md,json})
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import QWEN2_1_5B, REPO, build_model  # this checkout on sys.path, offline

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=512, tie_word_embeddings=True, rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=512)
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
DEFAULTS = {  # name: (GPU, --quick)
    "per_process_batch": (16, 4), "mini_batch": (8, 2), "ppo_epochs": (4, 2), "prompt_len": (64, 8),
    "new_tokens": (128, 8), "warmup": (1, 1), "iters": (3, 2), "processes": ("1,2", "1,2"),
}


# ------------------------------------------------------------------------------------------------ parent


def launch(n: int, args, model_dir: Path) -> dict:
    """`accelerate launch --num_processes n` of this script's worker; returns its JSON result (or an error)."""
    result = Path(tempfile.mkdtemp(prefix="lessons-scaling-")) / "result.json"
    with socket.socket() as free:     # a free port for the processes to meet on (the default 29500 may be taken)
        free.bind(("127.0.0.1", 0))
        port = str(free.getsockname()[1])
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(n), "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", *(["--multi_gpu", "--main_process_port", port]
                                                                  if n > 1 else []),
           str(Path(__file__).resolve()), "--worker", "--model-dir", str(model_dir), "--result", str(result),
           *[f"--{k.replace('_', '-')}={getattr(args, k)}" for k in DEFAULTS if k != "processes"],
           *(["--quick"] if args.quick else [])]
    env = {**os.environ, **NO_MULTICAST, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if args.quick:
        env.update(OMP_NUM_THREADS="1", TRITON_INTERPRET="1")
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, env=env, timeout=args.timeout, capture_output=True, text=True)
        out = json.loads(result.read_text()) if result.exists() else {}
        if proc.returncode != 0 or not out:
            out["error"] = f"launch exited {proc.returncode}: {(proc.stderr or proc.stdout)[-2500:]}"
    except subprocess.TimeoutExpired:
        out = {"error": f"launch timed out after {args.timeout} s"}
    out["launch_s"] = time.time() - t0
    out["command"] = " ".join(cmd[:cmd.index(str(Path(__file__).resolve()))] + ["benchmarks/scaling.py", "--worker"])
    print(f"  [{n} process(es): {out['launch_s']:.0f} s{', ' + out['error'][-300:] if 'error' in out else ''}]",
          flush=True)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny config on CPU with gloo, ~1 min (tests the script)")
    for name in DEFAULTS:
        p.add_argument(f"--{name.replace('_', '-')}", default=None,
                       type=str if name == "processes" else int)
    p.add_argument("--model-dir", default=None)
    p.add_argument("--out", default=None, help="results path without extension")
    p.add_argument("--timeout", type=int, default=None, help="seconds per launch")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    for name, (gpu, quick) in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else gpu)
    args.timeout = args.timeout or (240 if args.quick else 420)
    if args.worker:
        return worker(args)

    import torch

    device = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    if device == "cpu" and not args.quick:
        p.error("no CUDA GPU here: run with --quick (CPU, gloo) to test the script")
    model_dir = Path(args.model_dir or Path(tempfile.gettempdir()) / ("lessons-scaling-tiny" if args.quick else
                                                                        "lessons-scaling-qwen2-1.5b"))
    started = time.time()
    print(f"model: random Qwen2 {'tiny' if args.quick else '1.5B'} config -> {model_dir}", flush=True)
    build_model(model_dir, TINY if args.quick else QWEN2_1_5B, device, words=256)
    runs = {}
    for n in [int(x) for x in str(args.processes).split(",")]:
        if device == "cuda" and n > torch.cuda.device_count():
            runs[n] = {"error": f"skipped: {n} processes need {n} GPUs, this machine has {torch.cuda.device_count()}"}
            continue
        runs[n] = launch(n, args, model_dir)
    report(args, runs, device, time.time() - started)


# ------------------------------------------------------------------------------------------------ worker


def worker(args):
    """One process of a launch: PPOTrainer on its slice of every global batch; rank 0 writes the result."""
    import torch

    from lessons_lib import PPOConfig, PPOTrainer, get_peft_model, load_model

    if args.quick:
        torch.set_num_threads(1)
    model, tokenizer = load_model(args.model_dir, load_in_4bit=True)
    model = get_peft_model(model, r=16, lora_alpha=16, lora_dropout=0.0,
                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], verbose=False)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = PPOConfig(batch_size=args.per_process_batch * world, mini_batch_size=args.mini_batch * world,
                    ppo_epochs=args.ppo_epochs, learning_rate=1e-5, max_new_tokens=args.new_tokens, temperature=0.7,
                    progress=False, missing_eos_penalty=None)
    trainer = PPOTrainer(config=cfg, model=model, tokenizer=tokenizer)
    rank = trainer.dist.rank if trainer.dist is not None else 0
    device = trainer.device
    sync_s = _time_collectives(trainer, device)

    def barrier():
        if trainer.dist is not None:
            trainer.dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize()

    def iteration(i: int) -> dict:
        # the same global batch on every process (one seed per iteration), each process keeps its slice
        g = torch.Generator().manual_seed(1000 + i)
        prompts = torch.randint(3, 256, (cfg.batch_size, args.prompt_len), generator=g)
        mine = prompts[rank * args.per_process_batch:(rank + 1) * args.per_process_batch]
        t0 = time.perf_counter()
        responses = trainer.generate(list(mine), return_prompt=False)
        t1 = time.perf_counter()
        scores = [float((r % 2 == 0).float().mean()) - 0.5 for r in responses]
        stats = trainer.step(list(mine), responses, rewards=scores)
        return {"rollout_s": t1 - t0, "step_s": time.perf_counter() - t1, "forward_s": stats["time/ppo/forward"],
                "optimize_s": stats["time/ppo/optimize"], "response_length": stats["env/response_length"],
                "kl": stats["objective/kl"]}

    for i in range(args.warmup):
        iteration(i)
    barrier()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync_s.clear()
    start = time.perf_counter()
    timed = [iteration(args.warmup + i) for i in range(args.iters)]
    barrier()
    elapsed = time.perf_counter() - start
    mine = {"rank": rank, "elapsed_s": elapsed, "sync_s": sum(sync_s),
            "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
            **{k: sum(t[k] for t in timed) / len(timed) for k in timed[0]}}
    everyone = trainer.dist.gather_objects(mine) if trainer.dist is not None else [mine]
    if rank == 0:
        out = {"processes": world, "per_process_batch": args.per_process_batch, "global_batch": cfg.batch_size,
               "iters": args.iters, "ranks": everyone, "env": environment(device), "config": cfg.to_dict()}
        Path(args.result).write_text(json.dumps(out, indent=2))


def _time_collectives(trainer, device) -> list:
    """Wrap the trainer's gradient sums and token-share all-reduces to add up the seconds they take (synchronised
    before and after, so the time is the communication's own, not queued compute)."""
    import torch

    spent: list[float] = []
    if trainer.dist is None:
        return spent
    for name in ("sum_gradients", "token_shares"):
        original = getattr(trainer.dist, name)

        def timed(*a, _original=original, **kw):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = _original(*a, **kw)
            if device.type == "cuda":
                torch.cuda.synchronize()
            spent.append(time.perf_counter() - t0)
            return out
        setattr(trainer.dist, name, timed)
    return spent


def environment(device) -> dict:
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
           "gpus": torch.cuda.device_count() if device.type == "cuda" else 0}
    from importlib.metadata import PackageNotFoundError, version

    for pkg in ("transformers", "peft", "bitsandbytes", "accelerate"):
        try:
            env[pkg] = version(pkg)
        except PackageNotFoundError:
            env[pkg] = None
    return env


# ------------------------------------------------------------------------------------------------ report


def report(args, runs: dict, device: str, elapsed: float) -> None:
    rows, base = [], None
    for n, r in runs.items():
        if "ranks" not in r:
            rows.append(f"| {n} | {r.get('error', 'no result')[:200]} |" + " |" * 9)
            continue
        ranks, time_s = r["ranks"], max(x["elapsed_s"] for x in r["ranks"])
        total = r["global_batch"] * r["iters"] / time_s
        per_process = [r["per_process_batch"] * r["iters"] / x["elapsed_s"] for x in ranks]
        r["episodes_per_s_total"], r["episodes_per_s_per_process"] = total, per_process
        base = total if n == 1 else base
        if n > 1 and base:
            r["scaling_efficiency"] = total / (n * base)
        mean = {k: sum(x[k] for x in ranks) / len(ranks) for k in ("rollout_s", "step_s", "forward_s", "optimize_s",
                                                                  "sync_s", "response_length")}
        peak = max((x["peak_gib"] or 0) for x in ranks)
        rows.append(f"| {n} | {r['per_process_batch']} | {r['global_batch']} | {time_s / r['iters']:.2f} | "
                    f"{mean['rollout_s']:.2f} | {mean['step_s']:.2f} | {mean['sync_s'] / r['iters']:.3f} | "
                    f"{', '.join(f'{x:.2f}' for x in per_process)} | **{total:.2f}** | "
                    f"{r.get('scaling_efficiency', 1.0) if n > 1 else 1.0:.2f} | "
                    + (f"{peak:.2f} |" if device == "cuda" else "- |"))
    env = next((r["env"] for r in runs.values() if "env" in r), {})
    cmd = "python3 benchmarks/scaling.py" + (" --quick" if args.quick else "")
    hardware = (f"{env.get('gpus', 0)} x {env.get('device')}" if device == "cuda"
                else f"CPU ({env.get('cpu_count')} cores, gloo)")
    model = "random tiny Qwen2 (hidden 64, 2 layers)" if args.quick else "random Qwen2-1.5B"
    lines = [
        "# Scaling: PPO on 1 vs 2 processes" + (" (--quick: tests the script on a CPU)" if args.quick else ""), "",
        f"`{cmd}` on {datetime.datetime.now().isoformat(timespec='seconds')}, {hardware}; torch {env.get('torch')}, "
        f"transformers {env.get('transformers')}, peft {env.get('peft')}, bitsandbytes {env.get('bitsandbytes')}, "
        f"accelerate {env.get('accelerate')}. Whole script: {elapsed:.0f} s.", "",
        f"{model}, NF4 4-bit + LoRA r=16 (q,k,v,o); per process {args.per_process_batch} prompts x {args.prompt_len} "
        f"tokens, {args.new_tokens} new tokens (T=0.7), minibatches of {args.mini_batch}, {args.ppo_epochs} PPO "
        f"epochs; {args.warmup} warm-up + {args.iters} timed iterations. Each row is one `accelerate launch "
        f"--num_processes N`; times are means over the timed iterations and the processes; sync = the gradient sums "
        "and token-share all-reduces, measured between synchronisations.", "",
        "| processes | batch per process | global batch | s / iteration | rollout s | step s | sync s / iter | "
        "episodes/s per process | episodes/s total | scaling efficiency | peak GiB per process |",
        "|---|---|---|---|---|---|---|---|---|---|---|", *rows, "",
        "Scaling efficiency = total episodes/s with N processes / (N x total episodes/s with 1 process): 1.00 is "
        "perfect weak scaling.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    name = "scaling-quick" if args.quick else "scaling"
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text)
    payload = {"command": cmd, "date": datetime.datetime.now().isoformat(timespec="seconds"), "hardware": hardware,
               "model": model, "args": {k: getattr(args, k) for k in DEFAULTS}, "elapsed_s": elapsed,
               "runs": {str(n): r for n, r in runs.items()}}
    out.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {out.with_suffix('.md')} and .json")


if __name__ == "__main__":
    main()
