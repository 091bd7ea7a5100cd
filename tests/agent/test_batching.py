"""BatchingBackend over the tiny HFBackend: callers share decode steps, join and leave a running batch, stream and cancel."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from agent.backends import (
    BACKGROUND,
    IDLE,
    INTERACTIVE,
    AdapterError,
    Backend,
    GenerationRequest,
    PromptTooLongError,
    SamplingParams,
)
from agent.backends import stream
from agent.backends.batching import BACKGROUND_PREFILL_EVERY, BatchingBackend, _Job
from agent.backends.hf import HFBackend
from agent.errors import GenerationCancelled
from policies.yielding import TrainerTurns
from tests.conftest import wait_for

PROMPTS = [
    "The capital of France is", "What is 47 + 38?", "apple house", "Alice flips the coin.",
    "Name a primary colour.", "Take the last letters", "A coin is heads up.", "Red, blue, yellow",
]
PARAMS = SamplingParams(max_new_tokens=12)
TOO_LONG = "apple house " * 400


@pytest.fixture
def engine(tiny_model_dir: Path) -> HFBackend:
    return HFBackend(str(tiny_model_dir), model_name="tiny-llama", threads=1)


@pytest.fixture
def batcher(engine: HFBackend):
    wrapper = BatchingBackend(engine, max_batch=16, max_wait_ms=200)
    yield wrapper
    wrapper.close()


def run_concurrently(backend: BatchingBackend, prompts: list[str]) -> list[object]:
    """Each prompt from its own thread, all released at once; returns a result or an exception each."""
    results: list[object] = [None] * len(prompts)
    barrier = threading.Barrier(len(prompts))

    def call(i: int) -> None:
        barrier.wait()
        try:
            results[i] = backend.generate([GenerationRequest(prompts[i], PARAMS)])
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            results[i] = exc

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a caller never got its answer"
    return results


def sequential(engine: HFBackend, prompts: list[str]) -> list[list[int]]:
    return [engine.generate([GenerationRequest(p, PARAMS)])[0][0].token_ids for p in prompts]


def test_same_protocol_as_the_engine(batcher: BatchingBackend, engine: HFBackend) -> None:
    assert isinstance(batcher, Backend)
    assert batcher.model_name == "tiny-llama"
    assert batcher.context_length == engine.context_length == 512
    assert batcher.count_tokens("apple house") == engine.count_tokens("apple house")
    assert batcher.generate([]) == []


def test_concurrent_callers_share_batches(batcher: BatchingBackend, engine: HFBackend) -> None:
    expected = sequential(engine, PROMPTS)
    assert len({tuple(t) for t in expected}) > 1

    results = run_concurrently(batcher, PROMPTS)

    for result, tokens in zip(results, expected):
        assert not isinstance(result, Exception), result
        [[completion]] = result
        assert completion.token_ids == tokens
    assert 1 <= batcher.prefills < len(PROMPTS)
    assert batcher.admitted_rows == len(PROMPTS)
    assert batcher.step_rows / batcher.steps > 1  # forward passes were shared


def test_batches_never_exceed_max_batch(engine: HFBackend) -> None:
    batcher = BatchingBackend(engine, max_batch=3, max_wait_ms=200)
    try:
        expected = sequential(engine, PROMPTS)
        results = run_concurrently(batcher, PROMPTS)
        assert [r[0][0].token_ids for r in results] == expected
        assert batcher.peak_rows == 3  # 8 rows, at most 3 per decode step
        assert batcher.admitted_rows == len(PROMPTS)
        # A single request larger than max_batch still runs (alone).
        [completions] = batcher.generate([GenerationRequest(PROMPTS[0], SamplingParams(n=5, temperature=1.0,
                                                                                       max_new_tokens=4, seed=0))])
        assert len(completions) == 5
    finally:
        batcher.close()


def test_multi_request_calls_keep_their_order(batcher: BatchingBackend, engine: HFBackend) -> None:
    expected = sequential(engine, PROMPTS[:3])
    out = batcher.generate([GenerationRequest(p, PARAMS) for p in PROMPTS[:3]])
    assert [r[0].token_ids for r in out] == expected


def test_a_bad_request_fails_only_its_caller(batcher: BatchingBackend, engine: HFBackend) -> None:
    prompts = [*PROMPTS[:5], TOO_LONG, *PROMPTS[5:7]]
    expected = sequential(engine, PROMPTS[:7])

    results = run_concurrently(batcher, prompts)

    assert isinstance(results[5], PromptTooLongError)
    good = [r for i, r in enumerate(results) if i != 5]
    for result, tokens in zip(good, expected):
        assert not isinstance(result, Exception), result
        assert result[0][0].token_ids == tokens
    assert batcher.admitted_rows == 7
    # The worker survived: later calls still work.
    assert batcher.generate([GenerationRequest(PROMPTS[0], PARAMS)])[0][0].token_ids == expected[0]


def test_close_stops_the_worker(engine: HFBackend) -> None:
    batcher = BatchingBackend(engine, max_wait_ms=1)
    assert batcher._worker.is_alive()
    assert batcher.generate([GenerationRequest(PROMPTS[0], PARAMS)])[0][0].num_tokens > 0
    batcher.close()
    assert not batcher._worker.is_alive()


def test_generate_after_close_fails_fast(engine: HFBackend) -> None:
    batcher = BatchingBackend(engine, max_wait_ms=1)
    batcher.close()
    outcome: list[object] = []

    def call() -> None:
        try:
            outcome.append(batcher.generate([GenerationRequest(PROMPTS[0], PARAMS)]))
        except Exception as exc:  # noqa: BLE001
            outcome.append(exc)

    caller = threading.Thread(target=call, daemon=True)  # daemon: a regression would leave it blocked
    caller.start()
    caller.join(timeout=5)
    assert outcome, "generate() after close() blocked instead of failing"
    assert isinstance(outcome[0], RuntimeError)
    assert "closed" in str(outcome[0])


# --- iteration-level scheduling: join, leave, stream, cancel ----------------------------------------------------
def endless(engine: HFBackend, tokens: int, **kwargs) -> SamplingParams:
    """Greedy, ``tokens`` long: the end-of-sequence token is biased away so the row runs its full length."""
    eos = engine.tokenizer.eos_token_id
    return SamplingParams(max_new_tokens=tokens, logit_bias=((eos, -100.0),), **kwargs)


def test_a_request_joins_a_running_decode_and_leaves_before_it(batcher: BatchingBackend, engine: HFBackend) -> None:
    long_params, short_params = endless(engine, 400), endless(engine, 4)
    [[long_alone]] = engine.generate([GenerationRequest(PROMPTS[0], long_params)])
    [[short_alone]] = engine.generate([GenerationRequest(PROMPTS[1], short_params)])

    long = batcher.submit(GenerationRequest(PROMPTS[0], long_params))
    next(long.deltas())  # the long request is decoding
    short = batcher.submit(GenerationRequest(PROMPTS[1], short_params))
    [short_result] = short.result(timeout=60)

    assert not long.done, "the short request waited for the long decode to end"
    assert short_result.token_ids == short_alone.token_ids
    [long_result] = long.result(timeout=60)
    assert long_result.token_ids == long_alone.token_ids  # joining its batch changed nothing of its output
    assert batcher.prefills == 2 and batcher.peak_rows == 2


def test_rows_of_several_adapters_share_running_steps(engine: HFBackend, tiny_model_dir: Path,
                                                      tmp_path: Path) -> None:
    from tests.conftest import make_random_adapter

    engine.load_adapter("a", str(make_random_adapter(tiny_model_dir, tmp_path / "a", seed=1)))
    params = endless(engine, 200)
    alone = {name: engine.generate([GenerationRequest(PROMPTS[2], params, name)])[0][0].token_ids
             for name in (None, "a")}
    assert alone[None] != alone["a"]
    batcher = BatchingBackend(engine, max_wait_ms=0)
    try:
        base = batcher.submit(GenerationRequest(PROMPTS[2], params))
        next(base.deltas())
        tuned = batcher.submit(GenerationRequest(PROMPTS[2], params, "a"))
        assert tuned.result(timeout=60)[0].token_ids == alone["a"]
        assert base.result(timeout=60)[0].token_ids == alone[None]
        # Unloading while a row runs with the adapter: new requests are refused at once, the row finishes.
        running = batcher.submit(GenerationRequest(PROMPTS[2], params, "a"))
        next(running.deltas())
        batcher.unload_adapter("a")
        with pytest.raises(AdapterError):
            batcher.generate([GenerationRequest(PROMPTS[2], params, "a")])
        assert running.result(timeout=60)[0].token_ids == alone["a"]
        deadline = time.monotonic() + 10
        while "a" in engine.adapters:
            assert time.monotonic() < deadline, "the adapter was never unloaded"
            time.sleep(0.01)
    finally:
        batcher.close()


def test_streamed_deltas_add_up_to_the_text(batcher: BatchingBackend, engine: HFBackend) -> None:
    for params in (endless(engine, 40), endless(engine, 60, stop=("e", "an"))):
        handle = batcher.submit(GenerationRequest(PROMPTS[3], params))
        deltas = list(handle.deltas(timeout=60))
        [result] = handle.result()
        assert len(deltas) > 1
        assert "".join(d.text for d in deltas) == result.text
        assert [d.finish_reason for d in deltas][-1] == result.finish_reason
        assert all(d.finish_reason is None for d in deltas[:-1])
        assert [d.tokens for d in deltas] == sorted(d.tokens for d in deltas)


def test_a_cancelled_request_leaves_the_batch_at_the_next_step(batcher: BatchingBackend, engine: HFBackend) -> None:
    handle = batcher.submit(GenerationRequest(PROMPTS[0], endless(engine, 450)))
    next(handle.deltas())
    steps = batcher.steps
    handle.cancel()
    with pytest.raises(GenerationCancelled, match="cancelled"):
        handle.result(timeout=60)
    assert batcher.dropped_rows == 1
    assert batcher.steps - steps < 50  # not the 450 it asked for
    # A cancel event shared by the caller, and a deadline, work the same way; the worker keeps serving.
    event = threading.Event()
    handle = batcher.submit(GenerationRequest(PROMPTS[0], endless(engine, 450)), cancel=event)
    next(handle.deltas())
    event.set()
    with pytest.raises(GenerationCancelled):
        handle.result(timeout=60)
    with pytest.raises(GenerationCancelled, match="deadline"):
        batcher.generate([GenerationRequest(PROMPTS[0], endless(engine, 450))], deadline=time.monotonic() + 0.05)
    assert batcher.generate([GenerationRequest(PROMPTS[0], PARAMS)])[0][0].num_tokens > 0


class Recording(HFBackend):
    """The tiny engine, logging each prefill pass and each finished row in the order the scheduler ran them."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.events: list[tuple[str, str]] = []
        self.step_priorities: list[set[int]] = []
        self.on_pass = lambda: None

    def prefill_steps(self, items, chunk):
        for out in super().prefill_steps(items, chunk):
            self.events += [("pass", request.prompt) for _, request, _ in items]
            self.on_pass()
            yield out

    def step(self, batch):
        if all(isinstance(row.owner, _Job) for row in batch.rows):  # the scheduler's rows, not a plain generate's
            self.step_priorities.append({row.owner.priority for row in batch.rows})
        batch, finished = super().step(batch)
        self.events.append(("step", ""))
        self.events += [("done", row.owner.handle.request.prompt) for row in finished if hasattr(row.owner, "handle")]
        return batch, finished


