"""Live replay: a freshly started ``agent serve``, with no configuration, learning by itself from mixed traffic.

    agent bench live [--model default] [--queries 400] [--window 100] [--clients 2] [--seed 0]
                     [--mix arithmetic=0.35,counting=0.15,sorting=0.1,last_letter=0.1,general=0.2,unanswerable=0.1]
                     [--probes 5] [--server-arg=--min-pending=16] [--serve-args "--interval-minutes 5"]
                     [--server-env S2AGENT_SYSTEM2__SAMPLES=4] [--out bench/out/live]

It measures what a new user sees, through the HTTP API only, so it works with whatever defaults the
server has:

1. ``agent serve`` runs as a subprocess on a free port of 127.0.0.1, with a fresh temporary data dir
   (``S2AGENT_HOME``), no config file and none of the caller's ``S2AGENT_*`` settings (the model cache,
   ``S2AGENT_CACHE_DIR`` / ``XDG_CACHE_HOME``, stays the user's). Only ``--model`` and the server
   arguments and variables given here reach it. It is stopped with SIGTERM at the end, killed on any error,
   and dies with this process (Linux).
2. A seeded stream of mixed, untagged questions (sums in four phrasings, letter counting, sorting,
   last-letter concatenation, general facts, questions nobody can answer) goes through the official
   ``openai`` client from ``--clients`` concurrent clients, with no ``s2agent`` options: exactly what a
   new user sends.
3. After each window of ``--window`` queries it records: the share of queries System 2 ran for (the
   response's ``s2agent.method`` set, or ``s2agent.route = system2``) and the share it answered
   (``route = system2``; System 2 without a usable answer falls back to System 1); System 2 tokens per
   query, both from the server's counter on ``GET /metrics`` (which also counts System 2 work done in the
   background) and from the responses' ``usage.completion_tokens_details.reasoning_tokens``; p50/p95
   latency of the replay requests; errors; the adapters serving per scope (``GET /v1/models``) and the
   consolidation runs (``/metrics``); the examples the server learned (its buffer, ``/metrics``) and at
   what rate per hour, inline or in the background alike; and System 1 accuracy on a fixed set of held-out
   task inputs (``--probes`` per task family) sent with ``s2agent.route = system1``, whose answers are known
   to this replay, never to the server.
4. General facts are asked with ``route = system1`` at the start and at the end; retention is the share
   of the facts right at the start that are still right at the end.

Writes ``results.json`` (after every window, so a long run that stops keeps what it measured),
``live.png`` and the server's log ``server.log`` into ``--out``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import os
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from tqdm import tqdm

from bench import tasks
from policies.answers import answers_match, normalise

logger = logging.getLogger(__name__)

MODEL_NAME = "default"
"""The model name every request sends: the server serves whatever adapter serves at that moment."""


# --- the traffic ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Fact:
    """A general question with a short answer; any of ``answers`` found as a word in the reply counts."""

    question: str
    answers: tuple[str, ...]

    def known_in(self, reply: str) -> bool:
        return any(re.search(rf"(?<!\w){re.escape(a)}(?!\w)", reply, re.IGNORECASE) for a in self.answers)


FACTS = (
    Fact("What is the capital of France?", ("Paris",)),
    Fact("What is the capital of Japan?", ("Tokyo",)),
    Fact("What is the capital of Italy?", ("Rome",)),
    Fact("What is the capital of Germany?", ("Berlin",)),
    Fact("What is the capital of Spain?", ("Madrid",)),
    Fact("What is the capital of the United Kingdom?", ("London",)),
    Fact("What is the capital of Egypt?", ("Cairo",)),
    Fact("What is the capital of China?", ("Beijing",)),
    Fact("What color is the sky on a clear day?", ("blue",)),
    Fact("How many days are in a week?", ("7", "seven")),
    Fact("How many hours are in a day?", ("24", "twenty-four")),
    Fact("How many legs does a spider have?", ("8", "eight")),
    Fact("How many continents are there on Earth?", ("7", "seven")),
    Fact("What is the largest planet in our solar system?", ("Jupiter",)),
    Fact("Which planet is known as the Red Planet?", ("Mars",)),
    Fact("Who wrote Romeo and Juliet?", ("Shakespeare",)),
    Fact("Who painted the Mona Lisa?", ("Leonardo", "da Vinci")),
    Fact("What is the chemical formula of water?", ("H2O",)),
    Fact("At how many degrees Celsius does water boil at sea level?", ("100",)),
    Fact("What is the opposite of hot?", ("cold",)),
    Fact("What gas do plants take in from the air?", ("carbon dioxide", "CO2")),
    Fact("What is the tallest animal?", ("giraffe", "giraffes")),
    Fact("What do bees make?", ("honey",)),
    Fact("Which ocean is the largest?", ("Pacific",)),
    Fact("What is the currency of Japan?", ("yen",)),
    Fact("What language is spoken in Brazil?", ("Portuguese",)),
    Fact("What is the largest mammal?", ("blue whale", "whale")),
    Fact("Who was the first person to walk on the Moon?", ("Armstrong",)),
    Fact("Which star is at the centre of our solar system?", ("Sun",)),
    Fact("What do caterpillars turn into?", ("butterfly", "butterflies", "moth", "moths")),
    Fact("On which continent is Kenya?", ("Africa",)),
    Fact("What is frozen water called?", ("ice",)),
)
"""The general facts: part of the replayed traffic, and the retention check at the start and the end."""

ADDITION_PHRASINGS = ("What is {a} + {b}?", "What is {a} plus {b}?", "Add {a} and {b}.", "Compute {a} + {b}.")
UNANSWERABLE = (
    "What is {name}'s favourite colour?",
    "What number between 1 and 100 is {name} thinking of right now?",
    "What will the weather be like in {city} on {day} {month} 2031?",
    "Will {name} enjoy the concert next {weekday}?",
    "What did {name} eat for breakfast yesterday?",
    "Which is better, {a} or {b}?",
    "How many hairs are on {name}'s head?",
    "Who will win the football World Cup in 2042?",
    "What is the meaning of life?",
    "Is pineapple a good pizza topping?",
)
CITIES = ("Paris", "Lagos", "Lima", "Oslo", "Hanoi", "Perth", "Quito", "Porto", "Dakar", "Riga")
MONTHS = ("January", "March", "May", "July", "September", "November")
RIVALS = (("tea", "coffee"), ("cats", "dogs"), ("summer", "winter"), ("Python", "Rust"), ("the sea", "the mountains"))
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")

KINDS = {"arithmetic": "number", "counting": "number", "sorting": "text", "last_letter": "text"}
"""The task families with a computable answer (probed for System 1 accuracy), and how answers compare."""
FAMILIES = (*KINDS, "general", "unanswerable")
DEFAULT_MIX = {"arithmetic": 0.35, "counting": 0.15, "sorting": 0.10, "last_letter": 0.10, "general": 0.20,
               "unanswerable": 0.10}


@dataclass(frozen=True)
class Query:
    input: str
    family: str
    answer: str | None
    """The expected answer (the first accepted one for a general fact); None when nobody can know it."""


def parse_mix(text: str) -> dict[str, float]:
    """``"arithmetic=0.35,general=0.2,..."`` -> weights that sum to 1; families left out get 0."""
    mix = dict.fromkeys(FAMILIES, 0.0)
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        if name.strip() not in mix:
            raise ValueError(f"unknown query family {name.strip()!r} in the mix; known: {', '.join(FAMILIES)}")
        try:
            mix[name.strip()] = float(value)
        except ValueError:
            raise ValueError(f"the mix needs family=share, got {part!r}") from None
    total = sum(mix.values())
    if total <= 0 or min(mix.values()) < 0:
        raise ValueError(f"the mix needs non-negative shares with a positive sum, got {text!r}")
    return {name: share / total for name, share in mix.items()}


def _addition(n: int, n_probe: int, rng: random.Random, seed: int) -> tuple[list[Query], list[Query]]:
    # bench.tasks' sums give disjoint operand pairs for the replay and the probes; the phrasing varies.
    task = tasks.arithmetic(2, n_train=n, n_eval=n_probe, seed=seed)

    def phrase(item: tasks.Item) -> Query:
        a, b = re.findall(r"\d+", item.input)
        return Query(rng.choice(ADDITION_PHRASINGS).format(a=a, b=b), "arithmetic", item.answer)

    return [phrase(i) for i in task.train], [phrase(i) for i in task.eval]


def _counting(n: int, n_probe: int, rng: random.Random, seed: int) -> tuple[list[Query], list[Query]]:
    words = sorted(set(tasks.WORDS))
    random.Random(seed).shuffle(words)
    probe_words, replay_words = words[:n_probe], words[n_probe:]

    def ask(word: str) -> Query:
        return Query(rng.choice(tasks.COUNTING_PHRASINGS).format(w=word), "counting", str(len(word)))

    return [ask(rng.choice(replay_words)) for _ in range(n)], [ask(w) for w in probe_words]


def _sorting(n: int, n_probe: int, rng: random.Random, seed: int) -> tuple[list[Query], list[Query]]:
    def make() -> Query:
        xs = rng.sample(range(1, 100), rng.randint(4, 6))
        return Query(rng.choice(tasks.SORTING_PHRASINGS).format(xs=", ".join(map(str, xs))), "sorting",
                     ", ".join(map(str, sorted(xs))))

    probes = [make() for _ in range(n_probe)]
    held_out = {q.input for q in probes}
    replay: list[Query] = []
    while len(replay) < n:
        if (q := make()).input not in held_out:
            replay.append(q)
    return replay, probes


def _last_letter(n: int, n_probe: int, rng: random.Random, seed: int) -> tuple[list[Query], list[Query]]:
    task = tasks.last_letter(2, n_train=n, n_eval=n_probe, seed=seed)
    return ([Query(i.input, "last_letter", i.answer) for i in task.train],
            [Query(i.input, "last_letter", i.answer) for i in task.eval])


def _general(n: int, n_probe: int, rng: random.Random, seed: int) -> tuple[list[Query], list[Query]]:
    return [Query(f.question, "general", f.answers[0]) for f in (rng.choice(FACTS) for _ in range(n))], []


def _unanswerable(n: int, n_probe: int, rng: random.Random, seed: int) -> tuple[list[Query], list[Query]]:
    def make() -> str:
        a, b = rng.choice(RIVALS)
        return rng.choice(UNANSWERABLE).format(name=rng.choice(tasks.NAMES), city=rng.choice(CITIES),
                                              day=rng.randint(1, 28), month=rng.choice(MONTHS),
                                              weekday=rng.choice(WEEKDAYS), a=a, b=b)

    return [Query(make(), "unanswerable", None) for _ in range(n)], []


GENERATORS: dict[str, Callable[[int, int, random.Random, int], tuple[list[Query], list[Query]]]] = {
    "arithmetic": _addition, "counting": _counting, "sorting": _sorting, "last_letter": _last_letter,
    "general": _general, "unanswerable": _unanswerable,
}
"""family -> (replay queries, held-out probes); probes only for the families in ``KINDS``."""


def traffic(queries: int, mix: dict[str, float], probes: int, seed: int) -> tuple[list[Query], list[Query]]:
    """The replay stream (families drawn by ``mix``, in a seeded order) and the fixed probe set."""
    rng = random.Random(seed)
    families = rng.choices(list(mix), weights=list(mix.values()), k=queries)
    pools: dict[str, list[Query]] = {}
    probe_set: list[Query] = []
    for name, make in GENERATORS.items():
        replay, held_out = make(families.count(name), probes if name in KINDS else 0, rng, seed)
        pools[name] = replay
        probe_set += held_out
    stream = [pools[name].pop() for name in families]
    return stream, probe_set


def pick_facts(n: int | None) -> tuple[Fact, ...]:
    """``n`` facts spread evenly over ``FACTS`` (not only the capitals that open it); all for None."""
    if n is None or n >= len(FACTS):
        return FACTS
    return tuple(FACTS[i * len(FACTS) // n] for i in range(n))


def correct(query: Query, reply: str) -> bool | None:
    """Whether ``reply`` answers ``query`` (None when the query has no known answer)."""
    if query.family in KINDS:
        kind = KINDS[query.family]
        return answers_match(normalise(reply, kind), normalise(query.answer or "", kind), kind)
    if query.family == "general":
        return next(f for f in FACTS if f.question == query.input).known_in(reply)
    return None


# --- the server, as a subprocess -----------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent() -> Callable[[], None] | None:
    """What the child runs before exec so that it gets SIGKILL when this process dies (Linux): no server
    outlives a killed replay. Looked up here, in the parent: the child then only makes one C call."""
    if sys.platform != "linux":
        return None
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


class ServerProcess:
    """``agent serve`` with no configuration, in a fresh data dir, on a free port of 127.0.0.1.

    Used as a context manager: ``__enter__`` starts it and waits for ``/readyz``; a clean exit sends SIGTERM
    and waits for it to drain and exit (SIGKILL past ``stop_timeout_s``); an exit by exception kills it
    (SIGKILL to its process group) at once. Either way the temporary data dir is removed unless ``keep_home``.
    """

    def __init__(self, model: str, serve_args: Sequence[str] = (), env: dict[str, str] | None = None,
                 log_path: Path | None = None, cache_dir: str | None = None, ready_timeout_s: float = 900.0,
                 stop_timeout_s: float = 120.0, keep_home: bool = False) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.home = Path(tempfile.mkdtemp(prefix="s2agent-live-"))
        self.log_path = log_path or self.home / "server.log"
        self.ready_timeout_s, self.stop_timeout_s, self.keep_home = ready_timeout_s, stop_timeout_s, keep_home
        global_args = ["--model", model] + (["--cache-dir", cache_dir] if cache_dir else [])
        self.command = [sys.executable, "-m", "agent.cli", *global_args, "serve", "--host", "127.0.0.1",
                        "--port", str(self.port), *serve_args]
        self.env = self._environment(env or {})
        self.process: subprocess.Popen | None = None
        self._previous_sigterm: Any = None
        self.info: dict[str, Any] = {"command": self.command, "url": self.url, "home": str(self.home),
                                     "env": dict(env or {}), "log": str(self.log_path)}

    def _environment(self, extra: dict[str, str]) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("S2AGENT_") or k == "S2AGENT_CACHE_DIR"}
        dropped = sorted(k for k in os.environ if k.startswith("S2AGENT_") and k not in env)
        if dropped:
            logger.warning("the server starts without the caller's settings %s", ", ".join(dropped))
        env["S2AGENT_HOME"] = str(self.home)
        # the server runs the same code as this process (a source checkout or the installed package)
        root = str(Path(importlib.util.find_spec("agent").origin).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
        env.update(extra)
        return env

    def __enter__(self) -> "ServerProcess":
        if threading.current_thread() is threading.main_thread():
            # a SIGTERM to this process unwinds like Ctrl-C, so the server is killed and its data dir removed
            self._previous_sigterm = signal.signal(signal.SIGTERM, _interrupt)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "wb")
        try:
            self.process = subprocess.Popen(
                self.command, env=self.env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=_die_with_parent())  # noqa: PLW1509 - one C call
        finally:
            log.close()
        self.info["pid"] = self.process.pid
        logger.info("started %s (pid %d), waiting for %s/readyz", shlex.join(self.command), self.process.pid,
                    self.url)
        try:
            self.info["ready_s"] = round(self._wait_ready(), 2)
        except BaseException:
            self.__exit__(*sys.exc_info())  # kill it, remove its data dir, restore the SIGTERM handler
            raise
        return self

    def _wait_ready(self) -> float:
        import httpx

        started = time.perf_counter()
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with code {self.process.returncode} before it was ready; "
                                   f"see {self.log_path}:\n{self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/readyz", timeout=5, trust_env=False).status_code == 200:
                    return time.perf_counter() - started
            if time.perf_counter() - started > self.ready_timeout_s:
                raise RuntimeError(f"the server was not ready within {self.ready_timeout_s:.0f} s; "
                                   f"see {self.log_path}")
            time.sleep(0.25)

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self) -> None:
        """SIGTERM, then wait for the graceful shutdown; SIGKILL to the process group past the timeout."""
        if self.process is None or "stopped_by" in self.info:  # never started, or already stopped
            return
        if self.process.poll() is not None:
            logger.warning("the server had exited by itself with code %s; see %s", self.process.returncode,
                           self.log_path)
            self.info["stopped_by"] = "exited by itself"
            return
        started = time.perf_counter()
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(self.stop_timeout_s)
            self.info["stopped_by"] = "SIGTERM"
        except subprocess.TimeoutExpired:
            logger.warning("the server did not stop within %.0f s of SIGTERM; killing it", self.stop_timeout_s)
            self.kill()
        self.info["stop_s"] = round(time.perf_counter() - started, 2)

    def kill(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)  # its own session: the server and its children
            self.process.wait()
            self.info["stopped_by"] = "SIGKILL"

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        try:
            self.stop() if exc_type is None else self.kill()
        finally:
            self.kill()  # a failure inside stop() still leaves nothing running
            if self.process is not None:
                self.info["exit_code"] = self.process.returncode
            if not self.keep_home:
                shutil.rmtree(self.home, ignore_errors=True)
            if self._previous_sigterm is not None:
                signal.signal(signal.SIGTERM, self._previous_sigterm)


# --- talking to it -------------------------------------------------------------------------------------------
@dataclass
class Reply:
    """One chat request's outcome, as the client saw it."""

    query: Query
    ok: bool
    seconds: float
    text: str = ""
    route: str | None = None
    method: str | None = None
    """The System 2 method the server ran for this query, if any (also when System 2 gave no usable answer)."""
    reasoning_tokens: int = 0
    system2: str | None = None
    """Why System 2 did not run although the router sent the query there: ``skipped`` (the server's System 2
    memory: it never paid off for inputs like this), ``queued`` or ``dropped`` (background mode)."""
    tag: str | None = None
    """The scope the server answered in (its classifier's choice for an untagged query)."""
    adapter_version: int | None = None
    """The adapter System 1 ran with (None: the base model)."""
    error: str | None = None

    @property
    def correct(self) -> bool | None:
        return correct(self.query, self.text) if self.ok else None


