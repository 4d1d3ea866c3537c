"""PPOTrainer on two CPU processes (gloo) against one process: same global batch, same result.

One `torchrun --nproc_per_node 2` launch of this file (`worker`, at the bottom) runs every scenario and saves what
each process saw; the tests replay the same global batches in this process with one `PPOTrainer` and compare:

- fixed queries/responses/scores, one minibatch per optimizer step: parameters and every statistic equal;
- several minibatches and gradient accumulation: equal to one process that updates on the same minibatches (the
  union of the processes' minibatches; the reference gets that order through `torch.randperm`);
- the full loop (sharded dataloader, per-process sampling seeds, dynamic difficulty, rule rewards): the union of
  the processes' prompts is the one-process batch, the samplers stay identical, parameters and stats equal;
- checkpoints: written once; resumed on two processes the run continues exactly; resumed on one process it equals
  the one-process replay; a NaN reward, or a NaN loss, on one process stops both.
Rollouts differ by design between one and two processes (different sampling seeds), so the replays feed the
two-process responses to the one-process trainer.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_ppo_helpers import letter_reward, make_dataset, make_policy, make_tokenizer  # noqa: E402

WORLD = 2
FIXED = dict(batch_size=8, mini_batch_size=8, ppo_epochs=2, learning_rate=1e-2, max_new_tokens=10, progress=False,
             whiten_rewards=True, score_norm=True, adaptive_kl=True, kl_target=0.05, kl_horizon=100.0)
MINIBATCHES = dict(FIXED, batch_size=16, mini_batch_size=4, gradient_accumulation_steps=2)
LOOP = dict(batch_size=8, mini_batch_size=4, ppo_epochs=2, learning_rate=1e-2, max_new_tokens=8, progress=False)
SCENARIOS = {"fixed": FIXED, "minibatches": MINIBATCHES, "full_finetuning": dict(FIXED, learning_rate=1e-3)}
WITHOUT_LORA = {"full_finetuning"}      # every weight trained; the reference is a frozen copy
STEPS = 2
RTOL, ATOL = 1e-4, 2e-5          # fp32: the processes sum in another order than one process


def config(values):
    from lessons_lib.ppo import PPOConfig

    return PPOConfig(**values)


def fixed_batch(tok, size: int, step: int):
    """Global (queries, responses, scores) of uneven lengths, some responses with an EOS in the middle."""
    g = torch.Generator().manual_seed(1000 + step)
    low, high = 4, len(tok)                                  # ordinary tokens (the special ones come first)
    queries = [torch.randint(low, high, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g)
               for _ in range(size)]
    responses = []
    for i in range(size):
        r = torch.randint(low, high, (int(torch.randint(1, 11, (1,), generator=g)),), generator=g)
        if i % 3 == 0 and len(r) > 2:
            r[len(r) // 2] = tok.eos_token_id
        responses.append(r)
    return queries, responses, torch.randn(size, generator=g)


def trainable(trainer) -> dict:
    value = trainer.value_head if trainer.value_head is not None else trainer.critic
    named = [(f"policy.{n}", p) for n, p in trainer.model.named_parameters() if p.requires_grad]
    named += [(f"value.{n}", p) for n, p in value.named_parameters()]
    return {n: p.detach().clone() for n, p in named}


def without_times(stats: dict) -> dict:
    return {k: v for k, v in stats.items() if not k.startswith("time/")}


# ------------------------------------------------------------------------------------------ the two processes

def worker(out: Path) -> None:
    from lessons_lib.ppo import NonFiniteError, PPOTrainer

    torch.set_num_threads(1)
    tok = make_tokenizer()
    trainer = None
    result = {}
    for name, values in SCENARIOS.items():
        trainer = PPOTrainer(config(values), model=make_policy(tok, seed=0, lora=name not in WITHOUT_LORA),
                             tokenizer=tok)
        rank, n = trainer.dist.rank, values["batch_size"] // WORLD
        stats = []
        for step in range(STEPS):
            queries, responses, scores = fixed_batch(tok, values["batch_size"], step)
            mine = slice(rank * n, (rank + 1) * n)
            stats.append(trainer.step(queries[mine], responses[mine], rewards=scores[mine]))
        result[name] = {"stats": stats, "params": trainable(trainer)}

    # the full loop: sharded dataloader, per-process sampling, rule rewards, dynamic difficulty, checkpoints
    trainer = PPOTrainer(config(LOOP), model=make_policy(tok, seed=0), tokenizer=tok, dataset=make_dataset(),
                         reward_fns=[(letter_reward, 1.0)])
    dist = trainer.dist
    loop = {"seed": torch.initial_seed(), "steps": [], "world": dist.world_size}

    def one_step():
        batch = next(iter(trainer.dataloader))
        responses = trainer.generate(batch["input_ids"], return_prompt=False)
        rewards = trainer.compute_reward(responses=responses, queries=batch["input_ids"])
        stats = trainer.step(batch["input_ids"], responses, rewards=rewards)
        everyone = dist.gather_objects((batch["prompt_id"], [r.tolist() for r in responses], rewards.tolist()))
        return {"prompt_ids": [p for part in everyone for p in part[0]],
                "responses": [r for part in everyone for r in part[1]],
                "rewards": [x for part in everyone for x in part[2]], "stats": stats}

    loop["steps"].append(one_step())
    trainer.dataloader.sampler.set_difficulty("hard", "reward_based")
    loop["steps"].append(one_step())
    loop["checkpoint"] = trainer.save_checkpoint(out / "checkpoint")
    loop["params_at_checkpoint"] = trainable(trainer)
    loop["steps"].append(one_step())
    loop["params"] = trainable(trainer)
    loop["sampler"] = trainer.dataloader.sampler.state_dict()

    resumed = trainer = PPOTrainer.from_checkpoint(out / "checkpoint", make_policy(tok, seed=0), tok,
                                                   dataset=make_dataset(), reward_fns=[(letter_reward, 1.0)])
    loop["resumed_step"] = one_step()
    loop["resumed_params"] = trainable(resumed)

    queries, responses, scores = fixed_batch(tok, LOOP["batch_size"], 0)   # NaN on process 1 only: both stop
    if dist.rank == 1:
        scores[4] = float("nan")
    try:
        n = LOOP["batch_size"] // WORLD
        resumed.step(queries[:n], responses[:n], rewards=scores[dist.rank * n:(dist.rank + 1) * n])
        loop["nan"] = "no error"
    except NonFiniteError as err:
        loop["nan"] = str(err)

    queries, responses, scores = fixed_batch(tok, LOOP["batch_size"], 1)   # a NaN loss on process 1 only
    if dist.rank == 1:
        original, calls = resumed._minibatch_loss, []

        def poisoned(roll, idx):
            loss, stats = original(roll, idx)
            calls.append(1)
            return (loss * float("nan") if len(calls) == 2 else loss), stats
        resumed._minibatch_loss = poisoned
    before = trainable(resumed)
    try:
        n = LOOP["batch_size"] // WORLD
        resumed.step(queries[:n], responses[:n], rewards=scores[dist.rank * n:(dist.rank + 1) * n])
        loop["nan_loss"] = "no error"
    except NonFiniteError as err:
        loop["nan_loss"] = str(err)
    loop["nan_loss_changed"] = {k: not torch.equal(v, before[k]) for k, v in trainable(resumed).items()}
    result["loop"] = loop
    result["fsdp"] = fsdp_probe(tok, dist.rank)
    result["mismatch"] = mismatched_models(tok, dist)
    torch.save(result, out / f"rank{dist.rank}.pt")


def mismatched_models(tok, dist) -> dict:
    """Adapters initialised differently per process: a warning, then process 0's everywhere. Different base
    weights: an error on every process."""
    import warnings

    from lessons_lib.ppo import PPOTrainer

    model = make_policy(tok, seed=0)
    torch.manual_seed(dist.rank)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data.normal_()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        PPOTrainer(config(FIXED), model=model, tokenizer=tok)
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    out = {"warnings": [str(w.message) for w in caught if "differed between processes" in str(w.message)],
           "lora": dist.gather_objects(sum(float(p.sum()) for p in lora))}
    try:
        PPOTrainer(config(FIXED), model=make_policy(tok, seed=dist.rank), tokenizer=tok)
        out["different_base"] = "accepted"
    except ValueError as err:
        out["different_base"] = str(err)
    return out


def fsdp_probe(tok, rank: int) -> dict:
    """docs/SCALING.md "Larger than one GPU": FSDP2's building blocks work on a peft LoRA model (forward, backward,
    the reference pass under disable_adapter, generate with synced_gpus), and PPOTrainer refuses a sharded model."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from lessons_lib.ppo import PPOTrainer

    model = make_policy(tok, seed=0)
    mesh = init_device_mesh("cpu", (WORLD,))
    for layer in model.get_base_model().model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    ids = torch.randint(4, len(tok), (2, 7), generator=torch.Generator().manual_seed(rank))
    model(input_ids=ids).logits.float().logsumexp(-1).mean().backward()
    lora = [p for p in model.parameters() if p.requires_grad]
    probe = {"lora_tensors": len(lora), "sharded_grads": sum(type(p.grad).__name__ == "DTensor" for p in lora)}
    with model.disable_adapter(), torch.no_grad():
        probe["reference_logits"] = tuple(model(input_ids=ids).logits.shape)
    with torch.no_grad():   # a different length per process: synced_gpus keeps the collectives in step
        out = model.generate(input_ids=ids[:, :3], max_new_tokens=3 + 2 * rank, min_new_tokens=3 + 2 * rank,
                             do_sample=True, synced_gpus=True, pad_token_id=tok.pad_token_id)
    probe["generated"] = out.shape[1] - 3
    try:
        PPOTrainer(config(FIXED), model=model, tokenizer=tok)
        probe["trainer"] = "accepted"
    except NotImplementedError as err:
        probe["trainer"] = str(err)
    return probe


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """Run `worker` on two processes with torchrun, once per test session (pytest-xdist workers share the run
    through a file lock); returns ([rank 0 results, rank 1 results], output folder)."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent                              # this session's folder, shared by its xdist workers
    out = root / "ppo_distributed"
    with FileLock(str(root / "ppo_distributed.lock")):
        if not (out / "done").exists():
            out.mkdir(exist_ok=True)
            launch(out)
            (out / "done").touch()
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)], out


def launch(out: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": os.pathsep.join(sys.path)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD),
           __file__, str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"two-process run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


def assert_stats_equal(got: dict, want: dict, what: str):
    got, want = without_times(got), without_times(want)
    assert set(got) == set(want), f"{what}: keys differ: {set(got) ^ set(want)}"
    # A clip fraction counts tokens on one side of a threshold: a token within rounding of it may flip
    # (1 token of a ~20-token minibatch, averaged over 8 minibatches, moves the mean by ~0.006).
    atol = {k: 0.01 if k.endswith("clipfrac") else ATOL for k in want}
    bad = {k: (got[k], want[k]) for k in want
           if not torch.isclose(torch.tensor(got[k]), torch.tensor(want[k]), rtol=RTOL, atol=atol[k])}
    assert not bad, f"{what}: statistics differ from one process (two processes, one process): {bad}"


def assert_params_equal(got: dict, want: dict, what: str):
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}, {name}: {m}")


def union_order(monkeypatch, trainer, world: int = WORLD):
    """Make `trainer`'s minibatch shuffle give the union of the processes' minibatches: every process draws
    p = randperm(B / N) from the same generator and takes p[k*mb_l:(k+1)*mb_l] of its own rows. Other users of
    torch.randperm (the prompt sampler) are left alone."""
    real_randperm, local_mb = torch.randperm, trainer.config.mini_batch_size // world

    def randperm(n, generator=None, **kwargs):
        if generator is not trainer.shuffle_generator:
            return real_randperm(n, generator=generator, **kwargs)
        local = n // world
        p = real_randperm(local, generator=generator, **kwargs)
        return torch.cat([r * local + p[k:k + local_mb] for k in range(0, local, local_mb) for r in range(world)])
    monkeypatch.setattr(torch, "randperm", randperm)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_two_processes_equal_one_on_the_same_global_batch(launched, name, monkeypatch):
    from lessons_lib.ppo import PPOTrainer

    results, _ = launched
    values = SCENARIOS[name]
    tok = make_tokenizer()
    lora = name not in WITHOUT_LORA
    reference = PPOTrainer(config(values), model=make_policy(tok, seed=0, lora=lora), tokenizer=tok)
    union_order(monkeypatch, reference)
    for step in range(STEPS):
        queries, responses, scores = fixed_batch(tok, values["batch_size"], step)
        stats = reference.step(queries, responses, rewards=scores)
        for rank in range(WORLD):
            assert_stats_equal(results[rank][name]["stats"][step], stats, f"{name}, step {step + 1}, process {rank}")
    want = trainable(reference)
    for rank in range(WORLD):
        assert_params_equal(results[rank][name]["params"], want, f"{name}, process {rank}")
    # the update changed the weights (so equality is not trivial)
    start = trainable(PPOTrainer(config(values), model=make_policy(tok, seed=0, lora=lora), tokenizer=tok))
    assert max(float((want[k] - start[k]).abs().max()) for k in want) > 1e-3


def replay(trainer, recorded: dict) -> dict:
    """One step of the one-process trainer on the two processes' global batch (their responses and rewards)."""
    batch = next(iter(trainer.dataloader))
    assert batch["prompt_id"] == recorded["prompt_ids"], "the processes' slices are not the one-process batch"
    responses = [torch.tensor(r, dtype=torch.long) for r in recorded["responses"]]
    rewards = trainer.compute_reward(responses=responses, queries=batch["input_ids"])
    torch.testing.assert_close(rewards, torch.tensor(recorded["rewards"]))
    return trainer.step(batch["input_ids"], responses, rewards=rewards)