LONG = "apple house " * 60


def test_a_short_request_is_answered_between_the_chunks_of_a_long_prefill(tiny_model_dir: Path) -> None:
    engine = Recording(str(tiny_model_dir), model_name="tiny-llama", threads=1)
    batcher = BatchingBackend(engine, max_wait_ms=0, prefill_chunk=8)
    short: list = []

    def ask_short() -> None:  # the short request arrives during the long prefill's first pass
        if not short:
            short.append(batcher.submit(GenerationRequest(PROMPTS[1], SamplingParams(max_new_tokens=1))))

    engine.on_pass = ask_short
    try:
        [long_result] = batcher.submit(GenerationRequest(LONG, SamplingParams(max_new_tokens=2))).result(timeout=60)
        [short_result] = short[0].result(timeout=60)
    finally:
        batcher.close()
    long_passes = [k for k, event in enumerate(engine.events) if event == ("pass", LONG)]
    assert len(long_passes) >= len(engine.render(LONG)) // 8 > 10
    assert engine.events.index(("done", PROMPTS[1])) < long_passes[-1]  # answered mid-prefill of the long one
    [[alone]] = engine.generate([GenerationRequest(LONG, SamplingParams(max_new_tokens=2))])
    assert long_result.token_ids == alone.token_ids  # chunks and a stranger's rows in between change nothing
    assert short_result.num_tokens == 1
    assert batcher.prefills_started == batcher.prefills == 2


