"""The vLLM backend.

Three layers, from cheapest to most real:
- the import guard runs everywhere (vLLM is an optional GPU extra);
- the request mapping runs everywhere against a stub of vLLM's *documented* offline API (it checks
  this module's own logic: prompt token ids, sampling params, per-request LoRA, EOS and stop-string
  handling; it says nothing about vLLM itself);
- the behavioural checks (the same ones the HF backend must pass) run only with vLLM and a CUDA GPU.
"""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass, field

import pytest

from agent.backends.base import GenerationRequest, SamplingParams
from agent.errors import AdapterError, PromptTooLongError
from tests.conftest import make_random_adapter
from tests.fakes import script_engine

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


# --- runs everywhere: our mapping onto a stub of the documented API --------------------------------------------
@dataclass
class _Logprob:
    logprob: float


@dataclass
class _Sample:
    token_ids: list[int]
    logprobs: list[dict[int, _Logprob]]
    finish_reason: str
    stop_reason: object = None


@dataclass
class _RequestOutput:
    outputs: list[_Sample]


@dataclass
class _StubEngine:
    removed: list[int] = field(default_factory=list)

    def remove_lora(self, lora_id: int) -> bool:
        self.removed.append(lora_id)
        return True


class _StubLLM:
    """Emits a fixed token stream, then the tokenizer's EOS; records every call."""

    instances: list["_StubLLM"] = []
    stream: list[int] = []
    eos: int = -1

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.calls: list[tuple] = []
        self.llm_engine = _StubEngine()
        self.llm_engine.model_config = types.SimpleNamespace(max_model_len=kwargs.get("max_model_len") or 64)
        _StubLLM.instances.append(self)

    def generate(self, prompts, sampling_params, *, use_tqdm=True, lora_request=None):
        self.calls.append((prompts, sampling_params, lora_request))
        assert isinstance(sampling_params, list) and len(sampling_params) == len(prompts)
        if lora_request is not None:
            assert len(lora_request) == len(prompts)
        out = []
        for sp in sampling_params:
            full = self.stream + [self.eos]
            tokens = full[: sp["max_tokens"]]
            finish = "stop" if tokens[-1] == self.eos else "length"
            sample = _Sample(tokens, [{t: _Logprob(-0.25)} for t in tokens], finish)
            out.append(_RequestOutput([sample for _ in range(sp["n"])]))
        return out


@pytest.fixture
def stub_vllm(monkeypatch, tiny_model_dir):
    tok = script_engine(_StubLLM, tiny_model_dir)
    vllm = types.ModuleType("vllm")
    vllm.LLM = _StubLLM
    vllm.SamplingParams = lambda **kw: dict(kw)
    inputs = types.ModuleType("vllm.inputs")
    inputs.TokensPrompt = lambda **kw: dict(kw)
    lora = types.ModuleType("vllm.lora")
    request = types.ModuleType("vllm.lora.request")
    request.LoRARequest = lambda name, lora_id, path: (name, lora_id, path)
    for name, module in {"vllm": vllm, "vllm.inputs": inputs, "vllm.lora": lora, "vllm.lora.request": request}.items():
        monkeypatch.setitem(sys.modules, name, module)
    return tok