def loop_trainer(tok):
    from lessons_lib.ppo import PPOTrainer

    return PPOTrainer(config(LOOP), model=make_policy(tok, seed=0), tokenizer=tok, dataset=make_dataset(),
                      reward_fns=[(letter_reward, 1.0)])


def test_full_loop_shards_prompts_and_keeps_samplers_identical(launched, monkeypatch):
    results, _ = launched
    loops = [r["loop"] for r in results]
    from lessons_lib.ppo.distributed import sampling_seed

    assert [lp["seed"] for lp in loops] == [sampling_seed(0, r) for r in range(WORLD)]    # per-process seeds
    for lp in loops[1:]:                                  # every process holds the same sampler and statistics
        a, b = lp["sampler"], loops[0]["sampler"]
        assert torch.equal(a.pop("generator"), b.pop("generator")) and a == b, "the processes' samplers drifted apart"
        for a, b in zip(lp["steps"], loops[0]["steps"]):
            assert a["prompt_ids"] == b["prompt_ids"] and without_times(a["stats"]) == without_times(b["stats"])
    tok = make_tokenizer()
    reference = loop_trainer(tok)
    union_order(monkeypatch, reference)
    for i, recorded in enumerate(loops[0]["steps"]):
        if i == 1:
            reference.dataloader.sampler.set_difficulty("hard", "reward_based")
        stats = replay(reference, recorded)
        assert_stats_equal(recorded["stats"], stats, f"loop step {i + 1}")
    assert len(set(loops[0]["steps"][0]["prompt_ids"])) == LOOP["batch_size"]   # uniform draw: disjoint slices
    assert_sampler_stats_close(reference.dataloader.sampler.state_dict()["stats"], loops[0]["sampler"]["stats"])
    assert_params_equal(loops[0]["params"], trainable(reference), "loop")


