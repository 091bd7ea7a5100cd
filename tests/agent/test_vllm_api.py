"""The vLLM backend against vLLM's real Python API, without a GPU.

vLLM's engine needs a GPU, but its Python API imports on a CPU machine when the wheel is installed with
``--no-deps`` beside the CPU torch (``.ci/vllm-api.sh`` builds that environment; CI runs this file in it;
elsewhere it is skipped). Everything the backend hands vLLM is built with vLLM's own classes here
(``AsyncEngineArgs``, whose constructor refuses an unknown keyword, ``SamplingParams``, ``TokensPrompt``,
``LoRARequest``) and every call is bound to the real signatures (``AsyncLLM.from_engine_args``,
``generate``, ``add_lora``, ``remove_lora``), so a misspelt keyword or a changed signature fails here. Only
the engine itself is left out: ``AsyncLLM.__init__`` is not run, and ``generate`` answers with vLLM's own
output classes, one more token per output as the engine's default (cumulative) output kind does.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
import typing
from types import SimpleNamespace

import pytest

vllm = pytest.importorskip("vllm", reason="vLLM's Python API is not installed (see .ci/vllm-api.sh)")

from vllm.engine.arg_utils import AsyncEngineArgs  # noqa: E402
from vllm.inputs import TokensPrompt  # noqa: E402
from vllm.logprobs import Logprob  # noqa: E402
from vllm.lora.request import LoRARequest  # noqa: E402
from vllm.outputs import CompletionOutput, RequestOutput  # noqa: E402
from vllm.sampling_params import RequestOutputKind  # noqa: E402
from vllm.v1.engine.async_llm import AsyncLLM  # noqa: E402

from agent.backends.base import BACKGROUND, GenerationRequest, SamplingParams  # noqa: E402
from agent.errors import GenerationCancelled  # noqa: E402
from tests.conftest import make_random_adapter, wait_for  # noqa: E402
from tests.fakes import script_engine, scripted_generate  # noqa: E402

ASK = [{"role": "user", "content": "What is the capital of France?"}]


class EngineLessAsyncLLM(AsyncLLM):
    """``AsyncLLM`` with the engine left out: every call is checked against the real signatures, and
    ``generate`` answers with real ``RequestOutput``/``CompletionOutput``/``Logprob``."""

    instances: list["EngineLessAsyncLLM"] = []
    stream: list[int] = []
    eos: int = -1
    hold: threading.Event | None = None

    @classmethod
    def from_engine_args(cls, engine_args, *args, **kwargs):  # type: ignore[override]
        inspect.signature(AsyncLLM.from_engine_args).bind(engine_args, *args, **kwargs)
        assert isinstance(engine_args, AsyncEngineArgs)
        asyncio.get_running_loop()  # built on the loop that will drive it
        engine = cls.__new__(cls)  # AsyncLLM.__init__ would start the engine
        engine.args = engine_args
        engine.model_config = SimpleNamespace(max_model_len=engine_args.max_model_len)
        engine.calls, engine.cancelled, engine.added, engine.removed = [], [], [], []
        engine.shut = False
        cls.instances.append(engine)
        return engine

    async def generate(self, prompt, sampling_params, request_id, **kwargs):  # type: ignore[override]
        inspect.signature(AsyncLLM.generate).bind(self, prompt, sampling_params, request_id, **kwargs)
        assert isinstance(prompt, dict) and set(prompt) <= set(typing.get_type_hints(TokensPrompt))
        assert isinstance(sampling_params, vllm.SamplingParams) and isinstance(request_id, str)
        lora = kwargs.get("lora_request")
        assert lora is None or isinstance(lora, LoRARequest)
        self.calls.append((prompt, sampling_params, lora, request_id, kwargs.get("priority", 0)))

        def output(tokens, finish):
            logprobs = [{t: Logprob(logprob=-0.25, rank=1),
                         **({t + 1: Logprob(logprob=-1.5, rank=2)} if sampling_params.logprobs else {})}
                        for t in tokens]  # the sampled token first, then (when asked) one more of the likeliest
            samples = [CompletionOutput(index=j, text="", token_ids=list(tokens), cumulative_logprob=None,
                                        logprobs=logprobs, finish_reason=finish, stop_reason=None)
                       for j in range(sampling_params.n)]
            return RequestOutput(request_id=request_id, prompt=None, prompt_token_ids=prompt["prompt_token_ids"],
                                 prompt_logprobs=None, outputs=samples, finished=finish is not None)

        async for out in scripted_generate(self, sampling_params.max_tokens, request_id, output):
            yield out

    async def add_lora(self, lora_request):  # type: ignore[override]
        inspect.signature(AsyncLLM.add_lora).bind(self, lora_request)
        assert isinstance(lora_request, LoRARequest)
        self.added.append(lora_request)
        return True

    async def remove_lora(self, lora_id):  # type: ignore[override]
        inspect.signature(AsyncLLM.remove_lora).bind(self, lora_id)
        self.removed.append(lora_id)
        return True

    def shutdown(self, timeout=None):  # type: ignore[override]
        inspect.signature(AsyncLLM.shutdown).bind(self, timeout)
        self.shut = True


@pytest.fixture
def engine_less(monkeypatch, tiny_model_dir):
    tok = script_engine(EngineLessAsyncLLM, tiny_model_dir)
    monkeypatch.setattr("vllm.v1.engine.async_llm.AsyncLLM", EngineLessAsyncLLM)
    return tok


@pytest.fixture
def backend(engine_less, tiny_model_dir):
    from agent.backends.vllm import VLLMBackend

    backend = VLLMBackend(str(tiny_model_dir), model_name="tiny", max_model_len=256, max_lora_rank=8)
    yield backend
    backend.close()


def test_the_engine_is_built_with_keywords_vllm_takes(engine_less, tiny_model_dir):
    from agent.backends.vllm import VLLMBackend

    backend = VLLMBackend(str(tiny_model_dir), model_name="tiny", max_model_len=64, max_loras=2, max_lora_rank=8,
                          gpu_memory_utilization=0.3, enforce_eager=True, tensor_parallel_size=1)
    args = EngineLessAsyncLLM.instances[-1].args
    assert args.enable_lora is True and args.max_lora_rank == 8 and args.max_loras == 2
    assert args.scheduling_policy == "priority"  # else vLLM ignores each request's priority
    assert backend.context_length == 64
    backend.close()
    assert EngineLessAsyncLLM.instances[-1].shut
    with pytest.raises(TypeError, match="max_model_lenght"):
        VLLMBackend(str(tiny_model_dir), model_name="tiny", max_model_lenght=64)  # a typo is caught here


def test_requests_are_real_vllm_objects_and_outputs_are_read_from_real_ones(backend, engine_less, tiny_backend):
    greedy = SamplingParams(n=2, max_new_tokens=32)
    seeded = SamplingParams(n=2, temperature=0.7, top_k=0, top_p=0.9, seed=5, max_new_tokens=2, stop=("zz",))
    free = SamplingParams(n=2, temperature=1.0, top_k=7, max_new_tokens=32, stop=(" B",))
    out = backend.generate([GenerationRequest(ASK, greedy), GenerationRequest("raw", seeded),
                            GenerationRequest(ASK, free, priority=BACKGROUND)])
    calls = EngineLessAsyncLLM.instances[-1].calls
    assert sorted(c[4] for c in calls) == [0, 0, 0, BACKGROUND]
    params = sorted((c[1] for c in calls), key=lambda p: (p.n, p.seed or 0, p.temperature))
    assert all(c[2] is None for c in calls) and len({c[3] for c in calls}) == len(calls)  # unique request ids
    assert {"prompt_token_ids": tiny_backend.render(ASK)} in [c[0] for c in calls]
    assert [(p.n, p.seed) for p in params] == [(1, None), (1, 5), (1, 6), (2, None)]
    assert params[0].temperature == 0.0 and params[3].top_k == 7 and params[3].stop == [" B"]
    assert all(p.logprobs == 0 and engine_less.eos_token_id in p.stop_token_ids for p in params)
    assert all(p.output_kind == RequestOutputKind.FINAL_ONLY for p in params)  # nothing sent per step
    first = out[0][0]
    assert first.token_ids == EngineLessAsyncLLM.stream and first.finish_reason == "stop"  # the EOS is dropped
    assert first.logprobs == [-0.25] * len(first.token_ids) and first.text == " A B 0123"
    assert out[1][0].finish_reason == "length" and len(out[1][0].token_ids) == 2
    assert out[2][0].text == " A" and [len(c) for c in out] == [2, 2, 2]


def test_streaming_reads_real_cumulative_outputs_and_a_cancel_reaches_the_engine(backend):
    handle = backend.submit(GenerationRequest(ASK, SamplingParams(max_new_tokens=32)))
    deltas = list(handle.deltas(timeout=10))
    assert len(deltas) > 3 and "".join(d.text for d in deltas) == handle.result()[0].text == " A B 0123"
    assert EngineLessAsyncLLM.instances[-1].calls[-1][1].output_kind == RequestOutputKind.CUMULATIVE
    assert "await self.abort(" in inspect.getsource(AsyncLLM.generate)  # vLLM aborts a generate that is cancelled
    engine = EngineLessAsyncLLM.instances[-1]
    EngineLessAsyncLLM.hold = threading.Event()
    handle = backend.submit(GenerationRequest(ASK, SamplingParams(max_new_tokens=32)))
    handle.cancel()
    with pytest.raises(GenerationCancelled):
        handle.result(timeout=10)
    wait_for(lambda: engine.cancelled == [engine.calls[-1][3]], 10, "the engine's generate to be cancelled")


def test_adapters_travel_as_real_lora_requests_and_are_freed_through_the_engine(backend, tiny_model_dir, tmp_path):
    engine = EngineLessAsyncLLM.instances[-1]
    path = make_random_adapter(tiny_model_dir, tmp_path / "a")
    backend.load_adapter("v1", str(path))
    backend.load_adapter("v2", str(path))
    assert [lora.lora_name for lora in engine.added] == ["v1", "v2"]
    backend.generate([GenerationRequest("x", adapter="v1"), GenerationRequest("x"), GenerationRequest("x", adapter="v2")])
    loras = {c[2].lora_name: c[2] for c in engine.calls if c[2] is not None}
    assert loras["v1"].lora_int_id != loras["v2"].lora_int_id and loras["v1"].lora_path == str(path.resolve())
    backend.unload_adapter("v1")
    wait_for(lambda: engine.removed == [loras["v1"].lora_int_id], 10, "the adapter's weights to be freed")


def test_openai_sampling_options_reach_vllm_and_top_logprobs_come_back(backend, engine_less):
    params = SamplingParams(max_new_tokens=4, top_logprobs=2, presence_penalty=0.5, frequency_penalty=0.25,
                            logit_bias=((7, -100.0), (9, 5.0)))
    [[completion]] = backend.generate([GenerationRequest(ASK, params)])
    sent = EngineLessAsyncLLM.instances[-1].calls[-1][1]
    assert (sent.logprobs, sent.presence_penalty, sent.frequency_penalty) == (2, 0.5, 0.25)
    assert sent.logit_bias == {7: -100.0, 9: 5.0}
    first = EngineLessAsyncLLM.stream[0]
    assert completion.tokens[0] == engine_less.decode([first])
    assert completion.top_logprobs[0] == [(engine_less.decode([first]), -0.25), (engine_less.decode([first + 1]), -1.5)]
    [[plain]] = backend.generate([GenerationRequest(ASK, SamplingParams(max_new_tokens=4))])
    assert plain.tokens is None and plain.top_logprobs is None
    assert EngineLessAsyncLLM.instances[-1].calls[-1][1].logit_bias is None
