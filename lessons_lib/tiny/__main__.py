"""`python -m lessons_lib.tiny build [--force] [--only NAME ...]` | `normalize-reward` | `measure [--samples N]` |
`where`: see lessons_lib/tiny/build.py."""

from __future__ import annotations

import argparse
import json
import sys
import time


def measure(samples: int, seed: int) -> dict:
    """SFT compliance (sampled at T=0.7 and greedy, in-distribution and held-out) and reward-model accuracy."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lessons_lib.data import load_instruction_data
    from lessons_lib.reward import RewardModel, evaluate_reward_model
    from lessons_lib.tiny import data_file, resolve
    from lessons_lib.tiny.datasets import read_jsonl
    from lessons_lib.tiny.measure import compliance_table, format_table, sample_responses

    import torch

    torch.set_num_threads(1)   # reproducible samples (and faster on a busy 2-core CPU)
    folder = resolve("tiny-qwen2-sft")
    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    tables = {}
    for split in ("eval_indist", "eval_heldout"):
        rows = read_jsonl(data_file(split))
        prompts = [r["instruction"] for r in rows]
        t = time.perf_counter()
        sampled = sample_responses(model, tokenizer, prompts, num_samples=samples, temperature=0.7, seed=seed)
        greedy = sample_responses(model, tokenizer, prompts, do_sample=False)
        print(f"{split}: {len(rows)} prompts x ({samples} sampled + 1 greedy) in {time.perf_counter() - t:.1f} s")
        tables[f"{split[5:]} T=0.7"] = compliance_table(rows, sampled)
        tables[f"{split[5:]} greedy"] = compliance_table(rows, greedy)
    for key in ("constraint", "strict", "refused"):
        print(f"\nSFT {key} rate (harmful rows: refusal rate)\n" + format_table(tables, key))
    rm = RewardModel.from_pretrained("tiny-qwen2-reward")
    rm_metrics = {}
    for split in ("preferences_val", "preferences_heldout"):
        m = evaluate_reward_model(rm, load_instruction_data(data_file(split)))
        rm_metrics[split] = {k: round(v, 4) for k, v in m.items() if k != "calibration"}
        print(f"reward model on {split}: " + ", ".join(f"{k} {v:.3f}" for k, v in rm_metrics[split].items()))
    return {"sft": tables, "reward": rm_metrics}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lessons_lib.tiny", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build the data, tokenizer, SFT model and reward model")
    build.add_argument("--force", action="store_true", help="rebuild everything, even what exists")
    build.add_argument("--only", nargs="+", metavar="NAME", help="just these models (e.g. tiny-qwen2-ppo)")
    sub.add_parser("normalize-reward", help="refit tiny-qwen2-reward's mean/std on the SFT policy's samples "
                                            "(only reward_model.json changes)")
    meas = sub.add_parser("measure", help="print SFT compliance and reward-model accuracy")
    meas.add_argument("--samples", type=int, default=4, help="sampled answers per prompt (T=0.7)")
    meas.add_argument("--seed", type=int, default=0)
    meas.add_argument("--json", help="also write the tables to this file")
    sub.add_parser("where", help="print the folder the tiny world lives in")
    args = parser.parse_args(argv)

    from lessons_lib.tiny import tiny_dir

    if args.command == "where":
        print(tiny_dir())
    elif args.command == "build":
        from lessons_lib.tiny.build import build_all

        t = time.perf_counter()
        times = build_all(force=args.force, only=args.only)
        for step, seconds in times.items():
            print(f"{step:<20} {seconds:7.1f} s")
        print(f"{'total':<20} {time.perf_counter() - t:7.1f} s  -> {tiny_dir()}")
    elif args.command == "normalize-reward":
        from lessons_lib.tiny.build import normalize_reward_model

        t = time.perf_counter()
        mean, std = normalize_reward_model()
        print(f"tiny-qwen2-reward normalisation: mean {mean:.4f}, std {std:.4f} "
              f"({time.perf_counter() - t:.1f} s) -> {tiny_dir() / 'tiny-qwen2-reward'}")
    elif args.command == "measure":
        result = measure(args.samples, args.seed)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