def assert_sampler_stats_close(a: dict, b: dict) -> None:
    assert set(a) == set(b), "the samplers saw different prompts"
    for k in a:
        assert a[k]["count"] == b[k]["count"]
        for field in ("reward", "entropy"):
            assert abs(a[k][field] - b[k][field]) < 1e-4, (k, field, a[k], b[k])


def test_checkpoint_written_once_and_resumed_on_two_or_one_process(launched, monkeypatch):
    from lessons_lib.ppo import PPOTrainer

    results, out = launched
    loops = [r["loop"] for r in results]
    folder = Path(loops[0]["checkpoint"])
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint"]   # no leftovers
    state = torch.load(folder / "state.pt", weights_only=False)
    assert len(state["rng_by_rank"]) == WORLD and state["step"] == 2
    # two processes, resumed: step 3 again, exactly as the uninterrupted run (same responses: RNG restored)
    for lp in loops:
        assert lp["resumed_step"]["responses"] == lp["steps"][2]["responses"]
        assert without_times(lp["resumed_step"]["stats"]) == without_times(lp["steps"][2]["stats"])
        assert_params_equal(lp["resumed_params"], lp["params"], "resumed on two processes")
    # one process, resumed from the two-process checkpoint: the same state, and step 3 replayed gives the same result
    tok = make_tokenizer()
    single = PPOTrainer.from_checkpoint(folder, make_policy(tok, seed=0), tok, dataset=make_dataset(),
                                        reward_fns=[(letter_reward, 1.0)])
    assert_params_equal(trainable(single), loops[0]["params_at_checkpoint"], "resumed on one process")
    union_order(monkeypatch, single)
    stats = replay(single, loops[0]["steps"][2])
    assert_stats_equal(loops[0]["steps"][2]["stats"], stats, "step 3 after resuming on one process")


