"""What the agent raises, as the HTTP error a client gets."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from agent.errors import ConfigError, InvalidQueryError, PromptTooLongError
from agent.server.protocol import APIError


@contextmanager
def agent_errors(prompt_param: str) -> Iterator[None]:
    """Translate what the agent raises for bad input into 4xx; anything else is a 500 (logged with traceback)."""
    try:
        yield
    except PromptTooLongError as exc:
        raise APIError(400, str(exc), param=prompt_param, code="context_length_exceeded") from None
    except InvalidQueryError as exc:
        raise APIError(400, str(exc), param=prompt_param, code="invalid_value") from None
    except ConfigError as exc:  # e.g. an unknown System 2 method named in s2agent.method
        raise APIError(400, str(exc), param="s2agent", code="invalid_value") from None