def test_a_prefill_whose_caller_left_is_dropped_between_its_chunks(tiny_model_dir: Path) -> None:
    engine = Recording(str(tiny_model_dir), model_name="tiny-llama", threads=1)
    batcher = BatchingBackend(engine, max_wait_ms=0, prefill_chunk=8)
    gone = threading.Event()
    engine.on_pass = gone.set  # the client hangs up as soon as its prefill began
    try:
        handle = batcher.submit(GenerationRequest(LONG, SamplingParams(max_new_tokens=50)), cancel=gone)
        with pytest.raises(GenerationCancelled):
            handle.result(timeout=60)
        assert batcher.dropped_rows == 1 and batcher.prefills == 0 and batcher.steps == 0
        assert batcher.prefills_started == 1  # begun, never done
        assert len(engine.events) <= 2  # one pass, perhaps a second already begun; not the 30 it needed
        engine.on_pass = lambda: None
        assert batcher.generate([GenerationRequest(PROMPTS[0], PARAMS)])[0][0].num_tokens > 0  # still serving
    finally:
        batcher.close()


@pytest.mark.parametrize("running", [INTERACTIVE, BACKGROUND])
def test_a_background_prefill_is_paced_beside_interactive_rows(tiny_model_dir: Path, running: int) -> None:
    engine = Recording(str(tiny_model_dir), model_name="tiny-llama", threads=1)
    batcher = BatchingBackend(engine, max_wait_ms=0, prefill_chunk=8)
    try:
        decoding = batcher.submit(GenerationRequest(PROMPTS[0], endless(engine, 400), priority=running))
        next(decoding.deltas())
        batcher.generate([GenerationRequest(LONG, SamplingParams(max_new_tokens=2), priority=BACKGROUND)])
        assert not decoding.done  # the decode ran beside the whole prefill
        decoding.cancel()
    finally:
        batcher.close()
    passes = [k for k, event in enumerate(engine.events) if event == ("pass", LONG)]
    steps_between = [engine.events[a:b].count(("step", "")) for a, b in zip(passes, passes[1:])]
    assert len(passes) > 10
    if running == INTERACTIVE:  # one pass of the System 2 prompt every BACKGROUND_PREFILL_EVERY steps
        assert steps_between == [BACKGROUND_PREFILL_EVERY] * len(steps_between)
        assert batcher.paced_passes >= (BACKGROUND_PREFILL_EVERY - 1) * len(steps_between)  # and the first's wait
    else:  # equals share every iteration
        assert steps_between == [1] * len(steps_between) and batcher.paced_passes == 0


