"""System 2 on a stronger model: a teacher behind any OpenAI-compatible ``/chat/completions`` endpoint.

A System 2 method talks to a model only through the :data:`policies.lm.LM` callable, so running it on a
teacher is a matter of handing it another LM: :meth:`TeacherClient.lm` returns one, for one System 2 run,
that sends each :class:`policies.lm.Call` as a chat completion and sums the tokens the teacher reports.
Everything the method does with the replies (prompts, programs run in the local sandbox, votes, the
consistency filter) is unchanged, and so is what the runtime does with the result: the student is the
local model.

A remote model fails in ways a local one does not, and a failing teacher must never fail a request:

- **retries** on 429, 5xx, timeouts and connection errors, with exponential backoff and jitter, honouring
  ``Retry-After``, never past the System 2 deadline; other 4xx are not retried (they will not get better);
- a **circuit breaker**: after ``breaker_failures`` failed requests in a row, calls are refused at once
  (:class:`~agent.errors.TeacherUnavailable`) for ``breaker_cooldown_s``, so a dead teacher costs a user
  nothing but System 2; the runtime answers with System 1 and the skip is counted;
- **bounded concurrency**: one semaphore for the whole process, whatever the number of queries;
- **malformed replies** (not JSON, no choices, no text) become empty generations: votes without an
  answer, which the consistency filter rejects; they count as failures for the breaker.

``k`` samples use the API's ``n``; an endpoint that ignores ``n`` (answers with fewer choices) is
remembered as such and topped up with parallel single requests.
"""

from __future__ import annotations

import email.utils
import logging
import os
import random
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import httpx

from agent.config import TeacherConfig
from agent.errors import ConfigError, System2Timeout, TeacherError, TeacherUnavailable
from policies.lm import Call

logger = logging.getLogger(__name__)

RETRIED_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})
"""HTTP statuses worth another try: rate limits, overload and the gateway errors in front of a server."""


@dataclass
class TeacherGeneration:
    """One sample the teacher wrote (a :class:`policies.lm.Generation`)."""

    text: str
    completion_tokens: int = 0

    @property
    def num_tokens(self) -> int:
        return self.completion_tokens


