"""The training loss: logits only at answer positions must give the loss the full forward gives."""

from __future__ import annotations

import pytest
import torch

from agent.prompting import TrainingExample, encode_example
from agent.training import answer_loss


@pytest.fixture(scope="module")
def tiny_lm(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir)


def _full_loss_sum(model, ids: list[int], labels: list[int]) -> tuple[float, int]:
    """Reference: a plain unpadded forward with every logit, summed over answer tokens."""
    logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
    target = torch.tensor(labels[1:])
    loss = torch.nn.functional.cross_entropy(logits, target, ignore_index=-100, reduction="sum")
    return float(loss), int((target != -100).sum())


def test_encode_example_masks_the_prompt_and_ends_with_eos(tiny_lm):
    _, tokenizer = tiny_lm
    example = TrainingExample([{"role": "user", "content": "What is 47 + 38?"}], "85")
    ids, labels = encode_example(tokenizer, example, max_length=512)
    answer = tokenizer.encode("85", add_special_tokens=False) + [tokenizer.eos_token_id]
    assert ids[-len(answer):] == answer
    assert labels[-len(answer):] == answer
    assert set(labels[:-len(answer)]) == {-100}


def test_answer_loss_matches_the_full_forward_on_a_padded_batch(tiny_lm):
    model, tokenizer = tiny_lm
    model.eval()
    examples = [
        TrainingExample([{"role": "user", "content": "Take the last letters of 'apple house'."}], "ee"),
        TrainingExample([{"role": "user", "content": "What is 47 + 38?"}], "The answer is 85"),
        TrainingExample([{"role": "user", "content": "Name a primary colour."}], "Red"),
    ]
    rows = [encode_example(tokenizer, e, max_length=512) for e in examples]
    assert len({len(ids) for ids, _ in rows}) > 1  # the batch really is padded
    with torch.no_grad():
        batched = float(answer_loss(model, rows, tokenizer.pad_token_id))
        sums = [_full_loss_sum(model, ids, labels) for ids, labels in rows]
    reference = sum(s for s, _ in sums) / sum(n for _, n in sums)
    assert batched == pytest.approx(reference, rel=1e-4)


def test_a_long_answer_loses_its_tail_never_its_prompt(tiny_lm):
    """Retention answers are often longer than max_length: the model must still see what was asked."""
    model, tokenizer = tiny_lm
    example = TrainingExample([{"role": "user", "content": "What is 47 + 38?"}], "The answer is 85 A B 0123456789 " * 8)
    full_ids, _ = encode_example(tokenizer, example, max_length=4096)
    prompt = full_ids[: full_ids.index(tokenizer.encode("The", add_special_tokens=False)[0])]
    ids, labels = encode_example(tokenizer, example, max_length=len(prompt) + 5)
    assert len(ids) == len(prompt) + 5
    assert ids[: len(prompt)] == prompt and labels[: len(prompt)] == [-100] * len(prompt)
    assert labels[len(prompt):] == full_ids[len(prompt): len(prompt) + 5]  # the answer's head, not its tail
    assert ids[-1] != tokenizer.eos_token_id  # cut short: the model must not learn to stop there
    with torch.no_grad():
        loss = float(answer_loss(model, [(ids, labels)], tokenizer.pad_token_id))
        total, count = _full_loss_sum(model, ids, labels)
    assert count == 5 and loss == pytest.approx(total / count, rel=1e-4)


def test_an_example_whose_prompt_does_not_fit_is_dropped_and_counted(tiny_lm):
    from agent.training import encode_examples

    _, tokenizer = tiny_lm
    short = TrainingExample([{"role": "user", "content": "Hi"}], "Red " * 40)
    long = TrainingExample([{"role": "user", "content": "Take the last letters of the words " * 20}], "ee")
    assert encode_example(tokenizer, long, max_length=24) is None
    rows, dropped, cut = encode_examples(tokenizer, [short, long], max_length=24)
    assert (len(rows), dropped, cut) == (1, 1, 1) and len(rows[0][0]) == 24
    with pytest.raises(ValueError, match="max_length"):
        encode_examples(tokenizer, [long], max_length=24)


