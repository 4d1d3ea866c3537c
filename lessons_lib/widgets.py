"""An ipywidgets stepper that walks one PPO iteration, one click per step (lesson 04).

    from lessons_lib.widgets import PPOStepper
    stepper = PPOStepper(trainer)        # takes the next batch from trainer.dataloader
    stepper                              # shows the panel; click "Next step" (or call stepper.next())

The six steps are the trainer's own stage methods, in the order `trainer.step()` runs them:
generate -> score -> log-probs -> KL -> GAE -> update. Each shows the tensors it produced (shapes and the first
response token by token) and a sample of text. After "update" the next click starts a new iteration.
The button's description ("Next step") and tooltip are stable: browser tests find it by them.
"""

from __future__ import annotations

import html

import torch

NEXT_DESCRIPTION = "Next step"
NEXT_TOOLTIP = "Run the next step of the PPO iteration"
STAGES = ("generate", "score", "log-probs", "KL", "GAE", "update")


def _fmt(x) -> str:
    return f"{float(x):+.3f}"


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th style='padding:0 6px'>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td style='padding:0 6px;font-family:monospace'>{html.escape(str(c))}</td>"
                                    for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


class PPOStepper:
    """One PPO iteration, step by step, on `trainer` (see the module docstring)."""

    def __init__(self, trainer, batch: dict | None = None, generate_kwargs: dict | None = None, rows: int = 3):
        import ipywidgets as widgets

        self.trainer, self.rows = trainer, rows
        self.generate_kwargs = generate_kwargs or {}
        self.batch = batch
        self.stage = 0                      # index into STAGES of the step the next click runs
        self.state: dict = {}               # what the steps produced so far (queries, responses, rollout, stats)
        self.button = widgets.Button(description=NEXT_DESCRIPTION, tooltip=NEXT_TOOLTIP, button_style="primary",
                                     icon="step-forward")
        self.button.add_class("ppo-stepper-next")
        self.button.on_click(lambda _: self.next())
        self.header = widgets.HTML()
        self.output = widgets.HTML()
        self.widget = widgets.VBox([widgets.HBox([self.button, self.header]), self.output])
        self._render_header()

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)

    def _render_header(self) -> None:
        marks = [f"<b>[{name}]</b>" if i == self.stage else name for i, name in enumerate(STAGES)]
        self.header.value = (f"&nbsp;PPO step {self.trainer.current_step + 1}: " + " &rarr; ".join(marks))

    # ------------------------------------------------------------------------------------------ the steps
    def next(self) -> str:
        """Run the next step, show what it produced, and return its name."""
        name = STAGES[self.stage]
        body = getattr(self, "_" + name.replace("-", "_").lower())()
        self.output.value = f"<h4>{self.trainer.current_step if name == 'update' else self.trainer.current_step + 1}" \
                            f" &middot; {html.escape(name)}</h4>{body}"
        self.stage = (self.stage + 1) % len(STAGES)
        self._render_header()
        return name

    def run_all(self) -> dict:
        """Run the remaining steps of this iteration; returns the step's stats."""
        while True:
            if self.next() == "update":
                return self.state["stats"]

    def _generate(self) -> str:
        t = self.trainer
        batch = self.batch if self.batch is not None and not self.state.get("used_batch") else next(iter(t.dataloader))
        self.state = {"used_batch": True, "batch": batch, "queries": batch["input_ids"]}
        self.state["responses"] = t.generate(batch["input_ids"], return_prompt=False, generate_kwargs=self.generate_kwargs)
        texts = t.tokenizer.batch_decode(self.state["responses"][: self.rows], skip_special_tokens=True)
        lengths = [len(r) for r in self.state["responses"]]
        rows = [[q, r] for q, r in zip(t.prompt_texts(batch["input_ids"][: self.rows]), texts)]
        return (f"<p>{len(lengths)} responses sampled at temperature {t.sampling_temperature}, lengths "
                f"{min(lengths)}&ndash;{max(lengths)} tokens (each cut after its first EOS).</p>"
                + _table(["prompt", "response"], rows))

    def _score(self) -> str:
        t, s = self.trainer, self.state
        s["rewards"] = t.compute_reward(responses=s["responses"], queries=s["queries"])
        parts = t.last_reward_parts
        header = ["response", "score", *parts]
        texts = t.tokenizer.batch_decode(s["responses"][: self.rows], skip_special_tokens=True)
        rows = [[text[:60], _fmt(s["rewards"][i]), *(_fmt(p[i]) for p in parts.values())] for i, text in enumerate(texts)]
        return (f"<p>scores: shape {tuple(s['rewards'].shape)}, mean {_fmt(s['rewards'].mean())}</p>"
                + _table(header, rows))

    def _log_probs(self) -> str:
        t, s = self.trainer, self.state
        s["raw"] = t.check_scores(s["queries"], s["responses"], s["rewards"])
        roll = s["rollout"] = t.prepare_rollout(s["queries"], s["responses"])
        t.score_tokens(roll)
        roll.scores = t.final_scores(s["raw"], roll.has_eos)
        return (f"<p>queries {tuple(roll.query_ids.shape)} (left-padded), responses {tuple(roll.response_ids.shape)}"
                f" (right-padded); log-probs, reference log-probs, values: {tuple(roll.logprobs.shape)}. Final scores "
                f"(after the EOS trick): {', '.join(_fmt(x) for x in roll.scores[: self.rows])}</p>"
                + self._token_table(["logprob", "ref_logprob", "value"]))

    def _kl(self) -> str:
        t, roll = self.trainer, self.state["rollout"]
        t.kl_rewards(roll)
        kl_seq = roll.kl.sum(1)
        return (f"<p>beta = {t.kl_ctl.value:.4f} ({t.config.kl_estimator}); KL per response: mean "
                f"{_fmt(kl_seq.mean())}. The reward is -beta * KL on every token, plus the score on the last one.</p>"
                + self._token_table(["kl", "reward"]))

    def _gae(self) -> str:
        t, roll = self.trainer, self.state["rollout"]
        t.advantages(roll)
        return (f"<p>GAE with gamma = {t.config.gamma}, lambda = {t.config.lam}; advantages "
                f"{'whitened' if t.config.whiten_advantages else 'raw'}. returns = advantages (before whitening) + "
                f"values.</p>" + self._token_table(["value", "advantage", "return"]))

    def _update(self) -> str:
        t, s = self.trainer, self.state
        stats = t.update(s["rollout"])
        s["stats"] = t.finish_step(s["queries"], s["rollout"], s["raw"], stats)
        keys = ["objective/kl", "objective/scores", "ppo/loss/policy", "ppo/loss/value", "ppo/policy/approxkl",
                "ppo/policy/clipfrac", "ppo/val/explained_variance"]
        return (f"<p>{t.config.ppo_epochs} epochs x {t.config.num_mini_batches} minibatches = "
                f"{t.config.optimizer_steps_per_step} optimizer steps.</p>"
                + _table(["stat", "value"], [[k, f"{s['stats'][k]:.4f}"] for k in keys]))

    def _token_table(self, columns: list[str]) -> str:
        roll, tok = self.state["rollout"], self.trainer.tokenizer
        n = int(roll.response_mask[0].sum())
        names = {"logprob": roll.logprobs, "ref_logprob": roll.ref_logprobs, "value": roll.values, "kl": roll.kl,
                 "reward": roll.rewards, "advantage": roll.advantages, "return": roll.returns}
        rows = [[t, repr(tok.decode([int(roll.response_ids[0, t])])), *(_fmt(names[c][0, t]) for c in columns)]
                for t in range(n)]
        return "<p>first response, token by token:</p>" + _table(["t", "token", *columns], rows)


def shapes(rollout) -> dict[str, tuple]:
    """The shape of every tensor of a Rollout (for a quick look in a cell)."""
    return {k: tuple(v.shape) for k, v in vars(rollout).items() if isinstance(v, torch.Tensor)}