class Pace:
    """Starts requests at least ``interval_s`` apart, whichever client sends them: users who arrive at a
    steady rate, not as fast as the server answers. A client that falls behind sends at once; the missed
    starts are not made up in a burst."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._next = time.monotonic()
        self._lock = threading.Lock()

    def wait(self) -> float:
        """Sleep until this request's start; returns that start (``time.monotonic()``)."""
        with self._lock:
            start = max(self._next, time.monotonic())
            self._next = start + self.interval_s
        time.sleep(max(0.0, start - time.monotonic()))
        return start


class Client:
    """The official ``openai`` client (one per thread, as separate users would have), plus plain GETs."""

    def __init__(self, url: str, request_timeout_s: float) -> None:
        self.url = url
        self.request_timeout_s = request_timeout_s
        self._local = threading.local()

    def _openai(self):
        if not hasattr(self._local, "client"):
            from openai import OpenAI

            self._local.client = OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0,
                                        timeout=self.request_timeout_s)
        return self._local.client

    def ask(self, query: Query, route: str | None = None, max_tokens: int | None = None) -> Reply:
        """One chat completion; ``route`` set only for probes, never for the replayed traffic."""
        extra: dict[str, Any] = {"extra_body": {"s2agent": {"route": route}}} if route else {}
        if max_tokens is not None:
            extra["max_tokens"] = max_tokens
        started = time.perf_counter()
        try:
            response = self._openai().chat.completions.create(
                model=MODEL_NAME, messages=[{"role": "user", "content": query.input}], **extra)
        except Exception as exc:  # noqa: BLE001 - any failure is an error of the run, which continues
            return Reply(query, False, time.perf_counter() - started, error=f"{type(exc).__name__}: {exc}")
        seconds = time.perf_counter() - started
        s2agent = (response.model_extra or {}).get("s2agent") or {}
        details = response.usage.completion_tokens_details if response.usage else None
        return Reply(query, True, seconds, text=response.choices[0].message.content or "",
                     route=s2agent.get("route"), method=s2agent.get("method"), system2=s2agent.get("system2"),
                     tag=s2agent.get("tag"), adapter_version=s2agent.get("adapter_version"),
                     reasoning_tokens=(details.reasoning_tokens or 0) if details else 0)

    def ask_all(self, queries: Sequence[Query], clients: int, route: str | None = None, desc: str | None = None,
                bar: tqdm | None = None, pace: Pace | None = None) -> list[Reply]:
        """``queries`` from ``clients`` concurrent clients, each sending one request after the other (no sooner
        than ``pace`` lets it); progress on ``bar``, or on a bar of its own named ``desc``."""
        own = tqdm(total=len(queries), desc=desc, leave=False) if bar is None and desc else None
        replies = []
        pool = ThreadPoolExecutor(clients, thread_name_prefix="live-client")

        def send(query: Query) -> Reply:
            if pace is not None:
                pace.wait()
            return self.ask(query, route)

        try:
            for reply in pool.map(send, queries):
                replies.append(reply)
                for progress in (bar, own):
                    if progress is not None:
                        progress.update(1)
        finally:
            # on Ctrl-C or SIGTERM, do not wait for the requests in flight: the server is killed next, which
            # ends them
            pool.shutdown(wait=False, cancel_futures=True)
            if own is not None:
                own.close()
        return replies

    def get(self, path: str) -> Any:
        import httpx

        response = httpx.get(f"{self.url}{path}", timeout=60, trust_env=False)
        response.raise_for_status()
        return response.text if path == "/metrics" else response.json()


