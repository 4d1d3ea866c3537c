"""Instruction and preference data: loading, validation and chat formatting (lesson 03).

Chat formatting lives here and only here: every module that turns an instruction into model input calls
`chat_prompt` / `chat_text`, so the SFT data, the reward model, PPO rollouts and evaluation all see the same text.
"""

from __future__ import annotations


def chat_prompt(tokenizer, instruction: str, system: str | None = None) -> str:
    """The prompt text a chat model sees for one user `instruction`, ending where the assistant's answer starts."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": instruction}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def chat_text(tokenizer, instruction: str, response: str, system: str | None = None) -> str:
    """Prompt plus `response` plus the end-of-turn token: the full text of one exchange."""
    return chat_prompt(tokenizer, instruction, system) + response + tokenizer.eos_token