def test_interactive_requests_are_admitted_before_background_ones_that_came_first(tiny_model_dir: Path) -> None:
    engine = Recording(str(tiny_model_dir), model_name="tiny-llama", threads=1)
    batcher = BatchingBackend(engine, max_batch=1, max_wait_ms=0)
    try:
        first = batcher.submit(GenerationRequest(PROMPTS[0], endless(engine, 60)))
        next(first.deltas())  # the batch is full from here on
        later = batcher.submit(GenerationRequest(PROMPTS[1], endless(engine, 2), priority=BACKGROUND))
        urgent = batcher.submit(GenerationRequest(PROMPTS[2], endless(engine, 2)))
        for handle in (first, later, urgent):
            handle.result(timeout=60)
    finally:
        batcher.close()
    done = [prompt for kind, prompt in engine.events if kind == "done"]
    assert done == [PROMPTS[0], PROMPTS[2], PROMPTS[1]]


def test_idle_rows_wait_whole_while_interactive_rows_decode(tiny_model_dir: Path) -> None:
    """Background labels never share a step with a user's request: their rows wait with their cache, go on
    afterwards, and end as if they had run alone. The idle lane does not take the user's batch slot either."""
    engine = Recording(str(tiny_model_dir), model_name="tiny-llama", threads=1)
    [[alone]] = engine.generate([GenerationRequest(PROMPTS[0], endless(engine, 40))])
    batcher = BatchingBackend(engine, max_batch=1, max_wait_ms=0)
    try:
        idle = batcher.submit(GenerationRequest(PROMPTS[0], endless(engine, 40), priority=IDLE))
        next(idle.deltas())
        [[urgent]] = batcher.generate([GenerationRequest(PROMPTS[1], endless(engine, 8))])
        assert not idle.done  # it waited: 8 steps of the user's row ran while it had 39 left
        [labelled] = idle.result(timeout=60)
    finally:
        batcher.close()
    assert urgent.num_tokens == 8 and labelled.token_ids == alone.token_ids
    assert all(len(priorities) == 1 for priorities in engine.step_priorities)  # never in one step
    assert engine.step_priorities.count({INTERACTIVE}) == 8 and batcher.parked_steps >= 8
    assert engine.step_priorities[-1] == {IDLE}