_SAMPLE = re.compile(r"^(?P<name>[A-Za-z_:][\w:]*)(?:\{(?P<labels>.*)\})?\s+(?P<value>\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> dict[tuple[str, frozenset], float]:
    """Prometheus text -> {(sample name, labels): value}."""
    samples = {}
    for line in text.splitlines():
        if line.startswith("#") or not (match := _SAMPLE.match(line.strip())):
            continue
        labels = frozenset(_LABEL.findall(match["labels"] or ""))
        with contextlib.suppress(ValueError):
            samples[(match["name"], labels)] = float(match["value"])
    return samples


@dataclass
class ServerState:
    """What the server says about itself at one moment."""

    system2_tokens: float | None
    """``s2agent_tokens_generated_total{system="system2"}``: every System 2 token, foreground or background."""
    runs: dict[str, int]
    """Consolidation runs by result (``s2agent_consolidation_runs_total``)."""
    adapters: dict[str, int]
    """Serving adapter version per scope (``general`` for the unscoped one), from ``GET /v1/models``."""
    background_waiting: float | None = None
    """Queries waiting for a background System 2 label (``s2agent_system2_background_waiting``)."""
    background: dict[str, int] = field(default_factory=dict)
    """Background System 2 events so far (``s2agent_system2_background_total``): queued, labelled, skipped..."""
    examples: int | None = None
    """Examples the server has learned so far: its buffer but the rejected rows (``s2agent_buffer_examples``),
    whether System 2 labelled them inline or in the background."""
    at: float = field(default_factory=time.monotonic)
    """When it was read (``time.monotonic``): rates are over the time between two reads."""


def server_state(client: Client, previous: ServerState | None = None) -> tuple[ServerState, str | None]:
    """The server's numbers now, and the error if it did not answer (then the previous adapters are kept)."""
    try:
        samples = parse_metrics(client.get("/metrics"))
        adapters = {}
        for model in client.get("/v1/models").get("data", []):
            extra = model.get("s2agent") or {}
            if extra.get("kind") == "adapter" and extra.get("version"):
                adapters[extra.get("scope") or "general"] = int(extra["version"])
    except Exception as exc:  # noqa: BLE001 - counted as an error; the run continues
        logger.warning("the server did not report its state: %s", exc)
        return ServerState(None, {}, dict(previous.adapters) if previous else {}), f"{type(exc).__name__}: {exc}"
    tokens = samples.get(("s2agent_tokens_generated_total", frozenset({("system", "system2")})))
    runs = _by_label(samples, "s2agent_consolidation_runs_total", "result")
    background = _by_label(samples, "s2agent_system2_background_total", "event")
    return ServerState(tokens, runs, adapters, samples.get(("s2agent_system2_background_waiting", frozenset())),
                       background, learned_examples(samples)), None


def learned_examples(samples: dict[tuple[str, frozenset], float]) -> int | None:
    """The server's buffer but its rejected rows (``s2agent_buffer_examples``): the examples it has learned;
    None when the store did not answer (``s2agent_store_up`` 0), so there are no counts to read."""
    if not samples.get(("s2agent_store_up", frozenset())):
        return None
    buffer = _by_label(samples, "s2agent_buffer_examples", "status")
    return sum(n for status, n in buffer.items() if status != "rejected")


def _by_label(samples: dict[tuple[str, frozenset], float], name: str, label: str) -> dict[str, int]:
    """The counter ``name``'s samples by the value of their ``label``."""
    return {dict(labels).get(label, "?"): int(v) for (sample, labels), v in samples.items() if sample == name}


# --- measuring ----------------------------------------------------------------------------------------------
def examples_between(before: ServerState, after: ServerState) -> int | None:
    """Examples learned between two reads of the server's state (None when either has no count)."""
    return None if before.examples is None or after.examples is None else after.examples - before.examples


def learning_rate(before: ServerState, after: ServerState) -> float | None:
    """Examples learned per hour between two reads of the server's state."""
    learned = examples_between(before, after)
    if learned is None or after.at <= before.at:
        return None
    return round(learned * 3600 / (after.at - before.at), 1)


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in [0, 1]); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def probe_summary(replies: Sequence[Reply]) -> dict[str, Any]:
    """System 1 accuracy on the held-out probes, overall and per family, and System 1 latency."""
    by_family = {f: _mean([float(bool(r.correct)) for r in replies if r.query.family == f])
                 for f in KINDS if any(r.query.family == f for r in replies)}
    served_by = Counter(f"{r.query.family}: {r.tag or 'general'} "
                        f"{'v' + str(r.adapter_version) if r.adapter_version else 'base'}" for r in replies if r.ok)
    return {"accuracy": _mean([float(bool(r.correct)) for r in replies]), "accuracy_by_family": by_family,
            "served_by": dict(sorted(served_by.items())),
            "latency_p50_s": percentile([r.seconds for r in replies if r.ok], 0.5),
            "errors": sum(not r.ok for r in replies), "n": len(replies)}


