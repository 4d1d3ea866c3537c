"""Train a reward model from a 4-bit backbone with lessons_lib.reward: the same code as the tiny world, on a GPU.

    python benchmarks/reward_model_gpu.py            # GPU: Qwen2-1.5B config, random weights, 8 pairs x 2 x 512 tokens
    python benchmarks/reward_model_gpu.py --quick    # CPU, tiny config, seconds: checks that every variant runs

Each variant runs in its own subprocess (clean peak memory) on the same randomly initialised weights, saved once
(speed and memory do not depend on the values). Per variant: `RewardModel.from_backbone(...)` (4-bit NF4 + double
quantization and LoRA r=16 on every linear layer, or bf16 + LoRA for scale), then `--warmup` Bradley-Terry steps
(not timed) and the median of `--steps` timed steps (forward of chosen and rejected together, backward, AdamW,
synchronised), then `train_reward_model` itself for a few steps (the library's loop, end to end) and a save/load
round trip of the adapters with the normalisation. Results: benchmarks/results/reward_model_gpu.md and .json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import common  # noqa: E402  (this checkout on sys.path, offline)

ROOT = common.REPO
QWEN2_1_5B = dict(common.QWEN2_1_5B, max_position_embeddings=32768)  # Qwen2-1.5B's own context length
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=1024)
VARIANTS = {  # name -> (description, from_backbone kwargs)
    "nf4_lora": ("NF4 4-bit + LoRA r=16 (all linears) + head", dict(load_in_4bit=True, lora_r=16)),
    "nf4_lora_gc": ("same + gradient checkpointing (non-reentrant)", dict(load_in_4bit=True, lora_r=16,
                                                                        gradient_checkpointing=True)),
    "bf16_lora": ("for scale: 16-bit backbone + LoRA r=16 + head", dict(lora_r=16)),
}


def pairs(n: int, seq_len: int, seed: int = 0) -> list[dict]:
    """Tiny-world preference pairs whose answers start with repeated sentences, to about `seq_len` tokens in all.

    The filler comes first, so the part that tells chosen from rejected is never cut by left truncation."""
    import random

    from lessons_lib.tiny.datasets import preference_rows

    rows = preference_rows(random.Random(seed), n)
    filler = "It is well known. " * max(0, (seq_len - 64) // 5)   # ~5 tokens per repeat in a byte-level BPE
    return [{**r, "chosen": filler + r["chosen"], "rejected": filler + r["rejected"]} for r in rows]


def run_variant(args) -> dict:
    import torch

    from lessons_lib.reward import RewardModel, RewardTrainingConfig, bradley_terry_loss, train_reward_model

    cuda = torch.cuda.is_available() and not args.quick
    if not cuda:
        torch.set_num_threads(1)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def gib(n):
        return n / 2**30

    kwargs = VARIANTS[args.variant][1]
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    rm = RewardModel.from_backbone(args.model_dir, max_length=args.seq_len, **kwargs)
    sync()
    load_s, load_gib = time.perf_counter() - t0, gib(torch.cuda.memory_allocated()) if cuda else float("nan")
    trainable = [p for p in rm.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    rows = pairs(args.batch * (args.steps + args.warmup), args.seq_len)
    rm.model.train()

    def step(batch):
        prompts = [r["prompt"] for r in batch]
        enc = rm.encode(prompts * 2, [r["chosen"] for r in batch] + [r["rejected"] for r in batch])
        r = rm.rewards(**enc)                                   # (2B,)
        loss = bradley_terry_loss(r[:len(batch)], r[len(batch):])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach(), enc["input_ids"].shape

    losses, times = [], []
    for k in range(args.warmup + args.steps):
        if k == args.warmup:
            sync()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        loss, shape = step(rows[k * args.batch:(k + 1) * args.batch])
        sync()
        if k >= args.warmup:
            times.append(time.perf_counter() - t)
        losses.append(loss.item())
    peak = gib(torch.cuda.max_memory_allocated()) if cuda else float("nan")
    # the library's own loop, end to end (includes fitting the normalisation on the training responses)
    t = time.perf_counter()
    history = train_reward_model(rm, rows[:args.batch * 4], config=RewardTrainingConfig(
        epochs=1, batch_size=args.batch, lr=1e-4, warmup_steps=1, progress=False))
    sync()
    loop_s = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as tmp:
        rm.save(tmp)
        reloaded = RewardModel.from_pretrained(tmp)
        probe = rows[:4]
        a = rm.score([r["prompt"] for r in probe], [r["chosen"] for r in probe])
        b = reloaded.score([r["prompt"] for r in probe], [r["chosen"] for r in probe])
        roundtrip = (a - b).abs().max().item()
    ms = 1000 * statistics.median(times)
    return dict(variant=args.variant, description=VARIANTS[args.variant][0], ms_per_step=ms,
                pairs_per_s=args.batch / (ms / 1000), tokens_per_s=shape[0] * shape[1] / (ms / 1000),
                sequences=list(shape), peak_gib=peak, load_gib=load_gib, load_s=load_s,
                trainable_params=sum(p.numel() for p in trainable), first_loss=losses[0], last_loss=losses[-1],
                library_loop_s=loop_s, library_loop_steps=len(history["loss"]), normalisation=[rm.mean, rm.std],
                save_load_max_diff=roundtrip)


def save_model(model_dir: Path, quick: bool) -> None:
    """Random weights of the configuration plus a small tokenizer, saved once (~20 s on the GPU in bf16)."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from lessons_lib.models import save_random_model

    if (model_dir / "config.json").exists():
        return
    if quick:
        save_random_model(model_dir, "qwen2", **TINY)
        return
    save_random_model(model_dir, "qwen2", **TINY)             # for its tokenizer files; the weights are replaced
    for f in model_dir.glob("model*.safetensors"):
        f.unlink()
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(Qwen2Config(**QWEN2_1_5B, pad_token_id=0, eos_token_id=2),
                                                 dtype=torch.bfloat16)
    model.save_pretrained(model_dir)


