"""The prompt contract: the one place that says what System 1 sees, as messages and as tokens.

System 1 is served and trained on the very same prompt, so that a distilled adapter meets at serving
time exactly the tokens it learned under. Serving (:mod:`agent.loop`), training (:mod:`agent.training`)
and every backend (:mod:`agent.backends`) build their prompts here and nowhere else:

- :func:`system1_messages`: the chat messages of one query (an optional system turn, then the user turn);
- :func:`render_prompt`: their token ids under the model's chat template, assistant turn opened;
- :func:`encode_example`: a training sequence, that prompt followed by the target answer and the
  end-of-sequence token, with the loss masked off the prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

Message = dict[str, str]
"""One chat message: ``{"role": "system" | "user" | "assistant", "content": "..."}``."""

Prompt = Union[list[Message], str]
"""Chat messages get the model's chat template; a plain string is fed to the model as it is."""

IGNORE_INDEX = -100
"""Label of a position that carries no loss (the prompt)."""


def system1_messages(query: str, system_prompt: str | None = None) -> list[Message]:
    """The messages System 1 answers ``query`` with; training uses the very same ones."""
    messages: list[Message] = []
    if system_prompt:
        messages.append({"role": "system", "content": system_prompt})
    messages.append({"role": "user", "content": query})
    return messages


def render_prompt(tokenizer, prompt: Prompt, system_prompt: str | None = None) -> list[int]:
    """Token ids of a prompt: chat messages go through the chat template (with the assistant turn
    opened, and ``system_prompt`` as the system turn when the messages have none), strings are taken
    as they are."""
    if isinstance(prompt, str):
        return tokenizer.encode(prompt, add_special_tokens=False)
    messages = list(prompt)
    if system_prompt and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": system_prompt}, *messages]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


@dataclass
class TrainingExample:
    """One supervised sequence: the prompt System 1 will see, and the answer it should give."""

    messages: list[Message]
    target: str


def encode_example(tokenizer, example: TrainingExample, max_length: int,
                   system_prompt: str | None = None) -> tuple[list[int], list[int]]:
    """Token ids and labels (:data:`IGNORE_INDEX` on the prompt) for one example."""
    prompt = render_prompt(tokenizer, example.messages, system_prompt)
    answer = tokenizer.encode(example.target, add_special_tokens=False) + [tokenizer.eos_token_id]
    ids = (prompt + answer)[-max_length:]
    labels = ([IGNORE_INDEX] * len(prompt) + answer)[-max_length:]
    return ids, labels
