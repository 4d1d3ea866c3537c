"""The learner tools around PPO: plots of the training stats and the step-by-step widget."""

import pytest
import torch

from lessons_lib import plots
from lessons_lib.ppo import PPOConfig, PPOTrainer
from lessons_lib.widgets import NEXT_DESCRIPTION, NEXT_TOOLTIP, STAGES, PPOStepper, shapes
from test_ppo_helpers import letter_reward, make_dataset, make_policy, make_tokenizer


def fake_history(n=7):
    g = torch.Generator().manual_seed(0)
    keys = {k for _, ks in plots.PANELS for k in ks}
    return [{k: float(torch.randn(1, generator=g)) for k in keys} for _ in range(n)]


def test_plot_stats_draws_every_panel():
    history = fake_history()
    fig = plots.plot_stats(history, smooth=3, title="run")
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert len(axes) == len(plots.PANELS)
    for ax, (_, keys) in zip(axes, plots.PANELS):
        assert len(ax.lines) == len(keys) and len(ax.lines[0].get_xdata()) == 7
    smoothed = axes[0].lines[0].get_ydata()
    raw = [h["objective/scores"] for h in history]
    assert smoothed[2] == pytest.approx(sum(raw[:3]) / 3) and smoothed[6] == pytest.approx(sum(raw[4:7]) / 3)
    with pytest.raises(ValueError, match="empty"):
        plots.plot_stats([])


def test_live_plot_and_compare_runs():
    live = plots.LivePlot(every=2)
    for stats in fake_history(4):
        live.update(stats)
    assert len(live.history) == 4 and live.figure.axes
    fig = plots.compare_runs({"a": fake_history(3), "b": fake_history(5)}, "objective/kl")
    assert [len(line.get_xdata()) for line in fig.axes[0].lines] == [3, 5]


def test_stepper_walks_one_iteration_like_step():
    tok = make_tokenizer()
    cfg = PPOConfig(batch_size=8, mini_batch_size=4, ppo_epochs=1, max_new_tokens=5, progress=False)
    trainer = PPOTrainer(cfg, model=make_policy(tok), tokenizer=tok, dataset=make_dataset(),
                         reward_fns=[(letter_reward, 1.0)])
    stepper = PPOStepper(trainer, generate_kwargs={"max_new_tokens": 5})
    assert stepper.button.description == NEXT_DESCRIPTION and stepper.button.tooltip == NEXT_TOOLTIP
    seen = []
    for _ in STAGES:
        seen.append(stepper.next())
        assert seen[-1] in stepper.output.value
    assert tuple(seen) == STAGES
    assert trainer.current_step == 1 and "objective/kl" in stepper.state["stats"]
    roll = stepper.state["rollout"]
    assert shapes(roll)["advantages"] == tuple(roll.response_mask.shape)
    assert "token by token" in stepper.output.value or "ppo/loss/value" in stepper.output.value
    stepper.button.click()                     # a click runs the next step: a new iteration starts
    assert stepper.stage == 1 and stepper.state["queries"] is not None
    stats = stepper.run_all()
    assert trainer.current_step == 2 and stats["ppo/policy/clipfrac"] >= 0
