"""An Ollama `Modelfile` whose TEMPLATE reproduces the model's own chat template (lesson 06).

Ollama templates are Go templates, not Jinja, so the Jinja chat template cannot be copied over. Instead we read it
the way a learner would: render a conversation with recognisable placeholders and cut the text around them. That
gives the text each role's message is wrapped in (`<|im_start|>user\\n` ... `<|im_end|>\\n` for ChatML) and the
generation prompt. `ChatMarkers.render` rebuilds any conversation from those pieces; it must equal the Jinja
template's output (checked on several conversations) before a Modelfile is written.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

ROLES = ("system", "user", "assistant")
_SLOT = "\u27e6{}\u27e7"  # ⟦...⟧: placeholder text no template alters


@dataclass
class ChatMarkers:
    """The literal text around each role's message, as the chat template writes it."""

    head: str                     # before the first message (e.g. a BOS token)
    open: dict                    # role -> text before its content
    close: dict                   # role -> text after its content
    generation: str               # what add_generation_prompt appends
    default_system: str = ""      # a system turn the template inserts when the conversation has none

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The conversation as the chat template would write it, rebuilt from the markers."""
        text = self.head
        if not messages or messages[0]["role"] != "system":
            text += self.default_system
        for m in messages:
            text += self.open[m["role"]] + m["content"] + self.close[m["role"]]
        return text + (self.generation if add_generation_prompt else "")


def _render(tokenizer, messages, add_generation_prompt=False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def chat_markers(tokenizer) -> ChatMarkers:
    """Cut the tokenizer's chat template into `ChatMarkers`; raise ValueError if it is not a plain turn format."""
    slot = {role: _SLOT.format(role.upper()) for role in ROLES}
    conversation = [{"role": r, "content": slot[r]} for r in ROLES]   # system, user, assistant
    texts = [_render(tokenizer, conversation[:k]) if k else "" for k in range(len(ROLES) + 1)]
    opens, closes = {}, {}
    for k, role in enumerate(ROLES):
        if not texts[k + 1].startswith(texts[k]):
            raise ValueError(f"chat template is not append-only: adding a {role} turn rewrites earlier text")
        piece = texts[k + 1][len(texts[k]):]
        opens[role], _, closes[role] = piece.partition(slot[role])
    head = ""
    bos = getattr(tokenizer, "bos_token", None)
    if bos and opens["system"].startswith(bos) and not opens["user"].startswith(bos):  # once, not every turn
        head, opens["system"] = bos, opens["system"][len(bos):]
    without_system = _render(tokenizer, conversation[1:2])
    user_turn = opens["user"] + slot["user"] + closes["user"]
    if not (without_system.startswith(head) and without_system.endswith(user_turn)):
        raise ValueError("chat template writes a user-only conversation in an unexpected way")
    default_system = without_system[len(head):-len(user_turn)]
    generation = _render(tokenizer, conversation[:2], True)[len(texts[2]):]
    markers = ChatMarkers(head, opens, closes, generation, default_system)
    for sample in _samples():
        if markers.render(sample) != _render(tokenizer, sample, True):
            raise ValueError("chat template is not a plain turn format: markers do not reproduce it")
    return markers


def _samples() -> list[list[dict]]:
    s, u, a = ({"role": r, "content": c} for r, c in (("system", "Be brief."), ("user", "Hi!\nTwo lines."),
                                                         ("assistant", "Hello.")))
    return [[u], [s, u], [u, a, u], [s, u, a, u, a, u]]


def _go(text: str) -> str:
    """A literal for a Go template: `{{` would start an action, so write it as one."""
    return text.replace("{{", '{{ "{{" }}')


def modelfile_text(tokenizer, gguf_reference: str, temperature: float = 0.7) -> str:
    """The Modelfile: FROM the GGUF, the chat TEMPLATE in Go syntax, stop tokens and sampling defaults."""
    try:
        m = chat_markers(tokenizer)
    except Exception as err:  # a template we cannot cut into turns (or one that rejects a lone system turn)
        return "\n".join([f"# Ollama Modelfile. No TEMPLATE: this chat template is not a plain turn format ({err}).",
                          "# Ollama then uses the chat template stored in the GGUF metadata.",
                          f"FROM {gguf_reference}", f"PARAMETER temperature {temperature}"]) + "\n"
    sys_block = f"{_go(m.open['system'])}{{{{ .System }}}}{_go(m.close['system'])}"
    template = (
        f"{_go(m.head)}{{{{ if .System }}}}{sys_block}{{{{ else }}}}{_go(m.default_system)}{{{{ end }}}}"
        "{{ range .Messages }}"
        f"{{{{ if eq .Role \"user\" }}}}{_go(m.open['user'])}{{{{ .Content }}}}{_go(m.close['user'])}"
        f"{{{{ else if eq .Role \"assistant\" }}}}{_go(m.open['assistant'])}{{{{ .Content }}}}"
        f"{_go(m.close['assistant'])}"
        "{{ end }}{{ end }}"
        f"{_go(m.generation)}"
    )
    if '"""' in template:
        raise ValueError('chat template contains """, which a Modelfile cannot quote')
    stops = [t for t in dict.fromkeys([tokenizer.eos_token, m.close["assistant"].strip()]) if t]
    lines = ["# Ollama Modelfile: `ollama create my-model -f Modelfile`, then `ollama run my-model`.",
             f"FROM {gguf_reference}", f'TEMPLATE """{template}"""']
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    lines += [f"PARAMETER temperature {temperature}"]
    return "\n".join(lines) + "\n"


def write_modelfile(path, tokenizer, gguf_reference: str, temperature: float = 0.7) -> Path:
    """Write `modelfile_text(...)` to `path` and return the path."""
    path = Path(path)
    path.write_text(modelfile_text(tokenizer, gguf_reference, temperature), encoding="utf-8")
    return path
