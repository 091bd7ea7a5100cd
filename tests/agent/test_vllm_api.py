"""The vLLM backend against vLLM's real Python API, without a GPU.

vLLM's engine needs a GPU, but its Python API imports on a CPU machine when the wheel is installed with
``--no-deps`` beside the CPU torch (``.ci/vllm-api.sh`` builds that environment; CI runs this file in it;
elsewhere it is skipped). Everything the backend hands vLLM is built with vLLM's own classes here
(``SamplingParams``, ``TokensPrompt``, ``LoRARequest``) and every call is bound to the real signatures
(``LLM.__init__`` and the ``EngineArgs`` it forwards to, ``LLM.generate``), so a misspelt keyword or a
changed signature fails here. Only the engine itself is left out: ``LLM.__init__`` is not run, and
``generate`` answers with vLLM's own output classes.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from types import SimpleNamespace

import pytest

vllm = pytest.importorskip("vllm", reason="vLLM's Python API is not installed (see .ci/vllm-api.sh)")

from vllm.engine.arg_utils import EngineArgs  # noqa: E402
from vllm.inputs import TokensPrompt  # noqa: E402
from vllm.logprobs import Logprob  # noqa: E402
from vllm.lora.request import LoRARequest  # noqa: E402
from vllm.outputs import CompletionOutput, RequestOutput  # noqa: E402
from vllm.v1.engine.llm_engine import LLMEngine  # noqa: E402

from agent.backends.base import GenerationRequest, SamplingParams  # noqa: E402
from tests.conftest import make_random_adapter  # noqa: E402
from tests.fakes import script_engine  # noqa: E402

ASK = [{"role": "user", "content": "What is the capital of France?"}]


class EngineLessLLM(vllm.LLM):
    """``vllm.LLM`` with the engine left out: construction and ``generate`` are checked against the real
    signatures, and ``generate`` answers with real ``RequestOutput``/``CompletionOutput``/``Logprob``."""

    instances: list["EngineLessLLM"] = []
    stream: list[int] = []
    eos: int = -1

    def __init__(self, **kwargs: typing.Any) -> None:  # noqa: D107 - the real __init__ would start an engine
        bound = inspect.signature(vllm.LLM.__init__).bind(self, **kwargs)
        forwarded = bound.arguments.get("kwargs", {})  # what LLM passes on to EngineArgs
        unknown = set(forwarded) - {f.name for f in dataclasses.fields(EngineArgs)}
        assert not unknown, f"neither LLM nor EngineArgs takes {sorted(unknown)}"
        self.kwargs = kwargs
        self.calls: list[tuple[list, list, list | None]] = []
        self.removed: list[int] = []
        self.llm_engine = SimpleNamespace(model_config=SimpleNamespace(max_model_len=kwargs.get("max_model_len")),
                                          remove_lora=self.removed.append)
        EngineLessLLM.instances.append(self)

    def generate(self, prompts, sampling_params=None, **kwargs):  # type: ignore[override]
        inspect.signature(vllm.LLM.generate).bind(self, prompts, sampling_params, **kwargs)
        allowed = set(typing.get_type_hints(TokensPrompt))
        assert all(isinstance(p, dict) and set(p) <= allowed and "prompt_token_ids" in p for p in prompts)
        assert all(isinstance(sp, vllm.SamplingParams) for sp in sampling_params)
        loras = kwargs.get("lora_request")
        assert loras is None or all(lora is None or isinstance(lora, LoRARequest) for lora in loras)
        self.calls.append((prompts, sampling_params, loras))
        outputs = []
        for i, (prompt, sp) in enumerate(zip(prompts, sampling_params)):
            tokens = (self.stream + [self.eos])[: sp.max_tokens]
            finish = "stop" if tokens[-1] == self.eos else "length"
            steps = [{t: Logprob(logprob=-0.25, rank=1), **({t + 1: Logprob(logprob=-1.5, rank=2)} if sp.logprobs else {})}
                     for t in tokens]  # the sampled token first, then (when asked) one more of the likeliest
            samples = [CompletionOutput(index=j, text="", token_ids=list(tokens), cumulative_logprob=None,
                                        logprobs=steps,
                                        finish_reason=finish, stop_reason=None) for j in range(sp.n)]
            outputs.append(RequestOutput(request_id=str(i), prompt=None, prompt_token_ids=prompt["prompt_token_ids"],
                                         prompt_logprobs=None, outputs=samples, finished=True))
        return outputs


@pytest.fixture
def engine_less(monkeypatch, tiny_model_dir):
    tok = script_engine(EngineLessLLM, tiny_model_dir)
    monkeypatch.setattr(vllm, "LLM", EngineLessLLM)
    return tok


def test_the_engine_is_built_with_keywords_vllm_takes(engine_less, tiny_model_dir):
    from agent.backends.vllm import VLLMBackend

    backend = VLLMBackend(str(tiny_model_dir), model_name="tiny", max_model_len=64, max_loras=2, max_lora_rank=8,
                          gpu_memory_utilization=0.3, enforce_eager=True, tensor_parallel_size=1)
    llm = EngineLessLLM.instances[-1]
    assert llm.kwargs["enable_lora"] is True and llm.kwargs["max_lora_rank"] == 8
    assert backend.context_length == 64
    with pytest.raises(AssertionError, match="takes"):
        VLLMBackend(str(tiny_model_dir), model_name="tiny", max_model_lenght=64)  # a typo is caught here


def test_requests_are_real_vllm_objects_and_outputs_are_read_from_real_ones(engine_less, tiny_model_dir, tiny_backend):
    from agent.backends.vllm import VLLMBackend

    backend = VLLMBackend(str(tiny_model_dir), model_name="tiny", max_model_len=64)
    greedy = SamplingParams(n=2, max_new_tokens=32)
    seeded = SamplingParams(n=2, temperature=0.7, top_k=0, top_p=0.9, seed=5, max_new_tokens=2, stop=("zz",))
    free = SamplingParams(n=2, temperature=1.0, top_k=7, max_new_tokens=32, stop=(" B",))
    out = backend.generate([GenerationRequest(ASK, greedy), GenerationRequest("raw", seeded),
                            GenerationRequest(ASK, free)])
    prompts, params, loras = EngineLessLLM.instances[-1].calls[-1]
    assert loras is None and prompts[0]["prompt_token_ids"] == tiny_backend.render(ASK)
    assert [p.n for p in params] == [1, 1, 1, 2] and [p.seed for p in params] == [None, 5, 6, None]
    assert params[0].temperature == 0.0 and params[3].top_k == 7 and params[3].stop == [" B"]
    assert all(p.logprobs == 0 and engine_less.eos_token_id in p.stop_token_ids for p in params)
    first = out[0][0]
    assert first.token_ids == EngineLessLLM.stream and first.finish_reason == "stop"  # the EOS is dropped
    assert first.logprobs == [-0.25] * len(first.token_ids) and first.text == " A B 0123"
    assert out[1][0].finish_reason == "length" and len(out[1][0].token_ids) == 2
    assert out[2][0].text == " A" and [len(c) for c in out] == [2, 2, 2]


def test_adapters_travel_as_real_lora_requests_and_are_removed_through_the_engine(engine_less, tiny_model_dir,
                                                                                  tmp_path):
    from agent.backends.vllm import VLLMBackend

    assert callable(LLMEngine.remove_lora)  # what unload_adapter reaches for on the real engine
    backend = VLLMBackend(str(tiny_model_dir), model_name="tiny", max_model_len=256, max_lora_rank=8)
    path = make_random_adapter(tiny_model_dir, tmp_path / "a")
    backend.load_adapter("v1", str(path))
    backend.load_adapter("v2", str(path))
    backend.generate([GenerationRequest("x", adapter="v1"), GenerationRequest("x"), GenerationRequest("x", adapter="v2")])
    llm = EngineLessLLM.instances[-1]
    loras = llm.calls[-1][2]
    assert loras[1] is None and (loras[0].lora_name, loras[2].lora_name) == ("v1", "v2")
    assert loras[0].lora_int_id != loras[2].lora_int_id and loras[0].lora_path == str(path.resolve())
    backend.unload_adapter("v1")
    backend.generate([GenerationRequest("x", adapter="v2")])
    assert llm.removed == [loras[0].lora_int_id]


def test_openai_sampling_options_reach_vllm_and_top_logprobs_come_back(engine_less, tiny_model_dir):
    from agent.backends.vllm import VLLMBackend

    backend = VLLMBackend(str(tiny_model_dir), model_name="tiny", max_model_len=64)
    params = SamplingParams(max_new_tokens=4, top_logprobs=2, presence_penalty=0.5, frequency_penalty=0.25,
                            logit_bias=((7, -100.0), (9, 5.0)))
    [[completion]] = backend.generate([GenerationRequest(ASK, params)])
    [sent] = EngineLessLLM.instances[-1].calls[-1][1]
    assert (sent.logprobs, sent.presence_penalty, sent.frequency_penalty) == (2, 0.5, 0.25)
    assert sent.logit_bias == {7: -100.0, 9: 5.0}
    first = EngineLessLLM.stream[0]
    assert completion.tokens[0] == engine_less.decode([first])
    assert completion.top_logprobs[0] == [(engine_less.decode([first]), -0.25), (engine_less.decode([first + 1]), -1.5)]
    [[plain]] = backend.generate([GenerationRequest(ASK, SamplingParams(max_new_tokens=4))])
    assert plain.tokens is None and plain.top_logprobs is None
    assert EngineLessLLM.instances[-1].calls[-1][1][0].logit_bias is None
