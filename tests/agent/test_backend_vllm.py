"""The vLLM backend.

Three layers, from cheapest to most real:
- the import guard runs everywhere (vLLM is an optional GPU extra);
- the request mapping runs everywhere against a stand-in of vLLM's *documented* async API (it checks
  this module's own logic: prompt token ids, sampling params, per-request LoRA, EOS and stop-string
  handling, streaming, cancellation, adapter lifetimes; it says nothing about vLLM itself, which
  ``test_vllm_api.py`` checks against the real classes);
- the behavioural checks (the same ones the HF backend must pass) run only with vLLM and a CUDA GPU.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
import types
from dataclasses import dataclass

import pytest

from agent.backends.base import BACKGROUND, GenerationRequest, SamplingParams
from agent.errors import AdapterError, GenerationCancelled, PromptTooLongError
from tests.conftest import make_random_adapter, wait_for
from tests.fakes import script_engine, scripted_generate

ASK = [{"role": "user", "content": "What is the capital of France?"}]


# --- runs everywhere: the import guard -------------------------------------------------------------------------
def test_missing_vllm_raises_helpful_import_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` raise ImportError, installed or not
    from agent.backends.vllm import VLLMBackend

    with pytest.raises(ImportError, match=r"needs a GPU and `pip install s2agent\[vllm\]`"):
        VLLMBackend(str(tmp_path / "no-model"), model_name="x")


def test_make_backend_vllm_without_vllm(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "vllm", None)
    from agent.backends import make_backend

    with pytest.raises(ImportError, match="pip install s2agent"):
        make_backend("vllm", str(tmp_path), model_name="x")


# --- runs everywhere: our mapping onto a stand-in of the documented API -----------------------------------------
@dataclass
class _Logprob:
    logprob: float


@dataclass
class _Sample:
    index: int
    token_ids: list[int]
    logprobs: list[dict[int, _Logprob]]
    finish_reason: str | None
    stop_reason: object = None


@dataclass
class _RequestOutput:
    outputs: list[_Sample]
    finished: bool


class _StubAsyncLLM:
    """Emits a fixed token stream, then the tokenizer's EOS, one token per output; records every call.
    ``hold``: an event each generation waits on before its first output (a request that stays in flight)."""

    instances: list["_StubAsyncLLM"] = []
    stream: list[int] = []
    eos: int = -1
    hold: threading.Event | None = None

    def __init__(self, args):
        self.kwargs = vars(args)
        self.calls: list[tuple] = []
        self.cancelled: list[str] = []
        self.added: list[tuple] = []
        self.removed: list[int] = []
        self.shut = False
        self.model_config = types.SimpleNamespace(max_model_len=self.kwargs.get("max_model_len") or 64)
        _StubAsyncLLM.instances.append(self)

    @classmethod
    def from_engine_args(cls, args):
        asyncio.get_running_loop()  # built on the loop that drives it
        return cls(args)

    async def generate(self, prompt, sampling_params, request_id, *, lora_request=None, priority=0):
        self.calls.append((prompt, sampling_params, lora_request, priority))

        def output(tokens, finish):
            return _RequestOutput([_Sample(i, list(tokens), [{t: _Logprob(-0.25)} for t in tokens], finish)
                                   for i in range(sampling_params.n)], finish is not None)

        async for out in scripted_generate(self, sampling_params.max_tokens, request_id, output):
            yield out

    async def add_lora(self, lora_request) -> bool:
        self.added.append(lora_request)
        return True

    async def remove_lora(self, lora_id: int) -> bool:
        self.removed.append(lora_id)
        return True

    def shutdown(self) -> None:
        self.shut = True


@pytest.fixture
def stub_vllm(monkeypatch, tiny_model_dir):
    tok = script_engine(_StubAsyncLLM, tiny_model_dir)
    modules = {name: types.ModuleType(name) for name in (
        "vllm", "vllm.inputs", "vllm.lora", "vllm.lora.request", "vllm.engine", "vllm.engine.arg_utils",
        "vllm.v1", "vllm.v1.engine", "vllm.v1.engine.async_llm", "vllm.sampling_params")}
    modules["vllm"].SamplingParams = lambda **kw: types.SimpleNamespace(**kw)
    modules["vllm.sampling_params"].RequestOutputKind = types.SimpleNamespace(CUMULATIVE=0, FINAL_ONLY=2)
    modules["vllm.inputs"].TokensPrompt = lambda **kw: dict(kw)
    modules["vllm.lora.request"].LoRARequest = lambda name, lora_id, path: types.SimpleNamespace(
        lora_name=name, lora_int_id=lora_id, lora_path=path)
    modules["vllm.engine.arg_utils"].AsyncEngineArgs = lambda **kw: types.SimpleNamespace(**kw)
    modules["vllm.v1.engine.async_llm"].AsyncLLM = _StubAsyncLLM
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    return tok


@pytest.fixture
def stub_backend(stub_vllm, tiny_model_dir):
    from agent.backends.vllm import VLLMBackend

    backend = VLLMBackend(str(tiny_model_dir), model_name="tiny", max_model_len=256, max_lora_rank=8)
    yield backend
    backend.close()


def test_stub_prompts_params_and_outputs(stub_vllm, stub_backend, tiny_backend):
    backend, engine = stub_backend, _StubAsyncLLM.instances[-1]
    assert engine.kwargs["enable_lora"] is True and backend.context_length == 256
    assert engine.kwargs["scheduling_policy"] == "priority"
    # byte-identical prompts with the HF backend
    assert backend.render(ASK) == tiny_backend.render(ASK)
    assert backend.count_tokens("plain text") == tiny_backend.count_tokens("plain text")

    greedy = SamplingParams(n=3, max_new_tokens=32)
    seeded = SamplingParams(n=3, temperature=0.7, top_k=0, top_p=0.9, seed=5, max_new_tokens=2, stop=("zz",))
    free = SamplingParams(n=2, temperature=1.0, top_k=7, max_new_tokens=32, stop=(" B",))
    out = backend.generate([GenerationRequest(ASK, greedy), GenerationRequest("raw", seeded),
                            GenerationRequest(ASK, free, priority=BACKGROUND)])
    prompts = [c[0] for c in engine.calls]
    assert sorted(c[3] for c in engine.calls) == [0, 0, 0, 0, BACKGROUND]  # System 2's samples after System 1
    params = sorted((c[1] for c in engine.calls), key=lambda p: (p.n, p.seed or 0, p.temperature))
    assert all(c[2] is None for c in engine.calls)
    assert {"prompt_token_ids": tiny_backend.render(ASK)} in prompts
    # greedy: one decode stands for all; seeded: one request per sample with seed+j; unseeded: one request, n samples
    assert [(p.n, p.seed) for p in params] == [(1, None), (1, 5), (1, 6), (1, 7), (2, None)]
    assert params[0].temperature == 0.0 and params[0].top_k == -1
    assert params[1].top_k == -1 and params[1].top_p == 0.9 and params[1].stop == ["zz"]
    assert params[4].top_k == 7 and params[4].stop == [" B"]
    assert all(p.logprobs == 0 and stub_vllm.eos_token_id in p.stop_token_ids for p in params)
    assert [len(c) for c in out] == [3, 3, 2]
    first = out[0][0]
    assert first.finish_reason == "stop" and first.token_ids == _StubAsyncLLM.stream  # EOS dropped
    assert first.logprobs == [-0.25] * len(first.token_ids) and first.text == " A B 0123"
    assert first.prompt_tokens == len(tiny_backend.render(ASK))
    assert out[0][1] is not first and out[0][1].token_ids == first.token_ids
    assert out[1][0].finish_reason == "length" and len(out[1][0].token_ids) == 2
    assert out[2][0].text == " A" and out[2][0].finish_reason == "stop"

    calls = len(engine.calls)
    with pytest.raises(PromptTooLongError):
        backend.generate([GenerationRequest(ASK, SamplingParams(max_new_tokens=250))])
    assert len(engine.calls) == calls


def test_stub_streams_text_as_the_engine_decodes_and_cancel_aborts(stub_backend):
    from agent.backends import stream

    handle = stream.submit(stub_backend, GenerationRequest(ASK, SamplingParams(n=2, temperature=1.0, seed=1,
                                                                               max_new_tokens=32)))
    deltas = list(handle.deltas(timeout=10))
    result = handle.result()
    for index in (0, 1):
        mine = [d for d in deltas if d.index == index]
        assert len(mine) > 3 and "".join(d.text for d in mine) == result[index].text == " A B 0123"
        assert mine[-1].finish_reason == "stop" and all(d.finish_reason is None for d in mine[:-1])
    engine = _StubAsyncLLM.instances[-1]
    _StubAsyncLLM.hold = threading.Event()  # the next request stays in flight until cancelled
    gone = threading.Event()
    handle = stub_backend.submit(GenerationRequest(ASK, SamplingParams(max_new_tokens=32)), cancel=gone)
    gone.set()
    with pytest.raises(GenerationCancelled):
        handle.result(timeout=10)
    wait_for(lambda: len(engine.cancelled) == 1, 10, "the engine's generate to be cancelled")
    with pytest.raises(GenerationCancelled, match="deadline"):
        stub_backend.generate([GenerationRequest(ASK, SamplingParams(max_new_tokens=8))], deadline=time.monotonic() + 0.1)
    _StubAsyncLLM.hold.set()
    assert stub_backend.generate([GenerationRequest(ASK, SamplingParams(max_new_tokens=8))])[0][0].text


def test_the_vllm_section_of_the_config_starts_the_engine(stub_vllm, tiny_model_dir):
    from agent.backends import backend_for
    from agent.config import AgentConfig

    config = AgentConfig(model=str(tiny_model_dir), backend="vllm")
    config.vllm.max_model_len, config.vllm.gpu_memory_utilization, config.vllm.max_lora_rank = 64, 0.3, 16
    config.vllm.tensor_parallel_size, config.vllm.enforce_eager = 2, True
    backend = backend_for(config, str(tiny_model_dir))
    kwargs = _StubAsyncLLM.instances[-1].kwargs
    assert (kwargs["max_model_len"], kwargs["gpu_memory_utilization"], kwargs["max_lora_rank"]) == (64, 0.3, 16)
    assert (kwargs["tensor_parallel_size"], kwargs["enforce_eager"], kwargs["dtype"]) == (2, True, "auto")
    assert backend.context_length == 64 and backend.max_lora_rank == 16
    backend.close()


def test_stub_adapters_per_request(stub_backend, tiny_model_dir, tmp_path):
    backend, engine = stub_backend, _StubAsyncLLM.instances[-1]
    with pytest.raises(AdapterError):
        backend.load_adapter("missing", str(tmp_path / "nothing"))
    path = make_random_adapter(tiny_model_dir, tmp_path / "a")
    backend.load_adapter("a", str(path))
    backend.load_adapter("b", str(path))  # a hot-swap is just a new name
    with pytest.raises(AdapterError, match="max_lora_rank"):
        backend.load_adapter("wide", str(make_random_adapter(tiny_model_dir, tmp_path / "wide", rank=16)))
    assert [lora.lora_name for lora in engine.added] == ["a", "b"]  # loaded into the engine when loaded here
    backend.generate([GenerationRequest("x", adapter="a"), GenerationRequest("x"), GenerationRequest("x", adapter="b")])
    loras = {c[2].lora_name: c[2] for c in engine.calls if c[2] is not None}
    assert sum(c[2] is None for c in engine.calls) == 1
    assert loras["a"].lora_int_id != loras["b"].lora_int_id and loras["a"].lora_path == str(path.resolve())
    # Unloading while a request runs with it: new requests are refused at once, the running one finishes,
    # and then the weights are freed.
    _StubAsyncLLM.hold = threading.Event()
    running = backend.submit(GenerationRequest("x", SamplingParams(max_new_tokens=4), adapter="a"))
    backend.unload_adapter("a")
    with pytest.raises(AdapterError, match="not loaded"):
        backend.generate([GenerationRequest("x", adapter="a")])
    time.sleep(0.1)
    assert engine.removed == []
    _StubAsyncLLM.hold.set()
    assert running.result(timeout=10)[0].num_tokens == 4
    wait_for(lambda: engine.removed == [loras["a"].lora_int_id], 10, "the adapter's weights to be freed")
    backend.close()
    assert engine.shut
    with pytest.raises(RuntimeError, match="closed"):
        backend.generate([GenerationRequest("x")])


# --- needs vLLM and a CUDA GPU: the HF backend's behavioural checks ---------------------------------------------
@pytest.fixture(scope="module")
def vllm_backend(embedded_model_dir):
    pytest.importorskip("vllm")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("the vLLM backend needs a CUDA GPU")
    from agent.backends.vllm import VLLMBackend

    backend = VLLMBackend(embedded_model_dir, model_name="smollm2", max_model_len=2048, max_loras=2,
                          max_lora_rank=16, gpu_memory_utilization=0.3, enforce_eager=True)
    yield backend
    backend.close()


def gen(backend, prompt=ASK, adapter=None, **params):
    return backend.generate([GenerationRequest(prompt, SamplingParams(**params), adapter)])[0]


def check_completion(c, max_new_tokens):
    assert c.finish_reason in {"stop", "length"}
    assert len(c.logprobs) == len(c.token_ids) <= max_new_tokens
    assert all(lp <= 1e-4 for lp in c.logprobs)
    if c.finish_reason == "length":
        assert len(c.token_ids) == max_new_tokens


@pytest.mark.slow
def test_gpu_greedy_is_deterministic(vllm_backend):
    a, b = gen(vllm_backend, max_new_tokens=16)[0], gen(vllm_backend, max_new_tokens=16)[0]
    check_completion(a, 16)
    assert a.token_ids and a.token_ids == b.token_ids and a.text == b.text
    assert a.prompt_tokens == vllm_backend.count_tokens(ASK)


@pytest.mark.slow
def test_gpu_n_samples_and_seed(vllm_backend):
    params = dict(n=4, temperature=1.0, top_p=0.95, seed=3, max_new_tokens=12)
    first, again = gen(vllm_backend, **params), gen(vllm_backend, **params)
    assert len(first) == 4
    for c in first:
        check_completion(c, 12)
    assert [c.token_ids for c in first] == [c.token_ids for c in again]
    assert len({tuple(c.token_ids) for c in first}) > 1
    greedy = gen(vllm_backend, n=3, max_new_tokens=8)
    assert len(greedy) == 3 and len({tuple(c.token_ids) for c in greedy}) == 1


@pytest.mark.slow
def test_gpu_stop_strings(vllm_backend):
    prompt = [{"role": "user", "content": "Write a long story about a cat who loves the sea."}]
    full = gen(vllm_backend, prompt, max_new_tokens=40)[0].text
    if len(full) < 12:
        pytest.skip(f"greedy output too short to pick a stop string: {full!r}")
    stop = full[len(full) // 2: len(full) // 2 + 3]
    cut = gen(vllm_backend, prompt, max_new_tokens=40, stop=(stop,))[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full[: full.find(stop)]
    assert stop not in cut.text and len(cut.logprobs) == len(cut.token_ids)


@pytest.mark.slow
def test_gpu_adapter_per_request(vllm_backend, embedded_model_dir, tmp_path):
    path = make_random_adapter(embedded_model_dir, tmp_path / "lora", rank=8)
    vllm_backend.load_adapter("probe", str(path))
    try:
        params = SamplingParams(max_new_tokens=12)
        mixed = vllm_backend.generate([GenerationRequest(ASK, params), GenerationRequest(ASK, params, "probe"),
                                       GenerationRequest(ASK, params)])
        base_alone = gen(vllm_backend, max_new_tokens=12)[0]
        adapter_alone = gen(vllm_backend, adapter="probe", max_new_tokens=12)[0]
        assert mixed[0][0].token_ids == mixed[2][0].token_ids == base_alone.token_ids
        assert mixed[1][0].token_ids == adapter_alone.token_ids
        assert adapter_alone.token_ids != base_alone.token_ids
        check_completion(adapter_alone, 12)
    finally:
        vllm_backend.unload_adapter("probe")
    with pytest.raises(AdapterError):
        gen(vllm_backend, adapter="probe")


@pytest.mark.slow
def test_gpu_prompt_too_long(vllm_backend):
    with pytest.raises(PromptTooLongError):
        gen(vllm_backend, "word " * vllm_backend.context_length, max_new_tokens=8)