def system1_alone(client: Client, queries: Sequence[Query], clients: int, interval_s: float,
                  settle_s: float = 600.0) -> dict[str, Any]:
    """``queries`` asked again with ``route = system1``, once background System 2 has nothing left waiting
    (at most ``settle_s``): the latency of a plain System 1 answer to the same traffic, at the same arrival
    rate, with no System 2 running for it. The issue's background-mode bar compares the last window with
    this; held-out probes (one-number answers) would be a different, shorter workload than the window's
    general questions."""
    deadline = time.monotonic() + settle_s
    while (waiting := server_state(client)[0].background_waiting) and time.monotonic() < deadline:
        time.sleep(2.0)
    replies = client.ask_all(queries, clients, "system1", "System 1 alone (last window again)",
                             pace=Pace(interval_s) if interval_s > 0 else None)
    seconds = [r.seconds for r in replies if r.ok]
    return {"latency_p50_s": percentile(seconds, 0.5), "latency_p95_s": percentile(seconds, 0.95),
            "n": len(replies), "errors": [r.error for r in replies if not r.ok],
            "background_waiting_at_start": waiting or 0}


def retention(client: Client, facts: Sequence[Fact], clients: int, desc: str) -> tuple[dict[str, bool], int]:
    """Each general fact asked with ``route = system1``: is the expected answer in the reply? And the errors."""
    replies = client.ask_all([Query(f.question, "general", f.answers[0]) for f in facts], clients, "system1", desc)
    return {r.query.input: bool(r.ok and r.correct) for r in replies}, sum(not r.ok for r in replies)