def render(results: list[dict], meta: dict) -> str:
    lines = [f"# Reward model training step, Bradley-Terry ({meta['config']})", "",
             f"- command: `{meta['command']}`", f"- date: {meta['date']}", f"- hardware: {meta['hardware']}",
             f"- {meta['batch']} pairs per step (chosen and rejected in one forward: {2 * meta['batch']} sequences of "
             f"up to {meta['seq_len']} tokens), warm-up {meta['warmup']}, median of {meta['steps']} timed steps; "
             "peak = torch.cuda.max_memory_allocated over the timed steps", "",
             "| variant | ms/step | pairs/s | tokens/s | peak GiB | after load GiB | trainable | loss first → last "
             "| library loop | save/load max diff |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['description']} | failed: {r['error'][:150]} | | | | | | | | |")
            continue
        lines.append(f"| {r['description']} | {r['ms_per_step']:.1f} | {r['pairs_per_s']:.1f} | "
                     f"{r['tokens_per_s']:,.0f} | {r['peak_gib']:.2f} | {r['load_gib']:.2f} | "
                     f"{r['trainable_params']:,} | {r['first_loss']:.3f} → {r['last_loss']:.3f} | "
                     f"{r['library_loop_steps']} steps in {r['library_loop_s']:.1f} s | {r['save_load_max_diff']:.2g} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny config on CPU, a few steps: checks the script")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    parser.add_argument("--batch", type=int, default=None, help="pairs per step")
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--model-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None, help="results path without extension")
    parser.add_argument("--variant", help=argparse.SUPPRESS)   # internal: run one variant, print its JSON
    args = parser.parse_args(argv)
    quick = args.quick
    args.batch = args.batch or (2 if quick else 8)
    args.seq_len = args.seq_len or (64 if quick else 512)
    args.steps = args.steps or (2 if quick else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if quick else 3)
    args.model_dir = args.model_dir or Path("/tmp") / ("reward_tiny" if quick else "reward_qwen2_1.5b")
    if args.variant:
        print("RESULT " + json.dumps(run_variant(args)))
        return 0

    save_model(args.model_dir, quick)
    results = []
    for name in args.variants.split(","):
        if name not in VARIANTS:
            parser.error(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
        cmd = [sys.executable, __file__, "--variant", name, "--batch", str(args.batch), "--seq-len", str(args.seq_len),
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--model-dir", str(args.model_dir)]
        cmd += ["--quick"] if quick else []
        print(f"== {name}: {VARIANTS[name][0]}", flush=True)
        env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **os.environ, "TOKENIZERS_PARALLELISM": "false"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            results.append(dict(variant=name, description=VARIANTS[name][0], error=tail[0]))
            print("   failed:\n" + "\n".join(proc.stderr.strip().splitlines()[-15:]), flush=True)
            continue
        results.append(json.loads(line[len("RESULT "):]))
        r = results[-1]
        print(f"   {r['ms_per_step']:.1f} ms/step, {r['pairs_per_s']:.1f} pairs/s, peak {r['peak_gib']:.2f} GiB, "
              f"loss {r['first_loss']:.3f} → {r['last_loss']:.3f}", flush=True)

    import torch

    hardware = torch.cuda.get_device_name(0) if torch.cuda.is_available() and not quick else f"CPU ({os.cpu_count()})"
    meta = dict(command="python " + " ".join([Path(__file__).relative_to(ROOT).as_posix(), *(argv or sys.argv[1:])]),
                date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), hardware=hardware,
                config="tiny Qwen2 config (--quick, CPU)" if quick else "Qwen2-1.5B config, random weights",
                batch=args.batch, seq_len=args.seq_len, steps=args.steps, warmup=args.warmup)
    table = render(results, meta)
    print("\n" + table)
    out = args.out or ROOT / "benchmarks" / "results" / ("reward_model_gpu_quick" if quick else "reward_model_gpu")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(table)
    out.with_suffix(".json").write_text(json.dumps(dict(meta=meta, results=results), indent=1))
    print(f"wrote {out.with_suffix('.md')} and .json")
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