def test_length_grouped_batches_cover_every_example_once_and_group_lengths():
    import random

    from agent.training import length_grouped_batches

    rng = random.Random(0)
    encoded = [([7] * n, [-100] * n) for n in [40] * 20 + [41] * 10 + [128] * 6 + [70] * 10]
    first = length_grouped_batches(encoded, 8, rng)
    second = length_grouped_batches(encoded, 8, rng)
    assert sorted(len(ids) for b in first for ids, _ in b) == sorted(len(ids) for ids, _ in encoded)
    assert sum(len(b) for b in first) == len(encoded)
    # Padding waste: at most one batch mixes length buckets at each of the two boundaries ...
    assert sum(len({len(ids) // 32 for ids, _ in b}) > 1 for b in first) <= 2
    # ... but lengths within a bucket are mixed, not sorted (40 and 41 share batches).
    assert any({len(ids) for ids, _ in b} == {40, 41} for b in first + second)
    assert [len(b[0][0]) for b in first] != [len(b[0][0]) for b in second] or len(first) == 1


def test_retention_kl_is_zero_for_a_fresh_adapter_and_finite_with_a_gradient_otherwise(tiny_model_dir, tmp_path):
    """The KL term's base logits come from the same PEFT model with the adapter disabled."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from agent.prompting import system1_messages
    from agent.training import retention_kl
    from tests.conftest import make_random_adapter

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = [encode_example(tokenizer, TrainingExample(system1_messages(q), a), 128)
            for q, a in [("Name a primary colour.", "Red, blue, yellow."), ("What is 47 + 38?", "85")]]
    folder = make_random_adapter(tiny_model_dir, tmp_path / "random")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(folder),
                                      is_trainable=True)
    kl = retention_kl(model, rows, tokenizer.pad_token_id)
    assert torch.isfinite(kl) and float(kl.detach()) > 0
    kl.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.zero_()  # B = 0: the adapter adds nothing, as a fresh one
        assert float(retention_kl(model, rows, tokenizer.pad_token_id)) == pytest.approx(0.0, abs=1e-6)


def test_train_lora_adds_the_kl_term_when_weighted(tiny_model_dir, tmp_path):
    from agent.config import ConsolidationConfig
    from agent.prompting import system1_messages
    from agent.training import train_lora

    config = ConsolidationConfig(epochs=2, learning_rate=1e-2, batch_size=4, rank=4, alpha=8, bf16="off",
                                 retention_kl_weight=1.0)
    task = [TrainingExample(system1_messages(f"What is {a} + 38?"), str(a + 38)) for a in range(11, 19)]
    general = [TrainingExample(system1_messages("Name a primary colour."), "Red, blue, yellow.")]
    stats = train_lora(str(tiny_model_dir), task, config, tmp_path / "kl", kl_examples=general)
    assert stats.last_kl is not None and 0 < stats.last_kl < 100
    off = train_lora(str(tiny_model_dir), task, ConsolidationConfig(epochs=1, bf16="off"), tmp_path / "off",
                     kl_examples=general)
    assert off.last_kl is None  # weight 0: the term is not computed


def test_a_small_run_gets_the_epochs_min_steps_asks_for(tiny_model_dir, tmp_path):
    from agent.config import ConsolidationConfig
    from agent.prompting import system1_messages
    from agent.training import train_lora

    task = [TrainingExample(system1_messages(f"What is {a} + 38?"), str(a + 38)) for a in range(11, 17)]  # 6
    small = ConsolidationConfig(epochs=1, batch_size=4, rank=4, alpha=8, bf16="off", min_steps=7)
    stats = train_lora(str(tiny_model_dir), task, small, tmp_path / "small")
    assert (stats.steps, stats.epochs) == (8, 4)  # 2 steps per epoch: 4 epochs reach 7 steps
    many = train_lora(str(tiny_model_dir), task * 8, small, tmp_path / "many")
    assert (many.steps, many.epochs) == (12, 1)  # already more steps than asked for: epochs decides
    told = train_lora(str(tiny_model_dir), task, small, tmp_path / "told", epochs=1)
    assert (told.steps, told.epochs) == (2, 1)  # an explicit epochs (agent consolidate --epochs) wins


def test_training_runs_where_the_config_says_and_bf16_follows_the_device() -> None:
    from agent.config import ConsolidationConfig
    from agent.training import training_device, use_bf16

    gpu = torch.cuda.is_available()
    assert training_device(ConsolidationConfig()).type == ("cuda" if gpu else "cpu")
    assert training_device(ConsolidationConfig(device="cpu")).type == "cpu"
    assert use_bf16(ConsolidationConfig(bf16="on"), torch.device("cpu"))
    assert not use_bf16(ConsolidationConfig(bf16="off"), torch.device("cuda"))


def test_a_device_that_is_not_one_is_refused() -> None:
    from agent.config import AgentConfig, ConfigError

    with pytest.raises(ConfigError, match="device"):
        AgentConfig.from_dict({"consolidation": {"device": "tpu"}})