def test_a_nan_reward_on_one_process_stops_both(launched):
    results, _ = launched
    for rank, r in enumerate(results):
        assert "non-finite reward" in r["loop"]["nan"] and "[4]" in r["loop"]["nan"], (rank, r["loop"]["nan"])


def test_a_nan_loss_on_one_process_stops_both_at_the_same_optimizer_step(launched):
    """Process 1's second minibatch loss is NaN: its count rides along with the gradient sum, so both processes stop
    before that optimizer step (the first one, on finite losses, was applied on both)."""
    results, _ = launched
    messages = [r["loop"]["nan_loss"] for r in results]
    assert "non-finite loss on another process in PPO epoch 1" in messages[0], messages[0]
    assert "non-finite loss in PPO epoch 1, minibatch 2" in messages[1], messages[1]
    assert results[0]["loop"]["nan_loss_changed"] == results[1]["loop"]["nan_loss_changed"]
    assert any(results[0]["loop"]["nan_loss_changed"].values())      # the first optimizer step was taken


def test_fsdp_building_blocks_work_and_the_trainer_refuses_a_sharded_model(launched):
    results, _ = launched
    for rank, r in enumerate(results):
        probe = r["fsdp"]
        assert probe["sharded_grads"] == probe["lora_tensors"] == 16
        assert probe["reference_logits"] == (2, 7, len(make_tokenizer()))
        assert probe["generated"] == 3 + 2 * rank
        assert "not supported" in probe["trainer"] and "docs/SCALING.md" in probe["trainer"]


def test_processes_start_from_process_0s_weights_and_refuse_different_models(launched):
    results, _ = launched
    for r in results:
        mismatch = r["mismatch"]
        assert len(mismatch["warnings"]) == 1 and "process 0's are used" in mismatch["warnings"][0]
        assert mismatch["lora"][0] == mismatch["lora"][1]          # broadcast from process 0
        assert "the frozen weights differ between process 0 and process(es) [1]" in mismatch["different_base"]


def test_sizes_must_divide_among_processes():
    from lessons_lib.ppo import PPOConfig
    from lessons_lib.ppo.distributed import DistributedContext

    ctx = DistributedContext(rank=0, world_size=3, device=torch.device("cpu"))
    with pytest.raises(ValueError, match=r"mini_batch_size \(4\) must be a multiple of the number of processes \(3\)"):
        ctx.check_config(PPOConfig(batch_size=8, mini_batch_size=4))
    DistributedContext(rank=0, world_size=2, device=torch.device("cpu")).check_config(PPOConfig(batch_size=8,
                                                                                                mini_batch_size=4))


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