def retention_summary(start: dict[str, bool], end: dict[str, bool]) -> dict[str, Any]:
    """Share of the facts right at the start that are still right at the end (None if none was right)."""
    right = [q for q, ok in start.items() if ok]
    kept = [q for q in right if end.get(q)]
    return {"facts": len(start), "right_start": len(right), "right_end": sum(end.values()), "kept": len(kept),
            "share_right_start": len(right) / len(start) if start else None,
            "share_right_end": sum(end.values()) / len(end) if end else None,
            "kept_share": len(kept) / len(right) if right else None,
            "lost": [q for q in right if not end.get(q)]}


def window_record(index: int, served: int, replies: Sequence[Reply], probed: Sequence[Reply], before: ServerState,
                  after: ServerState, seconds: float, other_errors: Sequence[str] = ()) -> dict[str, Any]:
    """The numbers of one window: its replayed queries, the probes after it, and the server's counters."""
    ok = [r for r in replies if r.ok]
    n = len(replies)
    tokens = (None if before.system2_tokens is None or after.system2_tokens is None
              else after.system2_tokens - before.system2_tokens)
    promoted = [f"{scope} v{v}" for scope, v in sorted(after.adapters.items()) if before.adapters.get(scope) != v]
    scored = [r.correct for r in ok if r.query.family in KINDS]
    errors = [r.error for r in (*replies, *probed) if not r.ok] + list(other_errors)
    return {
        "window": index, "queries_served": served, "n": n, "seconds": round(seconds, 2),
        "families": {f: sum(r.query.family == f for r in replies) for f in FAMILIES},
        # System 2 ran for a query inline (its method is in the answer) or was queued to run in the background
        "system2_share": _mean([float(r.route == "system2" or r.method is not None or r.system2 == "queued")
                                for r in ok]),
        "system2_answered_share": _mean([float(r.route == "system2") for r in ok]),
        "system2_skipped_share": _mean([float(r.system2 == "skipped") for r in ok]),
        "system2_background_share": _mean([float(r.system2 in ("queued", "dropped")) for r in ok]),
        "system2_tokens_per_query_metrics": None if tokens is None else tokens / n,
        "system2_tokens_per_query_responses": sum(r.reasoning_tokens for r in ok) / n,
        "served_accuracy": _mean([float(bool(c)) for c in scored]),
        "latency_p50_s": percentile([r.seconds for r in ok], 0.5),
        "latency_p95_s": percentile([r.seconds for r in ok], 0.95),
        "errors": len(errors), "error_examples": errors[:3],
        "probe": probe_summary(probed),
        "adapters": after.adapters, "promoted": promoted, "consolidation_runs": after.runs,
        # background mode: what the label queue did during the window, and how many it left waiting
        "background": {event: n - before.background.get(event, 0) for event, n in after.background.items()},
        "background_waiting": after.background_waiting,
        # what the window taught: examples stored, and at what rate (the issue's "examples learned per hour")
        "examples_learned": examples_between(before, after),
        "examples_per_hour": learning_rate(before, after),
    }