@dataclass
class TeacherUsage:
    """What one System 2 run cost on the teacher; the runtime copies it onto the answer and the log."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    requests: int = 0
    retries: int = 0
    malformed: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **counts: int) -> None:
        with self._lock:
            for name, value in counts.items():
                setattr(self, name, getattr(self, name) + value)

    def as_dict(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "requests": self.requests, "retries": self.retries, "malformed": self.malformed}


class CircuitBreaker:
    """Closed while the teacher answers; open for ``cooldown_s`` after ``failures`` failures in a row.

    When the cool-down has passed, one request is let through (half-open): its success closes the breaker,
    its failure opens it for another cool-down. Thread-safe; ``clock`` is injectable for tests."""

    def __init__(self, failures: int, cooldown_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.failures, self.cooldown_s, self.clock = failures, cooldown_s, clock
        self._lock = threading.Lock()
        self._in_a_row = 0
        self._opened_at: float | None = None
        self._probing = False
        self.opened = 0
        """How many times the breaker has opened."""

    @property
    def is_open(self) -> bool:
        with self._lock:
            return self._opened_at is not None and self.clock() - self._opened_at < self.cooldown_s

    def allow(self) -> bool:
        """Whether a request may go to the teacher now."""
        with self._lock:
            if self._opened_at is None:
                return True
            if self.clock() - self._opened_at < self.cooldown_s or self._probing:
                return False
            self._probing = True  # half-open: this one request tries the teacher
            return True

    def success(self) -> None:
        with self._lock:
            self._in_a_row, self._opened_at, self._probing = 0, None, False

    def failure(self) -> None:
        with self._lock:
            self._in_a_row += 1
            if self._probing or (self._opened_at is None and self._in_a_row >= self.failures):
                self.opened += 1  # opens, or the half-open probe failed: open for another cool-down
                self._opened_at, self._probing = self.clock(), False


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """A ``Retry-After`` header as seconds from now: delay-seconds or an HTTP date; None when absent or bad."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class TeacherClient:
    """The process's connection to the teacher: its HTTP pool, concurrency limit, breaker and counters."""

    def __init__(self, config: TeacherConfig, *, seed: int | None = None, environ: dict[str, str] | None = None,
                 sleep: Callable[[float], Any] | None = None) -> None:
        if not config.base_url:
            raise ConfigError("system2.teacher.base_url is not set: there is no teacher to run System 2 on")
        headers = {}
        if config.api_key_env:
            key = (os.environ if environ is None else environ).get(config.api_key_env)
            if not key:
                raise ConfigError(f"config key 'system2.teacher.api_key_env' names ${config.api_key_env}, "
                                  "which is not set in the environment")
            headers["Authorization"] = f"Bearer {key}"
        self.config, self.seed = config, seed
        self.url = config.base_url.rstrip("/") + "/chat/completions"
        self._http = httpx.Client(headers=headers, timeout=config.timeout_s,
                                  limits=httpx.Limits(max_connections=config.max_concurrency))
        self._slots = threading.BoundedSemaphore(config.max_concurrency)
        self.breaker = CircuitBreaker(config.breaker_failures, config.breaker_cooldown_s)
        self._supports_n: bool | None = None if config.use_n else False
        self._closing = threading.Event()
        self._sleep = sleep or self._closing.wait  # a retry's wait ends early when the agent closes
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()

    # --- the LM a System 2 run gets ---------------------------------------------------------------
    def lm(self, deadline: float | None = None) -> TeacherLM:
        """An :data:`policies.lm.LM` for one System 2 run ending at ``deadline`` (``time.monotonic``)."""
        return TeacherLM(self, deadline)

    def stats(self) -> dict[str, Any]:
        """Counters since start, for ``/metrics``: tokens, requests by outcome, retries, malformed replies,
        System 2 runs skipped by the open breaker, queries withheld by ``never_send``, the cost if priced."""
        with self._lock:
            counts = dict(self.counts)
        out: dict[str, Any] = {name: counts.get(name, 0) for name in (
            "prompt_tokens", "completion_tokens", "requests", "failures", "retries", "malformed", "skipped",
            "withheld")}
        out["breaker_open"] = self.breaker.is_open
        out["breaker_opened"] = self.breaker.opened
        out["cost"] = self.config.cost(out["prompt_tokens"], out["completion_tokens"])
        return out

    def count(self, **counts: int) -> None:
        with self._lock:
            self.counts.update(counts)

    def close(self) -> None:
        self._closing.set()
        self._http.close()

    # --- one call: n samples ------------------------------------------------------------------------
    def sample(self, call: Call, usage: TeacherUsage, deadline: float | None) -> list[TeacherGeneration]:
        """``call.n`` generations for ``call``: one request with ``n``, or parallel ones without."""
        if call.n > 1 and self._supports_n is not False:
            out = self._request(call, call.n, usage, deadline)
            if 0 < len(out) < call.n and self._supports_n is None:
                self._supports_n = False
                logger.info("the teacher at %s ignores n (asked %d, got %d): samples are parallel requests now",
                            self.config.base_url, call.n, len(out))
            elif len(out) >= call.n:
                self._supports_n = True
            missing = call.n - len(out)
            if missing > 0 and out:
                out += self._parallel(call, missing, usage, deadline)
            return self._fill(out, call.n)
        return self._fill(self._parallel(call, call.n, usage, deadline), call.n)

    def _parallel(self, call: Call, n: int, usage: TeacherUsage, deadline: float | None) -> list[TeacherGeneration]:
        if n == 1:
            return self._request(call, 1, usage, deadline)
        with ThreadPoolExecutor(max_workers=min(n, self.config.max_concurrency)) as pool:
            futures = [pool.submit(self._request, call, 1, usage, deadline) for _ in range(n)]
            return [g for f in futures for g in f.result()]

    @staticmethod
    def _fill(out: list[TeacherGeneration], n: int) -> list[TeacherGeneration]:
        """Exactly ``n`` generations: a short or malformed reply's missing ones are empty (votes with no answer)."""
        return (out + [TeacherGeneration("") for _ in range(n - len(out))])[:n]

    def _body(self, call: Call, n: int) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.config.model,
            "messages": [{"role": role, "content": content} for role, content in call.messages],
            "temperature": call.temperature,
            "max_tokens": call.max_new_tokens,
        }
        if n > 1:
            body["n"] = n
        if call.stop:
            body["stop"] = list(call.stop)[:4]  # OpenAI accepts at most four stop strings
        if self.seed is not None:
            body["seed"] = self.seed
        return body

    def _request(self, call: Call, n: int, usage: TeacherUsage, deadline: float | None) -> list[TeacherGeneration]:
        data = self._post(self._body(call, n), usage, deadline)
        return self._parse(data, usage)

    def _parse(self, data: Any, usage: TeacherUsage) -> list[TeacherGeneration]:
        """The generations of a reply; a reply of the wrong shape gives none (and is counted as malformed)."""
        choices = data.get("choices") if isinstance(data, dict) else None
        texts: list[str] = []
        if isinstance(choices, list):
            for choice in choices:
                message = choice.get("message") if isinstance(choice, dict) else None
                content = message.get("content") if isinstance(message, dict) else None
                texts.append(content if isinstance(content, str) else "")
        counted = data.get("usage") if isinstance(data, dict) else None
        prompt = _int(counted.get("prompt_tokens")) if isinstance(counted, dict) else 0
        completion = _int(counted.get("completion_tokens")) if isinstance(counted, dict) else 0
        usage.add(prompt_tokens=prompt, completion_tokens=completion)
        self.count(prompt_tokens=prompt, completion_tokens=completion)
        if not texts or not any(texts):
            usage.add(malformed=1)
            self.count(malformed=1)
            self.breaker.failure()
            logger.warning("the teacher at %s sent a reply without text: %.200s", self.config.base_url,
                           "(not JSON)" if data is None else repr(data))
            return []
        share, extra = divmod(completion, len(texts))  # the API counts tokens per reply, not per choice
        return [TeacherGeneration(t, share + (1 if i < extra else 0)) for i, t in enumerate(texts)]

    def _post(self, body: dict[str, Any], usage: TeacherUsage, deadline: float | None) -> Any:
        """POST ``body``, retrying what may get better; the JSON reply (None when it is not JSON)."""
        cfg = self.config
        attempt = 0
        while True:
            if self._closing.is_set():
                raise System2Timeout("System 2 stopped: the agent is closing")
            if not self.breaker.allow():
                self.count(skipped=1)
                raise TeacherUnavailable(f"the teacher at {cfg.base_url} failed {cfg.breaker_failures} times in a "
                                         f"row; not asked again for {cfg.breaker_cooldown_s:.0f} s")
            timeout = cfg.timeout_s
            if deadline is not None:
                timeout = min(timeout, deadline - time.monotonic())
                if timeout <= 0:
                    raise System2Timeout("System 2 ran out of time waiting for the teacher")
            retry_after: float | None = None
            usage.add(requests=1)
            self.count(requests=1)
            try:
                with self._slots:
                    response = self._http.post(self.url, json=body, timeout=timeout)
            except httpx.TimeoutException:
                problem, retriable = f"no reply within {timeout:.1f} s", True
            except httpx.TransportError as exc:
                problem, retriable = f"cannot reach it ({type(exc).__name__}: {exc})", True
            else:
                if response.status_code == 200:
                    try:
                        data = response.json()
                    except ValueError:
                        data = None
                    if data is not None:
                        self.breaker.success()
                    return data
                problem = f"HTTP {response.status_code}: {response.text[:200]}"
                retriable = response.status_code in RETRIED_STATUS
                retry_after = retry_after_seconds(response.headers.get("retry-after"))
            self.breaker.failure()
            self.count(failures=1)
            delay = retry_after if retry_after is not None else cfg.backoff_s * 2 ** attempt * random.uniform(0.5, 1.5)
            delay = min(delay, cfg.max_backoff_s)
            out_of_time = deadline is not None and time.monotonic() + delay >= deadline
            if not retriable or attempt >= cfg.max_retries or out_of_time:
                why = "" if not retriable else " (no time left to retry)" if out_of_time and attempt < cfg.max_retries \
                    else f" after {attempt + 1} attempts"
                raise TeacherError(f"the teacher at {cfg.base_url} failed{why}: {problem}")
            logger.info("teacher request failed (%s); retry %d of %d in %.2f s", problem, attempt + 1,
                        cfg.max_retries, delay)
            usage.add(retries=1)
            self.count(retries=1)
            self._sleep(delay)
            attempt += 1


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


class TeacherLM:
    """An :data:`policies.lm.LM` for one System 2 run on the teacher; :attr:`usage` is what it cost."""

    def __init__(self, client: TeacherClient, deadline: float | None) -> None:
        self.client, self.deadline = client, deadline
        self.usage = TeacherUsage()

    def __call__(self, calls: Sequence[Call]) -> list[list[TeacherGeneration]]:
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise System2Timeout("System 2 ran out of time before its next teacher call")
        if len(calls) == 1:
            return [self.client.sample(calls[0], self.usage, self.deadline)]
        with ThreadPoolExecutor(max_workers=min(len(calls), self.client.config.max_concurrency)) as pool:
            futures = [pool.submit(self.client.sample, call, self.usage, self.deadline) for call in calls]
            return [f.result() for f in futures]
