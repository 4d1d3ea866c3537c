"""The measured win of PPO on the tiny world (docs/PPO.md, "The measured win").

PPO from `tiny-qwen2-sft` with `tiny-qwen2-reward` (lessons_lib.ppo.tiny's recipe), then the tiny world's rule
checkers on HELD-OUT prompts (unseen (family, topic) combinations and unseen harmful acts), each answered 4 times
at temperature 0.7: constraint compliance, refusal of harmful requests, over-refusal of benign ones, per family,
SFT vs PPO; plus the KL to the SFT model at the end of training and the wall time.

    python scripts/tiny_ppo_win.py                    # one seed; tables on stdout, JSON in runs/tiny_ppo_win.json
    python scripts/tiny_ppo_win.py --seeds 0 1 2      # the spread over seeds
    python scripts/tiny_ppo_win.py --save out/ppo     # also save the trained policy (merged) there

Wall-clock times depend on the machine and on what else runs on it; the compliance numbers do not.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SUMMARY = [("held-out constraint compliance", "heldout", "overall", "constraint"),
           ("held-out benign constraint compliance", "heldout", "benign", "constraint"),
           ("held-out refusal of harmful requests", "heldout", "harmful", "refused"),
           ("held-out over-refusal of benign requests", "heldout", "benign", "refused"),
           ("in-distribution constraint compliance", "indist", "overall", "constraint"),
           ("in-distribution refusal of harmful requests", "indist", "harmful", "refused")]


def evaluate(model, tokenizer, samples: int, seed: int) -> dict:
    """Compliance tables on the held-out and in-distribution evaluation prompts."""
    from lessons_lib.tiny import data_file
    from lessons_lib.tiny.datasets import read_jsonl
    from lessons_lib.tiny.measure import compliance_table, sample_responses

    out = {}
    for split, name in (("eval_heldout", "heldout"), ("eval_indist", "indist")):
        rows = read_jsonl(data_file(split))
        answers = sample_responses(model, tokenizer, [r["instruction"] for r in rows], num_samples=samples,
                                   temperature=0.7, max_new_tokens=64, seed=seed)
        out[name] = compliance_table(rows, answers)
    return out


def mean(values):
    return sum(values) / len(values)


def family_table(before: dict, afters: list[dict], split: str = "heldout") -> str:
    families = [f for f in before[split] if f not in ("benign", "overall")] + ["benign", "overall"]
    lines = [f"{'family':<11}{'SFT':>8}{'PPO':>8}{'change':>9}   (constraint compliance, {split}; harmful: refusal)"]
    for f in families:
        key = "refused" if f == "harmful" else "constraint"
        sft = before[split][f][key]
        ppo = mean([a[split][f][key] for a in afters])
        lines.append(f"{f:<11}{sft:>8.2f}{ppo:>8.2f}{ppo - sft:>+9.2f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=None, help="PPO steps (default: the recipe's)")
    parser.add_argument("--samples", type=int, default=4, help="answers per evaluation prompt")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--lora-r", type=int, default=None, help="0: full fine-tuning")
    parser.add_argument("--kl-coef", type=float, default=None)
    parser.add_argument("--rule-weight", type=float, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="runs/tiny_ppo_win.json")
    parser.add_argument("--save", default=None, help="save the (first seed's) trained policy, merged, here")
    args = parser.parse_args(argv)

    import torch

    from lessons_lib.models import load_model
    from lessons_lib.tiny import tiny_dir
    from lessons_lib.ppo.tiny import TinyRecipe, merged_policy, train_tiny_ppo

    torch.set_num_threads(args.threads)
    print(f"tiny world: {tiny_dir()}; torch threads: {args.threads}", flush=True)
    sft, tokenizer = load_model("tiny-qwen2-sft", load_in_4bit=False)
    t0 = time.perf_counter()
    before = evaluate(sft, tokenizer, args.samples, seed=1234)
    eval_seconds = time.perf_counter() - t0
    del sft
    runs = []
    for seed in args.seeds:
        recipe = TinyRecipe()
        changes = {"seed": seed, "progress": sys.stderr.isatty()}
        if args.lr is not None:
            changes["learning_rate"] = args.lr
        if args.kl_coef is not None:
            changes["kl_coef"] = args.kl_coef
        recipe.config = recipe.config.replace(**changes)
        if args.steps is not None:
            recipe.steps = args.steps
        if args.lora_r is not None:
            recipe.lora_r = args.lora_r or None
        if args.rule_weight is not None:
            recipe.rule_weight = args.rule_weight
        torch.manual_seed(seed)
        start, cpu_start = time.perf_counter(), time.process_time()
        trainer, history = train_tiny_ppo(recipe)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        after = evaluate(trainer.model, tokenizer, args.samples, seed=1234)
        last = history[-10:]
        runs.append({"seed": seed, "ppo_seconds": seconds, "ppo_cpu_seconds": cpu_seconds, "steps": len(history),
                     "after": after,
                     "final_kl": mean([s["objective/kl"] for s in last]),
                     "final_score": mean([s["objective/scores"] for s in last]),
                     "history": history})
        print(f"seed {seed}: {len(history)} PPO steps in {seconds:.0f} s ({cpu_seconds:.0f} s of CPU time on "
              f"{args.threads} thread(s)); KL to SFT over the last 10 steps "
              f"{runs[-1]['final_kl']:.2f} nats/response; RM score {history[0]['objective/scores']:+.2f} -> "
              f"{runs[-1]['final_score']:+.2f}", flush=True)
        if args.save and seed == args.seeds[0]:
            merged_policy(trainer).save_pretrained(args.save)
            tokenizer.save_pretrained(args.save)
    afters = [r["after"] for r in runs]
    print()
    print(family_table(before, afters, "heldout"))
    print()
    print(f"{'':<45}{'SFT':>8}{'PPO':>8}   (PPO: mean over {len(runs)} seed(s), {args.samples} samples at T=0.7)")
    for label, split, family, key in SUMMARY:
        values = [a[split][family][key] for a in afters]
        spread = f"  [{min(values):.2f}, {max(values):.2f}]" if len(values) > 1 else ""
        print(f"{label:<45}{before[split][family][key]:>8.2f}{mean(values):>8.2f}{spread}")
    print(f"{'KL to SFT, last 10 steps (nats / response)':<45}{'':>8}{mean([r['final_kl'] for r in runs]):>8.2f}")
    print(f"{'PPO wall time (s)':<45}{'':>8}{mean([r['ppo_seconds'] for r in runs]):>8.0f}")
    print(f"{'PPO CPU time (s)':<45}{'':>8}{mean([r['ppo_cpu_seconds'] for r in runs]):>8.0f}")
    print(f"(evaluation of one model: {eval_seconds:.0f} s; load average now {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} cores: wall times grow with it)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": " ".join(["python", "scripts/tiny_ppo_win.py", *(argv or sys.argv[1:])]),
                               "torch_threads": args.threads, "load_average_at_end": os.getloadavg(),
                               "before": before, "runs": runs}, indent=1) + "\n")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