def test_stub_prompts_params_and_outputs(stub_vllm, tiny_model_dir, tiny_backend):
    from agent.backends.vllm import VLLMBackend

    backend = VLLMBackend(str(tiny_model_dir), model_name="tiny", max_model_len=64, gpu_memory_utilization=0.3)
    llm = _StubLLM.instances[-1]
    assert llm.kwargs["enable_lora"] is True and backend.context_length == 64
    # byte-identical prompts with the HF backend
    assert backend.render(ASK) == tiny_backend.render(ASK)
    assert backend.count_tokens("plain text") == tiny_backend.count_tokens("plain text")

    greedy = SamplingParams(n=3, max_new_tokens=32)
    seeded = SamplingParams(n=3, temperature=0.7, top_k=0, top_p=0.9, seed=5, max_new_tokens=2, stop=("zz",))
    free = SamplingParams(n=2, temperature=1.0, top_k=7, max_new_tokens=32, stop=(" B",))
    out = backend.generate([GenerationRequest(ASK, greedy), GenerationRequest("raw", seeded),
                            GenerationRequest(ASK, free)])
    prompts, params, loras = llm.calls[-1]
    assert loras is None
    assert prompts[0] == {"prompt_token_ids": tiny_backend.render(ASK)}
    # greedy: one decode replicated; seeded: one request per sample with seed+j; unseeded: one request, n samples
    assert [p["n"] for p in params] == [1, 1, 1, 1, 2]
    assert [p["seed"] for p in params] == [None, 5, 6, 7, None]
    assert params[0]["temperature"] == 0.0 and params[0]["top_k"] == -1
    assert params[1]["top_k"] == -1 and params[1]["top_p"] == 0.9 and params[1]["stop"] == ["zz"]
    assert params[4]["top_k"] == 7 and params[4]["stop"] == [" B"]
    assert all(p["logprobs"] == 0 and stub_vllm.eos_token_id in p["stop_token_ids"] for p in params)
    assert [len(c) for c in out] == [3, 3, 2]
    first = out[0][0]
    assert first.finish_reason == "stop" and first.token_ids == _StubLLM.stream  # EOS dropped
    assert first.logprobs == [-0.25] * len(first.token_ids) and first.text == " A B 0123"
    assert first.prompt_tokens == len(tiny_backend.render(ASK))
    assert out[0][1] is not first and out[0][1].token_ids == first.token_ids
    assert out[1][0].finish_reason == "length" and len(out[1][0].token_ids) == 2
    assert out[2][0].text == " A" and out[2][0].finish_reason == "stop"

    with pytest.raises(PromptTooLongError):
        backend.generate([GenerationRequest(ASK, SamplingParams(max_new_tokens=60))])
    assert len(llm.calls) == 1


def test_the_vllm_section_of_the_config_starts_the_engine(stub_vllm, tiny_model_dir):
    from agent.backends import backend_for
    from agent.config import AgentConfig

    config = AgentConfig(model=str(tiny_model_dir), backend="vllm")
    config.vllm.max_model_len, config.vllm.gpu_memory_utilization, config.vllm.max_lora_rank = 64, 0.3, 16
    config.vllm.tensor_parallel_size, config.vllm.enforce_eager = 2, True
    backend = backend_for(config, str(tiny_model_dir))
    kwargs = _StubLLM.instances[-1].kwargs
    assert (kwargs["max_model_len"], kwargs["gpu_memory_utilization"], kwargs["max_lora_rank"]) == (64, 0.3, 16)
    assert (kwargs["tensor_parallel_size"], kwargs["enforce_eager"], kwargs["dtype"]) == (2, True, "auto")
    assert backend.context_length == 64 and backend.max_lora_rank == 16


def test_stub_adapters_per_request(stub_vllm, tiny_model_dir, tmp_path):
    from agent.backends.vllm import VLLMBackend

    backend = VLLMBackend(str(tiny_model_dir), model_name="tiny", max_model_len=256, max_lora_rank=8)
    llm = _StubLLM.instances[-1]
    with pytest.raises(AdapterError):
        backend.load_adapter("missing", str(tmp_path / "nothing"))
    path = make_random_adapter(tiny_model_dir, tmp_path / "a")
    backend.load_adapter("a", str(path))
    backend.load_adapter("b", str(path))  # a hot-swap is just a new name
    with pytest.raises(AdapterError, match="max_lora_rank"):
        backend.load_adapter("wide", str(make_random_adapter(tiny_model_dir, tmp_path / "wide", rank=16)))
    backend.generate([GenerationRequest("x", adapter="a"), GenerationRequest("x"), GenerationRequest("x", adapter="b")])
    loras = llm.calls[-1][2]
    assert loras[1] is None and loras[0][0] == "a" and loras[2][0] == "b"
    assert loras[0][1] != loras[2][1] and loras[0][2] == str(path.resolve())
    backend.unload_adapter("a")
    with pytest.raises(AdapterError, match="not loaded"):
        backend.generate([GenerationRequest("x", adapter="a")])
    backend.generate([GenerationRequest("x", adapter="b")])
    assert llm.llm_engine.removed == [loras[0][1]]
    backend.close()
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