def test_idle_rows_take_their_share_of_a_busy_engine_alone(tiny_model_dir: Path) -> None:
    """With ``idle_share``, a label makes progress while a user's row keeps the engine busy: it takes whole
    iterations of its own (never a shared step), about one in two at a share of 0.5, and ends as if alone."""
    engine = Recording(str(tiny_model_dir), model_name="tiny-llama", threads=1)
    [[alone]] = engine.generate([GenerationRequest(PROMPTS[0], endless(engine, 30))])
    batcher = BatchingBackend(engine, max_wait_ms=0, prefill_chunk=8, idle_share=0.5)
    try:
        busy = batcher.submit(GenerationRequest(PROMPTS[1], endless(engine, 400)))
        next(busy.deltas())
        [[labelled]] = batcher.generate([GenerationRequest(PROMPTS[0], endless(engine, 30), priority=IDLE)])
        assert not busy.done  # the label ended while the user's row still decoded
        busy.result(timeout=60)
    finally:
        batcher.close()
    assert labelled.token_ids == alone.token_ids
    assert all(len(priorities) == 1 for priorities in engine.step_priorities)  # never in one step
    idle_steps = [k for k, p in enumerate(engine.step_priorities) if p == {IDLE}]
    assert len(idle_steps) == 30 and batcher.idle_turns >= 30
    interleaved = engine.step_priorities[idle_steps[0]:idle_steps[-1] + 1]
    assert 0.2 < len(idle_steps) / len(interleaved) < 0.8  # about half of the busy stretch: timed, so loosely
    with pytest.raises(ValueError, match="idle_share"):
        BatchingBackend(engine, idle_share=1.0)


def test_an_idle_prefill_waits_for_interactive_rows(tiny_model_dir: Path) -> None:
    engine = Recording(str(tiny_model_dir), model_name="tiny-llama", threads=1)
    batcher = BatchingBackend(engine, max_wait_ms=0, prefill_chunk=8)
    try:
        decoding = batcher.submit(GenerationRequest(PROMPTS[0], endless(engine, 60)))
        next(decoding.deltas())
        idle = batcher.submit(GenerationRequest(LONG, SamplingParams(max_new_tokens=2), priority=IDLE))
        decoding.result(timeout=60)
        idle.result(timeout=60)
    finally:
        batcher.close()
    passes = [k for k, event in enumerate(engine.events) if event == ("pass", LONG)]
    last_interactive_step = max(k for k, event in enumerate(engine.events) if event == ("done", PROMPTS[0]))
    assert len(passes) > 10 and min(passes) > last_interactive_step  # not one pass beside the user's row
    assert batcher.paced_passes >= 1