# --- the run -------------------------------------------------------------------------------------------------
@dataclass
class LiveSettings:
    queries: int = 400
    window: int = 100
    clients: int = 2
    seed: int = 0
    mix: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_MIX))
    probes: int = 5
    """Held-out inputs per task family asked with ``route = system1`` after every window."""
    interval_s: float = 0.0
    """Replayed queries start at least this many seconds apart (:class:`Pace`); 0: each client sends its next
    query as soon as its last is answered. A replay whose answers come at once (System 2 in the background)
    needs it to span the time learning takes."""
    facts: int | None = None
    """General facts asked at the start and the end for retention (spread over ``FACTS``); None: all."""
    serve_args: list[str] = field(default_factory=list)
    """Extra arguments of ``agent serve`` (e.g. ``--min-pending 16``)."""
    server_env: dict[str, str] = field(default_factory=dict)
    """Extra environment of the server (e.g. ``S2AGENT_SYSTEM2__SAMPLES=4``), for settings without a flag."""
    request_timeout_s: float = 600.0
    """A request unanswered after this long counts as an error (600 s is the openai client's own default)."""
    ready_timeout_s: float = 900.0
    keep_home: bool = False
    """Keep the server's data dir (its store and adapters) after the run, to look at with ``agent --db``."""


def run(settings: LiveSettings, model: str, out: Path, cache_dir: str | None = None) -> dict[str, Any]:
    """Start the server, replay the traffic window by window, measure; see the module docstring."""
    if min(settings.queries, settings.window, settings.clients) < 1 or min(settings.probes, settings.interval_s,
                                                                           settings.facts or 0) < 0:
        raise ValueError("queries, window and clients must be positive, probes, interval_s and facts not negative")
    out.mkdir(parents=True, exist_ok=True)
    stream, probe_set = traffic(settings.queries, settings.mix, settings.probes, settings.seed)
    facts = pick_facts(settings.facts)
    result: dict[str, Any] = {"model": model, "settings": asdict(settings), "windows": []}
    other_errors: list[str] = []  # requests outside the windows' replay and probes
    started = time.perf_counter()
    server = ServerProcess(model, settings.serve_args, settings.server_env, out / "server.log", cache_dir,
                           settings.ready_timeout_s, keep_home=settings.keep_home)
    result["server"] = server.info
    with server:
        client = Client(server.url, settings.request_timeout_s)
        result["retention_start"], failed = retention(client, facts, settings.clients, "general facts (start)")
        other_errors += ["a general fact (start) failed"] * failed
        baseline = client.ask_all(probe_set, settings.clients, "system1", "probes (start)")
        result["probe_start"] = probe_summary(baseline)
        other_errors += [r.error for r in baseline if not r.ok]
        state, error = server_state(client)
        other_errors += [error] if error else []
        replay_start = state
        pace = Pace(settings.interval_s) if settings.interval_s > 0 else None
        with tqdm(total=len(stream), desc="replay", unit="query") as bar:
            for index, start in enumerate(range(0, len(stream), settings.window), 1):
                batch = stream[start:start + settings.window]
                t = time.perf_counter()
                replies = client.ask_all(batch, settings.clients, bar=bar, pace=pace)
                seconds = time.perf_counter() - t
                probed = client.ask_all(probe_set, settings.clients, "system1", f"probes after window {index}")
                after, error = server_state(client, state)
                record = window_record(index, start + len(batch), replies, probed, state, after, seconds,
                                       [error] if error else [])
                result["windows"].append(record)
                state = after
                logger.info("window %d: System 2 share %s, probe accuracy %s, p50 %s s, adapters %s", index,
                            record["system2_share"], record["probe"]["accuracy"], record["latency_p50_s"],
                            record["adapters"] or "none")
                _write(out, result)
        result["examples_learned"] = examples_between(replay_start, state)
        result["examples_per_hour"] = learning_rate(replay_start, state)  # over the replay, probes included
        result["system1_alone"] = system1_alone(client, batch, settings.clients, settings.interval_s)
        other_errors += result["system1_alone"]["errors"]
        result["retention_end"], failed = retention(client, facts, settings.clients, "general facts (end)")
        other_errors += ["a general fact (end) failed"] * failed
    result["retention"] = retention_summary(result["retention_start"], result["retention_end"])
    result["errors_outside_windows"] = len(other_errors)
    result["error_examples_outside_windows"] = other_errors[:3]
    result["requests"] = (2 * len(facts) + len(probe_set) * (1 + len(result["windows"]))
                          + sum(w["n"] for w in result["windows"]) + result["system1_alone"]["n"])
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["checks"] = checks(result)
    _write(out, result)
    plot(result, out / "live.png")
    return result


