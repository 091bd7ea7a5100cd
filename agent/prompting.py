"""The prompt contract: the one place that says what System 1 sees, as messages and as tokens.

System 1 is served and trained on the very same prompt, so that a distilled adapter meets at serving
time exactly the tokens it learned under. Serving (:mod:`agent.loop`), training (:mod:`agent.training`)
and every backend (:mod:`agent.backends`) build their prompts here and nowhere else:

- :func:`system1_messages`: the chat messages of one query (an optional system turn, then the user turn);
- :func:`render_prompt`: their token ids under the model's chat template, assistant turn opened;
- :func:`encode_example`: a training sequence, that prompt followed by the target answer and the
  end-of-sequence token, with the loss masked off the prompt (a long answer loses its tail, never the
  prompt).
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
                   system_prompt: str | None = None) -> tuple[list[int], list[int]] | None:
    """Token ids and labels (:data:`IGNORE_INDEX` on the prompt) for one example, at most ``max_length``.

    A sequence that is too long keeps its whole prompt and loses the tail of its answer (and then its
    end-of-sequence token: the model must not learn to stop where the cut fell). Cutting from the left,
    as this once did, dropped the *prompt* of long retention answers and trained the model to continue
    text it never saw asked for. None when not even the prompt and one answer token fit: the caller
    drops the example (and says how many it dropped).
    """
    prompt = render_prompt(tokenizer, example.messages, system_prompt)
    answer = tokenizer.encode(example.target, add_special_tokens=False) + [tokenizer.eos_token_id]
    room = max_length - len(prompt)
    if room < 1:
        return None
    answer = answer[:room]
    return prompt + answer, [IGNORE_INDEX] * len(prompt) + answer