def test_adapters_are_loaded_on_the_worker_thread(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Only the worker runs torch: an OpenMP team in a second thread slows every later bfloat16 step."""
    from tests.conftest import make_random_adapter

    class Loads(HFBackend):
        threads: list[str] = []

        def load_adapter(self, name: str, path: str) -> None:
            self.threads.append(threading.current_thread().name)
            super().load_adapter(name, path)

    batcher = BatchingBackend(Loads(str(tiny_model_dir), model_name="tiny-llama", threads=1), max_wait_ms=0)
    try:
        batcher.load_adapter("a", str(make_random_adapter(tiny_model_dir, tmp_path / "a")))
        with pytest.raises(AdapterError):  # a failure still reaches the caller
            batcher.load_adapter("b", str(tmp_path / "missing"))
        assert batcher.generate([GenerationRequest(PROMPTS[0], PARAMS, "a")])[0][0].num_tokens > 0
    finally:
        batcher.close()
    assert Loads.threads == ["s2agent-scheduler", "s2agent-scheduler"]


class CountsThreads(HFBackend):
    """Records the torch threads of each decode step."""

    seen: list[int] = []

    def step(self, batch):
        self.seen.append(torch.get_num_threads())
        return super().step(batch)


def test_lent_cores_change_the_threads_the_steps_compute_with(tiny_model_dir: Path) -> None:
    """The scheduler lends a training process cores this way: torch's thread count belongs to the thread that
    sets it, so it must be the worker's, the one every forward pass runs on."""
    CountsThreads.seen = []
    batcher = BatchingBackend(CountsThreads(str(tiny_model_dir), model_name="tiny-llama", threads=2), max_wait_ms=0)
    try:
        batcher.generate([GenerationRequest(PROMPTS[0], PARAMS)])
        assert set(CountsThreads.seen) == {2}
        batcher.lend_cores(1)  # no pauses: users compute with the cores left too
        CountsThreads.seen.clear()
        batcher.generate([GenerationRequest(PROMPTS[0], PARAMS)])
        assert set(CountsThreads.seen) == {1}
        batcher.lend_cores(None)  # back to what the worker started with
        CountsThreads.seen.clear()
        batcher.generate([GenerationRequest(PROMPTS[0], PARAMS)])
        assert set(CountsThreads.seen) == {2}
    finally:
        batcher.close()


def test_a_trainer_pauses_while_users_are_served_and_they_get_every_thread(tiny_model_dir: Path) -> None:
    """With a pause line, the process the cores are lent to is paused as soon as a user's request arrives
    (before it is admitted) and resumed when it has left; IDLE work alone never pauses it, and computes with the
    cores left to the engine, users' work with all of them."""
    CountsThreads.seen = []
    batcher = BatchingBackend(CountsThreads(str(tiny_model_dir), model_name="tiny-llama", threads=2), max_wait_ms=0)
    calls: list[bool] = []
    try:
        batcher.lend_cores(1, calls.append, TrainerTurns(turn=60.0))
        batcher.generate([GenerationRequest(PROMPTS[0], PARAMS, priority=IDLE)])
        assert calls == [] and set(CountsThreads.seen) == {1}
        CountsThreads.seen.clear()
        batcher.generate([GenerationRequest(PROMPTS[1], PARAMS)])
        wait_for(lambda: calls == [True, False], what="the trainer to be paused, then resumed")
        assert set(CountsThreads.seen) == {2}
        batcher.generate([GenerationRequest(PROMPTS[1], PARAMS, priority=BACKGROUND)])  # inline System 2: a user waits
        wait_for(lambda: calls == [True, False, True, False], what="a second pause")
        batcher.lend_cores(None)
        assert calls == [True, False, True, False]  # it was not paused: nothing more to say
    finally:
        batcher.close()


def test_a_trainer_paused_longer_than_its_longest_pause_computes_beside_users(tiny_model_dir: Path) -> None:
    """Users that never leave the engine idle get the trainer paused at most a turn at a stretch; taking the cores
    back resumes a paused trainer."""
    engine = CountsThreads(str(tiny_model_dir), model_name="tiny-llama", threads=2)
    batcher = BatchingBackend(engine, max_wait_ms=0)
    calls: list[bool] = []
    try:
        batcher.lend_cores(1, calls.append, TrainerTurns(turn=0.05))
        CountsThreads.seen = []
        batcher.generate([GenerationRequest(PROMPTS[0], endless(engine, 300))])
        wait_for(lambda: calls and not calls[-1], what="the trainer to compute once the request is done")
        # paused at once, then its turn came while the request still decoded, and so on, turn by turn
        assert len(calls) > 2 and calls == [True, False] * (len(calls) // 2)
        threads = CountsThreads.seen
        assert threads[0] == 2 and 1 in threads  # every thread while it waited, the cores left on its turns
        batcher.lend_cores(1, calls.append, TrainerTurns(turn=60.0))
        calls.clear()
        handle = batcher.submit(GenerationRequest(PROMPTS[0], endless(engine, 300)))
        assert calls == [True]
        batcher.lend_cores(None)  # the process goes on at once, while the request still runs
        assert calls == [True, False]
        handle.result()
    finally:
        batcher.close()


def test_stream_helpers_work_on_a_backend_without_steps(engine: HFBackend) -> None:
    handle = stream.submit(engine, GenerationRequest(PROMPTS[0], PARAMS))
    assert handle.done
    [result] = handle.result()
    assert "".join(d.text for d in handle.deltas()) == result.text
    assert stream.generate(engine, [GenerationRequest(PROMPTS[0], PARAMS)])[0][0].token_ids == result.token_ids


def test_text_delta_holds_back_what_may_still_change() -> None:
    assert stream.text_delta("Hello wor", 0, (), False) == ("Hello wor", 9)
    assert stream.text_delta("Hello \ufffd", 0, (), False) == ("Hello ", 6)  # half a character
    assert stream.text_delta("Hello STO", 0, ("STOP",), False) == ("Hello ", 6)  # could become the stop string
    assert stream.text_delta("Hello", 6, ("STOP",), True) == ("", 6)
    assert stream.text_delta("Hello STO", 6, ("STOP",), True) == ("STO", 9)