def _write(out: Path, result: dict[str, Any]) -> None:
    (out / "results.json").write_text(json.dumps(result, indent=2, default=str))


# --- the issue's "done when" ------------------------------------------------------------------------------------
def _halved(first: float | None, last: float | None) -> str:
    if first is None or last is None:
        return "n/a"
    if first <= 0:
        return "n/a"  # nothing to halve: no System 2 in the first window
    return "pass" if last <= first / 2 else "fail"


def _fmt(value: float | None, spec: str = ".2f", unit: str = "") -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:{spec}}{unit}"


def checks(result: dict[str, Any]) -> list[dict[str, str]]:
    """Each of the issue's checks: what it asks, the numbers measured, and pass / fail / n/a."""
    windows = result["windows"]
    first, last = windows[0], windows[-1]
    out: list[dict[str, str]] = []

    promotions = [(w["queries_served"], p) for w in windows for p in w["promoted"]]
    out.append({"check": "an adapter promoted without any command",
                "measured": ", ".join(f"{p} by query {q}" for q, p in promotions) or "none",
                "result": "pass" if promotions else "fail"})

    metric_first, metric_last = first["system2_tokens_per_query_metrics"], last["system2_tokens_per_query_metrics"]
    resp_first, resp_last = first["system2_tokens_per_query_responses"], last["system2_tokens_per_query_responses"]
    use_metrics = metric_first is not None and metric_last is not None
    measured = f"{_fmt(metric_first, '.1f')} -> {_fmt(metric_last, '.1f')} (/metrics)"
    if not use_metrics or abs(metric_first - resp_first) > 0.05 or abs(metric_last - resp_last) > 0.05:
        measured += f"; {_fmt(resp_first, '.1f')} -> {_fmt(resp_last, '.1f')} (responses)"
    out.append({"check": "System 2 tokens/query: last window <= 1/2 first", "measured": measured,
                "result": _halved(*((metric_first, metric_last) if use_metrics else (resp_first, resp_last)))})

    out.append({"check": "System 2 share: last window <= 1/2 first",
                "measured": f"{_fmt(first['system2_share'])} -> {_fmt(last['system2_share'])}",
                "result": _halved(first["system2_share"], last["system2_share"])})

    p50_first, p50_last, probes = first["latency_p50_s"], last["latency_p50_s"], last["probe"]["latency_p50_s"]
    s1 = (result.get("system1_alone") or {}).get("latency_p50_s")
    halved = _halved(p50_first, p50_last)
    # the issue's second form is for System 2 in the background only: there the user always gets System 1's answer
    background = any(w.get("system2_background_share") for w in windows)
    near_s1 = None if p50_last is None or not s1 or not background else p50_last <= 1.5 * s1
    verdict = "pass" if halved == "pass" or near_s1 else "n/a" if halved == "n/a" and near_s1 is None else "fail"
    out.append({"check": "p50: last <= 1/2 first, or <= 1.5x System 1 if System 2 is in the background",
                "measured": f"{_fmt(p50_first, '.2f', ' s')} -> {_fmt(p50_last, '.2f', ' s')}; System 1 alone on "
                            f"the same queries p50 {_fmt(s1, '.2f', ' s')} (on the probes {_fmt(probes, '.2f', ' s')})",
                "result": verdict})

    kept = result["retention"]
    out.append({"check": "general facts kept >= 0.9",
                "measured": f"{_fmt(kept['kept_share'])} ({kept['kept']} of {kept['right_start']} right at the start)",
                "result": "n/a" if kept["kept_share"] is None else "pass" if kept["kept_share"] >= 0.9 else "fail"})

    errors = sum(w["errors"] for w in windows) + result["errors_outside_windows"]
    out.append({"check": "no request failed", "measured": f"{errors} errors in {result['requests']} requests",
                "result": "pass" if errors == 0 else "fail"})
    return out


