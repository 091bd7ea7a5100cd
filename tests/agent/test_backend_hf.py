"""HFBackend on the tiny random llama: its decode loop agrees with transformers, batches and adapters mix safely."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from agent.backends import (
    AdapterError,
    Backend,
    GenerationRequest,
    PromptTooLongError,
    SamplingParams,
)
from agent.backends.base import validate_adapter_dir
from agent.backends.hf import HFBackend
from agent.prompting import render_prompt
from tests.conftest import make_random_adapter

# Plain strings reach the model untemplated, and the random model continues them with varied tokens
# (after a chat template it mostly repeats one token), which makes comparisons meaningful.
PROMPTS = ["The capital of France is", "What is 47 + 38? The answer is", "apple house"]
CHAT = [{"role": "user", "content": "Name a primary colour."}]


def greedy(max_new_tokens: int = 16, **kwargs) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, **kwargs)


def one(backend: HFBackend, prompt, params: SamplingParams | None = None, adapter: str | None = None):
    [[completion]] = backend.generate([GenerationRequest(prompt, params or greedy(), adapter)])
    return completion


@pytest.fixture
def backend(tiny_model_dir: Path) -> HFBackend:
    """A backend of its own (loading the tiny model takes ~0.1 s), so adapter tests leave no trace."""
    return HFBackend(str(tiny_model_dir), model_name="tiny-llama", threads=1)


@pytest.fixture(scope="module")
def hf_model(tiny_model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def adapters(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {name: make_random_adapter(tiny_model_dir, root / name, seed) for name, seed in (("a", 1), ("b", 2))}


# --- the protocol and prompts --------------------------------------------------------------------
def test_implements_the_backend_protocol(tiny_backend: HFBackend) -> None:
    assert isinstance(tiny_backend, Backend)
    assert tiny_backend.model_name == "tiny-llama"
    assert tiny_backend.context_length == 512


def test_plain_string_is_not_templated(tiny_backend: HFBackend) -> None:
    tokenizer = tiny_backend.tokenizer
    ids = tiny_backend.render("apple house")
    assert ids == tokenizer.encode("apple house", add_special_tokens=False)
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") not in ids
    assert tiny_backend.count_tokens("apple house") == len(ids)
    assert one(tiny_backend, "apple house", greedy(2)).prompt_tokens == len(ids)


def test_chat_prompt_gets_the_template_with_the_assistant_turn_open(tiny_backend: HFBackend) -> None:
    tokenizer = tiny_backend.tokenizer
    text = tokenizer.decode(tiny_backend.render(CHAT))
    assert text == "<|im_start|>user\nName a primary colour.<|im_end|>\n<|im_start|>assistant\n"
    assert one(tiny_backend, CHAT, greedy(2)).prompt_tokens == tiny_backend.count_tokens(CHAT)


def test_system_prompt_is_added_unless_the_chat_has_one(tiny_model_dir: Path) -> None:
    backend = HFBackend(str(tiny_model_dir), system_prompt="Be brief.")
    text = backend.tokenizer.decode(backend.render(CHAT))
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    own = [{"role": "system", "content": "Be long."}, *CHAT]
    text = backend.tokenizer.decode(backend.render(own))
    assert "Be brief." not in text and text.startswith("<|im_start|>system\nBe long.")
    assert backend.render("plain") == render_prompt(backend.tokenizer, "plain")  # strings stay untouched


# --- greedy decoding matches transformers ----------------------------------------------------------
@pytest.mark.parametrize("prompt", [PROMPTS[0], PROMPTS[1], CHAT], ids=["text", "text2", "chat"])
def test_greedy_equals_transformers_generate(tiny_backend: HFBackend, hf_model, prompt) -> None:
    ids = tiny_backend.render(prompt)
    completion = one(tiny_backend, prompt, greedy(20))

    inputs = torch.tensor([ids])
    with torch.inference_mode():
        reference = hf_model.generate(inputs, attention_mask=torch.ones_like(inputs), do_sample=False,
                                      max_new_tokens=20, pad_token_id=tiny_backend.tokenizer.pad_token_id)
    expected = [t for t in reference[0, len(ids):].tolist() if t not in tiny_backend.eos_ids]

    assert completion.token_ids == expected
    assert completion.text == tiny_backend.tokenizer.decode(expected, skip_special_tokens=True)
    assert completion.prompt_tokens == len(ids)


def test_batch_of_different_prompts_equals_single_calls(tiny_backend: HFBackend) -> None:
    singles = [one(tiny_backend, p) for p in PROMPTS]
    batch = tiny_backend.generate([GenerationRequest(p, greedy()) for p in PROMPTS])

    assert len({len(tiny_backend.render(p)) for p in PROMPTS}) == 3  # the batch really needs padding
    assert [len(r) for r in batch] == [1, 1, 1]
    for single, [batched] in zip(singles, batch):
        assert batched.text == single.text
        assert batched.token_ids == single.token_ids
        assert batched.prompt_tokens == single.prompt_tokens
        assert batched.logprobs == pytest.approx(single.logprobs, abs=1e-4)
    assert len({s.text for s in singles}) == 3


def test_long_shared_prefix_is_prefilled_once_with_identical_results(tiny_backend: HFBackend) -> None:
    """Few-shot prompts share a long prefix; computing it once must not change any output."""
    shots = "Question: apple house. Answer: ee. " * 8
    prompts = [shots + tail for tail in ("Question: blue sea.", "Question: red car tree.", "Q: up")]
    ids = [tiny_backend.render(p) for p in prompts]
    assert min(len(i) for i in ids) > 40 and ids[0][:40] == ids[1][:40] == ids[2][:40]
    params = SamplingParams(max_new_tokens=6)
    batched = tiny_backend.generate([GenerationRequest(p, params) for p in prompts])
    singles = [tiny_backend.generate([GenerationRequest(p, params)])[0] for p in prompts]
    for b, s in zip(batched, singles):
        assert b[0].token_ids == s[0].token_ids
        assert b[0].logprobs == pytest.approx(s[0].logprobs, abs=1e-4)


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_chunked_prefill_ends_where_one_pass_ends(tiny_backend: HFBackend, chunk: int) -> None:
    """A long prompt prefilled a chunk at a time (other rows decode in between) gives the same first-token
    logits and cache as one pass: with a shared few-shot prefix, and with prompts of different lengths."""
    shots = "Question: apple house. Answer: ee. " * 8
    for prompts in ([shots + tail for tail in ("Question: blue sea.", "Q: up")], PROMPTS):
        items = [(i, GenerationRequest(p, greedy(n=2)), tiny_backend.render(p)) for i, p in enumerate(prompts)]
        with torch.inference_mode():
            *_, whole = tiny_backend.prefill_steps(items, chunk=None)
            passes = list(tiny_backend.prefill_steps(items, chunk=chunk))
        chunked = passes[-1]
        assert all(p is None for p in passes[:-1]) and chunked is not None
        assert len(passes) >= -(-max(len(ids) for _, _, ids in items) // chunk)  # no pass took more than a chunk
        assert torch.equal(chunked.mask, whole.mask) and torch.equal(chunked.next_pos, whole.next_pos)
        assert torch.allclose(chunked.logits, whole.logits, atol=1e-4)
        for a, b in zip(chunked.cache.layers, whole.cache.layers):
            assert torch.allclose(a.keys, b.keys, atol=1e-4) and torch.allclose(a.values, b.values, atol=1e-4)


def test_n_completions_per_request(tiny_backend: HFBackend) -> None:
    params = [greedy(3), SamplingParams(n=3, temperature=1.0, max_new_tokens=3, seed=0), greedy(2)]
    out = tiny_backend.generate([GenerationRequest(p, s) for p, s in zip(PROMPTS, params)])
    assert [len(r) for r in out] == [1, 3, 1]
    assert all(c.num_tokens == len(c.token_ids) for r in out for c in r)


# --- sampling ------------------------------------------------------------------------------------
def test_sampling_is_deterministic_per_seed(tiny_backend: HFBackend) -> None:
    def sample(seed: int):
        [completions] = tiny_backend.generate(
            [GenerationRequest(PROMPTS[0], SamplingParams(n=4, temperature=1.0, max_new_tokens=12, seed=seed))])
        assert len(completions) == 4
        return [c.token_ids for c in completions]

    first = sample(123)
    assert sample(123) == first
    assert len({tuple(t) for t in first}) > 1  # the 4 samples are not copies of one another
    assert sample(124) != first
    assert sample(1000) != first


def test_samples_of_adjacent_seeds_are_independent(tiny_backend: HFBackend) -> None:
    def sample(seed: int) -> set[tuple[int, ...]]:
        [completions] = tiny_backend.generate(
            [GenerationRequest(PROMPTS[0], SamplingParams(n=4, temperature=1.0, max_new_tokens=12, seed=seed))])
        return {tuple(c.token_ids) for c in completions}

    assert sample(123) & sample(124) == set()


def test_sampled_and_greedy_share_a_batch(tiny_backend: HFBackend) -> None:
    reference = one(tiny_backend, PROMPTS[1])
    sampled = SamplingParams(n=4, temperature=0.8, top_k=20, top_p=0.9, max_new_tokens=16, seed=7)
    alone = tiny_backend.generate([GenerationRequest(PROMPTS[0], sampled)])[0]
    mixed = tiny_backend.generate([GenerationRequest(PROMPTS[0], sampled), GenerationRequest(PROMPTS[1], greedy())])
    assert [c.token_ids for c in mixed[0]] == [c.token_ids for c in alone]
    assert mixed[1][0].token_ids == reference.token_ids


def test_top_k_one_is_greedy(tiny_backend: HFBackend) -> None:
    reference = one(tiny_backend, PROMPTS[2])
    [completions] = tiny_backend.generate(
        [GenerationRequest(PROMPTS[2], SamplingParams(n=2, temperature=1.5, top_k=1, max_new_tokens=16, seed=3))])
    assert [c.token_ids for c in completions] == [reference.token_ids] * 2


# --- logprobs ------------------------------------------------------------------------------------
def test_logprobs_one_per_token_and_non_positive(tiny_backend: HFBackend) -> None:
    [completions] = tiny_backend.generate(
        [GenerationRequest(PROMPTS[0], SamplingParams(n=3, temperature=1.0, max_new_tokens=10, seed=5))])
    for c in completions:
        assert len(c.logprobs) == len(c.token_ids) > 0
        assert all(lp <= 0.0 for lp in c.logprobs)


def test_greedy_logprobs_are_the_models_log_softmax(tiny_backend: HFBackend, hf_model) -> None:
    ids = tiny_backend.render(PROMPTS[1])
    completion = one(tiny_backend, PROMPTS[1], greedy(12))
    assert len(completion.logprobs) == len(completion.token_ids) == 12

    with torch.inference_mode():
        first = torch.log_softmax(hf_model(torch.tensor([ids])).logits[0, -1].float(), dim=-1)
        assert completion.token_ids[0] == int(first.argmax())
        assert completion.logprobs[0] == pytest.approx(float(first.max()), abs=1e-5)

        # Every step at once: one forward pass over prompt + generated tokens (teacher forcing).
        full = torch.tensor([ids + completion.token_ids])
        steps = torch.log_softmax(hf_model(full).logits[0].float(), dim=-1)[len(ids) - 1:-1]
    expected = [float(steps[i, t]) for i, t in enumerate(completion.token_ids)]
    assert completion.logprobs == pytest.approx(expected, abs=1e-4)
    assert [int(s.argmax()) for s in steps] == completion.token_ids


# --- limits and stopping -------------------------------------------------------------------------
def test_max_new_tokens_gives_finish_reason_length(tiny_backend: HFBackend) -> None:
    long = one(tiny_backend, PROMPTS[0], greedy(20))
    assert long.num_tokens > 5, "the tiny model should not end this greedy run within 5 tokens"
    short = one(tiny_backend, PROMPTS[0], greedy(5))
    assert short.num_tokens == 5
    assert short.finish_reason == "length"
    assert short.token_ids == long.token_ids[:5]
    assert one(tiny_backend, PROMPTS[0], greedy(1)).token_ids == long.token_ids[:1]


def test_stop_string_cuts_the_text(tiny_backend: HFBackend) -> None:
    reference = one(tiny_backend, PROMPTS[1], greedy(24))
    # A printable ASCII stop string from the middle of the text (byte-level tokens elsewhere may be
    # partial UTF-8 that decodes differently as a prefix).
    spots = [m for m in re.finditer(r"[A-Za-z0-9 ]{2}", reference.text) if m.start() > 0]
    assert spots, f"no usable stop string in {reference.text!r}"
    stop = spots[len(spots) // 2].group()
    cut = reference.text.find(stop)

    completion = one(tiny_backend, PROMPTS[1], greedy(24, stop=(stop,)))

    assert completion.finish_reason == "stop"
    assert completion.text == reference.text[:cut]
    assert stop not in completion.text
    assert completion.num_tokens < reference.num_tokens
    assert completion.token_ids == reference.token_ids[:completion.num_tokens]
    # A stop string the model never writes changes nothing.
    unseen = one(tiny_backend, PROMPTS[1], greedy(24, stop=("\x00never\x00",)))
    assert (unseen.text, unseen.finish_reason) == (reference.text, reference.finish_reason)


def test_stop_applies_per_row_in_a_batch(tiny_backend: HFBackend) -> None:
    reference = [one(tiny_backend, p, greedy(16)) for p in PROMPTS[:2]]
    spots = [m for m in re.finditer(r"[A-Za-z0-9 ]{2}", reference[0].text) if m.start() > 0]
    assert spots
    stop = spots[0].group()
    out = tiny_backend.generate([GenerationRequest(PROMPTS[0], greedy(16, stop=(stop,))),
                                 GenerationRequest(PROMPTS[1], greedy(16))])
    assert out[0][0].text == reference[0].text[:reference[0].text.find(stop)]
    assert out[0][0].finish_reason == "stop"
    assert out[1][0].token_ids == reference[1].token_ids  # the other row decodes on to its own end


def test_prompt_longer_than_the_context(tiny_backend: HFBackend) -> None:
    long_prompt = "apple house " * 400
    assert tiny_backend.count_tokens(long_prompt) > 512
    with pytest.raises(PromptTooLongError, match="512"):
        one(tiny_backend, long_prompt, greedy(1))


def test_prompt_plus_new_tokens_longer_than_the_context(tiny_backend: HFBackend) -> None:
    prompt = "apple house " * 100
    n = tiny_backend.count_tokens(prompt)
    assert n < 512
    with pytest.raises(PromptTooLongError, match=f"prompt of {n} tokens"):
        one(tiny_backend, prompt, greedy(512 - n + 1))
    assert one(tiny_backend, prompt, greedy(2)).num_tokens <= 2  # the same prompt fits with fewer new tokens


def test_one_too_long_request_fails_the_batch_before_any_work(tiny_backend: HFBackend) -> None:
    with pytest.raises(PromptTooLongError):
        tiny_backend.generate([GenerationRequest(PROMPTS[0], greedy()),
                               GenerationRequest("apple house " * 400, greedy())])


# --- LoRA adapters -------------------------------------------------------------------------------
def test_adapter_changes_output_and_mixes_with_base_in_one_batch(backend: HFBackend, adapters) -> None:
    base = [one(backend, p) for p in PROMPTS[:2]]
    backend.load_adapter("a", str(adapters["a"]))
    assert backend.adapters == {"a": str(adapters["a"])}

    tuned = one(backend, PROMPTS[0], adapter="a")
    assert tuned.token_ids != base[0].token_ids

    mixed = backend.generate([GenerationRequest(PROMPTS[0], greedy(), "a"),
                              GenerationRequest(PROMPTS[1], greedy(), None),
                              GenerationRequest(PROMPTS[0], greedy(), None)])
    assert mixed[0][0].token_ids == tuned.token_ids  # PEFT's per-row path, and its plain one for one adapter
    assert mixed[0][0].logprobs == pytest.approx(tuned.logprobs, abs=1e-4)
    assert mixed[1][0].token_ids == base[1].token_ids
    assert mixed[2][0].token_ids == base[0].token_ids
    assert mixed[2][0].logprobs == pytest.approx(base[0].logprobs, abs=1e-4)


def test_two_adapters_in_one_batch(backend: HFBackend, adapters) -> None:
    backend.load_adapter("a", str(adapters["a"]))
    backend.load_adapter("b", str(adapters["b"]))
    alone = {name: one(backend, PROMPTS[2], adapter=name).token_ids for name in ("a", "b", None)}
    assert len({tuple(v) for v in alone.values()}) == 3

    out = backend.generate([GenerationRequest(PROMPTS[2], greedy(), name) for name in ("b", None, "a")])
    assert [r[0].token_ids for r in out] == [alone["b"], alone[None], alone["a"]]


def test_unload_restores_the_base_model(backend: HFBackend, adapters) -> None:
    base = one(backend, PROMPTS[0])
    backend.load_adapter("a", str(adapters["a"]))
    backend.load_adapter("b", str(adapters["b"]))
    with_b = one(backend, PROMPTS[0], adapter="b")

    backend.unload_adapter("a")
    assert set(backend.adapters) == {"b"}
    assert one(backend, PROMPTS[0]).token_ids == base.token_ids
    assert one(backend, PROMPTS[0], adapter="b").token_ids == with_b.token_ids
    with pytest.raises(AdapterError, match="'a' is not loaded"):
        one(backend, PROMPTS[0], adapter="a")

    backend.unload_adapter("b")  # the last one: the LoRA layers come out again
    assert backend.adapters == {}
    assert backend.model is backend.base_model
    after = one(backend, PROMPTS[0])
    assert after.token_ids == base.token_ids
    assert after.logprobs == pytest.approx(base.logprobs, abs=1e-5)
    assert not any("lora" in name for name, _ in backend.model.named_parameters())

    backend.unload_adapter("b")  # unloading twice is harmless
    backend.load_adapter("a", str(adapters["a"]))  # and adapters load again afterwards
    assert one(backend, PROMPTS[0], adapter="a").token_ids != base.token_ids
    assert one(backend, PROMPTS[0]).token_ids == base.token_ids


def test_loading_the_same_name_twice_is_a_no_op(backend: HFBackend, adapters) -> None:
    backend.load_adapter("a", str(adapters["a"]))
    tuned = one(backend, PROMPTS[0], adapter="a").token_ids
    backend.load_adapter("a", str(adapters["a"]))
    assert list(backend.adapters) == ["a"]
    assert one(backend, PROMPTS[0], adapter="a").token_ids == tuned


def test_unknown_adapter_in_a_request(backend: HFBackend, adapters) -> None:
    with pytest.raises(AdapterError, match="'nope' is not loaded"):
        one(backend, PROMPTS[0], adapter="nope")
    backend.load_adapter("a", str(adapters["a"]))
    with pytest.raises(AdapterError, match="'nope' is not loaded"):
        backend.generate([GenerationRequest(PROMPTS[0], greedy(), "a"),
                          GenerationRequest(PROMPTS[0], greedy(), "nope")])


def copy_adapter(source: Path, target: Path) -> Path:
    import shutil

    shutil.copytree(source, target)
    return target


@pytest.mark.parametrize("damage, message", [
    ("missing_folder", "does not exist"),
    ("missing_weights", "incomplete"),
    ("missing_config", "incomplete"),
    ("truncated_weights", "weights .* are corrupted"),
    ("garbage_weights", "weights .* are corrupted"),
    ("invalid_config_json", "adapter config .* is corrupted"),
])
def test_damaged_adapter_folders_are_refused(backend: HFBackend, adapters, tmp_path: Path,
                                             damage: str, message: str) -> None:
    folder = copy_adapter(adapters["a"], tmp_path / "adapter")
    weights, config = folder / "adapter_model.safetensors", folder / "adapter_config.json"
    if damage == "missing_folder":
        folder = tmp_path / "no-such-adapter"
    elif damage == "missing_weights":
        weights.unlink()
    elif damage == "missing_config":
        config.unlink()
    elif damage == "truncated_weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "garbage_weights":
        weights.write_bytes(b"\xff" * 64)
    elif damage == "invalid_config_json":
        config.write_text(config.read_text()[:-10])

    base = one(backend, PROMPTS[0])
    with pytest.raises(AdapterError, match=message) as info:
        backend.load_adapter("broken", str(folder))
    assert str(folder) in str(info.value)
    assert backend.adapters == {}
    assert one(backend, PROMPTS[0]).token_ids == base.token_ids


def test_adapter_that_does_not_fit_the_model(backend: HFBackend, adapters, tmp_path: Path) -> None:
    """A well-formed folder whose config disagrees with its weights (rank 8 vs 4) fails in PEFT."""
    folder = copy_adapter(adapters["a"], tmp_path / "adapter")
    config = json.loads((folder / "adapter_config.json").read_text())
    config["r"] = 8
    (folder / "adapter_config.json").write_text(json.dumps(config))
    validate_adapter_dir(folder)  # the files themselves are intact

    base = one(backend, PROMPTS[0])
    with pytest.raises(AdapterError, match="does not load onto tiny-llama"):
        backend.load_adapter("bad", str(folder))
    assert backend.adapters == {}
    with pytest.raises(AdapterError):
        one(backend, PROMPTS[0], adapter="bad")
    assert one(backend, PROMPTS[0]).token_ids == base.token_ids

    backend.load_adapter("a", str(adapters["a"]))  # a good adapter still loads afterwards
    with_a = one(backend, PROMPTS[0], adapter="a").token_ids
    assert with_a != base.token_ids
    with pytest.raises(AdapterError, match="does not load onto"):  # also when another adapter is loaded
        backend.load_adapter("bad", str(folder))
    assert list(backend.adapters) == ["a"]
    out = backend.generate([GenerationRequest(PROMPTS[0], greedy(), "a"), GenerationRequest(PROMPTS[0], greedy())])
    assert [r[0].token_ids for r in out] == [with_a, base.token_ids]