# --- printing and plotting (the CLI prints what these return) --------------------------------------------------
def report(result: dict[str, Any]) -> str:
    """One row per window, then the checks."""
    head = (f"{'served':>7} {'S2 share':>8} {'skipped':>7} {'S2 tok/q':>9} {'(resp.)':>8} {'S1 probe':>8} {'served acc':>10} "
            f"{'p50 s':>6} {'p95 s':>6} {'S1 p50':>6} {'errors':>6} {'waiting':>7} {'learned':>7}  adapters")
    start = result["probe_start"]
    lines = [f"model {result['model']}; server: {' '.join(result['server']['command'][3:])}",
             head,
             (f"{0:>7} {'':>8} {'':>7} {'':>9} {'':>8} {_fmt(start['accuracy']):>8} {'':>10} {'':>6} {'':>6} "
              f"{_fmt(start['latency_p50_s']):>6} {start['errors']:>6} {'':>7} {'':>7}  base")]
    for w in result["windows"]:
        adapters = ", ".join(f"{scope} v{v}" for scope, v in sorted(w["adapters"].items())) or "base"
        if w["promoted"]:
            adapters += f"  (new: {', '.join(w['promoted'])})"
        lines.append(
            f"{w['queries_served']:>7} {_fmt(w['system2_share']):>8} {_fmt(w.get('system2_skipped_share')):>7} "
            f"{_fmt(w['system2_tokens_per_query_metrics'], '.1f'):>9} "
            f"{_fmt(w['system2_tokens_per_query_responses'], '.1f'):>8} "
            f"{_fmt(w['probe']['accuracy']):>8} {_fmt(w['served_accuracy']):>10} {_fmt(w['latency_p50_s']):>6} "
            f"{_fmt(w['latency_p95_s']):>6} {_fmt(w['probe']['latency_p50_s']):>6} {w['errors']:>6} "
            f"{_fmt(w.get('background_waiting'), '.0f'):>7} {_fmt(w.get('examples_learned'), 'd'):>7}  {adapters}")
    if alone := result.get("system1_alone"):
        lines.append(f"System 1 alone on the last window's queries again: p50 {_fmt(alone['latency_p50_s'])} s, "
                     f"p95 {_fmt(alone['latency_p95_s'])} s")
    if result.get("examples_learned") is not None:
        lines.append(f"examples learned during the replay: {result['examples_learned']} "
                     f"({_fmt(result['examples_per_hour'], '.0f')} per hour)")
    runs = result["windows"][-1]["consolidation_runs"] if result["windows"] else {}
    lines.append(f"consolidation runs: {', '.join(f'{k} {v}' for k, v in sorted(runs.items()) if v) or 'none'}; "
                 f"general facts right: {result['retention']['right_start']} of {result['retention']['facts']} at "
                 f"the start, {result['retention']['right_end']} at the end")
    lines.append("")
    width = max(len(c["check"]) for c in result["checks"])
    lines += [f"{c['result'].upper():<5} {c['check']:<{width}}  {c['measured']}" for c in result["checks"]]
    server = result["server"]
    lines.append(f"server: ready in {_fmt(server.get('ready_s'), '.1f', ' s')}, stopped by "
                 f"{server.get('stopped_by', '?')}, exit code {server.get('exit_code')}; {result['seconds']:.0f} s "
                 f"in all")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    """System 2 share, System 1 probe accuracy, served accuracy and p50 latency per window; a vertical line per
    promotion."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    windows = result["windows"]
    served = [w["queries_served"] for w in windows]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(served, [w["system2_share"] for w in windows], "s-", label="share of queries sent to System 2")
    ax.plot([0, *served], [result["probe_start"]["accuracy"], *(w["probe"]["accuracy"] for w in windows)], "o-",
            label="System 1 accuracy, held-out probes")
    ax.plot(served, [w["served_accuracy"] for w in windows], "D-", color="C4",
            label="accuracy of the answers users got (task families)")
    ax.set_xlabel("queries served")
    ax.set_ylim(-0.03, 1.05)
    ax2 = ax.twinx()
    ax2.plot(served, [w["latency_p50_s"] for w in windows], "^:", color="C2", label="p50 latency (s)")
    ax2.plot([0, *served], [result["probe_start"]["latency_p50_s"], *(w["probe"]["latency_p50_s"] for w in windows)],
             ".:", color="C7", label="p50 of System 1 on the held-out probes (s)")
    if alone := (result.get("system1_alone") or {}).get("latency_p50_s"):
        ax2.plot([served[-1]], [alone], "*", color="C2", markersize=11,
                 label="p50 of System 1 alone, last window's queries (s)")
    ax2.set_ylabel("seconds")
    ax2.set_ylim(bottom=0)
    for w in windows:
        for name in w["promoted"]:
            ax.axvline(w["queries_served"], color="C3", linestyle="--", linewidth=1)
            ax.annotate(name, (w["queries_served"], 1.0), rotation=90, fontsize=7, ha="right", va="top")
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    labels = ax.get_legend_handles_labels()[1] + ax2.get_legend_handles_labels()[1]
    ax.legend(handles, labels, fontsize=8, loc="best")
    settings = result.get("settings") or {}
    env = settings.get("server_env", {})
    given = " ".join([*settings.get("serve_args", []), *(f"{k}={v}" for k, v in env.items())])
    ax.set_title(f"agent serve {given or '(no settings)'}, model {Path(result['model']).name}: dashed lines = "
                 "adapter promoted", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
