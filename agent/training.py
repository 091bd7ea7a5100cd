"""LoRA training on (prompt -> final answer) pairs: System 2 distilled into System 1.

The loss covers only the answer tokens (and the end-of-turn token that stops System 1 right after
the answer); the prompt is rendered with the same chat template System 1 serves with.
Knobs live in :class:`agent.config.ConsolidationConfig`, documented there.
"""

from __future__ import annotations

import logging
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from agent.backends.base import ADAPTER_WEIGHTS
from agent.config import ConsolidationConfig
from agent.errors import TrainingDiverged
from agent.prompting import IGNORE_INDEX, TrainingExample, encode_example

logger = logging.getLogger(__name__)


LENGTH_BUCKET = 32
"""Tokens of length difference that may share a batch (see ``length_grouped_batches``)."""


@dataclass
class TrainingStats:
    steps: int
    epochs: int
    first_loss: float
    last_loss: float
    seconds: float
    bf16: bool
    n_dropped: int = 0
    """Examples left out because not even their prompt fit ``max_length``."""
    n_truncated: int = 0
    """Examples whose answer lost its tail to ``max_length`` (the prompt is always whole)."""
    last_kl: float | None = None
    """The retention KL term (``consolidation.retention_kl_weight``) at the last step, unweighted; None: off."""


def cpu_supports_bf16() -> bool:
    """bf16 autocast halves CPU training time where the CPU has native bf16 (avx512_bf16 / AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def training_device(config: ConsolidationConfig) -> torch.device:
    """``consolidation.device``: ``auto`` is the GPU when torch sees one, else the CPU."""
    if config.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(config.device)


def use_bf16(config: ConsolidationConfig, device: torch.device) -> bool:
    """``consolidation.bf16`` on ``device``: ``auto`` turns it on where the hardware computes bf16 natively."""
    if config.bf16 != "auto":
        return config.bf16 == "on"
    return torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_supports_bf16()


def train_lora(
    model_path: str,
    examples: Sequence[TrainingExample],
    config: ConsolidationConfig,
    output_dir: Path,
    *,
    resume_from: str | None = None,
    system_prompt: str | None = None,
    epochs: int | None = None,
    on_step: Callable[[int, int, float], None] | None = None,
    kl_examples: Sequence[TrainingExample] = (),
) -> TrainingStats:
    """Train a LoRA adapter on ``examples`` and save it to ``output_dir``.

    With ``consolidation.retention_kl_weight`` > 0 and ``kl_examples`` (retention prompts and the serving
    model's answers), each step adds that weight times :func:`retention_kl` on a sample of them: the
    adapter is pulled towards the base model's whole next-token distribution on general text, not only
    towards one sampled answer per prompt."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not examples:
        raise ValueError("no training examples")
    torch.manual_seed(config.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    device = training_device(config)
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).to(device)
    if resume_from:
        model = PeftModel.from_pretrained(base, resume_from, is_trainable=True)
    else:
        lora = LoraConfig(
            r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
            target_modules=list(config.target_modules), task_type="CAUSAL_LM",
        )
        model = get_peft_model(base, lora)
    model.train()
    encoded, n_dropped, n_truncated = encode_examples(tokenizer, examples, config.max_length, system_prompt)
    kl_rows = (encode_examples(tokenizer, kl_examples, config.max_length, system_prompt)[0]
               if config.retention_kl_weight > 0 and kl_examples else [])
    batch = max(1, config.batch_size)
    steps_per_epoch = math.ceil(len(encoded) / batch)
    n_epochs = epochs or max(config.epochs, math.ceil(config.min_steps / max(steps_per_epoch, 1)))
    total = steps_per_epoch * n_epochs
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.0)
    warmup = max(1, total // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * max(0.0, 1 - s / max(total, 1)) + 1e-3
    )
    bf16 = use_bf16(config, device)
    rng = random.Random(config.seed)
    started = time.perf_counter()
    first = last = float("nan")
    last_kl: float | None = None
    step = 0
    for _ in range(n_epochs):
        for rows in length_grouped_batches(encoded, batch, rng):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = answer_loss(model, rows, tokenizer.pad_token_id)
                if kl_rows:
                    kl = retention_kl(model, rng.sample(kl_rows, min(batch, len(kl_rows))), tokenizer.pad_token_id)
                    last_kl = float(kl.detach())
                    loss = loss + config.retention_kl_weight * kl
            value = float(loss.detach())
            if not math.isfinite(value):
                raise TrainingDiverged(f"loss became {value} at step {step + 1}")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            first = value if step == 1 else first
            last = value
            if on_step:
                on_step(step, total, value)
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(output_dir))
    seconds = time.perf_counter() - started
    logger.info("trained %d steps in %.1f s on %s (loss %.3f -> %.3f, bf16=%s)", step, seconds, device, first, last,
                bf16)
    return TrainingStats(step, n_epochs, first, last, seconds, bf16, n_dropped, n_truncated, last_kl)


def scale_update(folder: Path, fraction: float, dest: Path | None = None) -> Path:
    """Make the LoRA adapter in ``folder`` (or a copy of it in ``dest``) carry ``fraction`` of its update.

    Every ``lora_B`` matrix is scaled, so the adapter's weight change ``B @ A`` is too, and any backend that
    loads the files serves the scaled update: a point on the straight line between the base model and the
    trained one (weight-space interpolation, as WiSE-FT, Wortsman et al. 2022, does for whole models)."""
    from safetensors.torch import load_file, save_file

    if dest is not None:
        dest.mkdir(parents=True)
        for item in folder.iterdir():
            if item.is_file() and item.name != ADAPTER_WEIGHTS:
                shutil.copy2(item, dest / item.name)
    target = dest if dest is not None else folder
    weights = load_file(str(folder / ADAPTER_WEIGHTS))
    save_file({k: v * fraction if "lora_B" in k else v for k, v in weights.items()}, str(target / ADAPTER_WEIGHTS))
    return target


def encode_examples(tokenizer, examples: Sequence[TrainingExample], max_length: int,
                    system_prompt: str | None = None) -> tuple[list[tuple[list[int], list[int]]], int, int]:
    """(rows, dropped, truncated): every example that fits encoded (see :func:`encode_example`).

    Dropped and truncated examples are counted and logged, so a ``max_length`` too small for the data
    shows up in the run's log and metrics instead of silently training on fragments.
    """
    rows: list[tuple[list[int], list[int]]] = []
    dropped = truncated = 0
    for example in examples:
        row = encode_example(tokenizer, example, max_length, system_prompt)
        if row is None:
            dropped += 1
            continue
        truncated += row[0][-1] != tokenizer.eos_token_id
        rows.append(row)
    if dropped or truncated:
        logger.warning("max_length %d: %d example(s) dropped (prompt too long), %d answer(s) cut short",
                       max_length, dropped, truncated)
    if not rows:
        raise ValueError(f"no training example fits max_length {max_length}")
    return rows, dropped, int(truncated)


def length_grouped_batches(encoded: list[tuple[list[int], list[int]]], batch: int,
                           rng: random.Random) -> list[list[tuple[list[int], list[int]]]]:
    """One epoch's batches, each made of examples of similar length, in random order.

    A batch costs as much as its longest row: one 128-token retention answer among 40-token task
    examples made the whole batch 3x slower. Lengths are only grouped in buckets of
    ``LENGTH_BUCKET`` tokens, shuffled inside: sorting exactly would put, say, all the 3-digit sums of
    an addition task (one token longer) in batches of their own, and batches should differ in length,
    not in content.
    """
    order = sorted(range(len(encoded)), key=lambda i: (len(encoded[i][0]) // LENGTH_BUCKET, rng.random()))
    batches = [[encoded[i] for i in order[s:s + batch]] for s in range(0, len(order), batch)]
    rng.shuffle(batches)
    return batches


def answer_logits(model, rows: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, targets) at the positions that predict a batch's answer tokens, nothing else computed.

    Rows are left-padded so every answer ends at the last position; the model is then asked for the
    logits of the last ``longest answer + 1`` positions only (``logits_to_keep``), instead of a
    49k-wide row of logits (and its gradient) for every prompt token that the loss never reads.
    Position ids restart at 0 on each row's first real token, exactly as the serving decode loop does.
    ``targets`` is :data:`IGNORE_INDEX` wherever a position predicts no answer token.
    """
    width = max(len(ids) for ids, _ in rows)
    device = next(model.parameters()).device
    ids = torch.tensor([[pad_id] * (width - len(i)) + i for i, _ in rows], device=device)
    labels = torch.tensor([[IGNORE_INDEX] * (width - len(lab)) + lab for _, lab in rows], device=device)
    mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i, _ in rows], device=device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    keep = min(width, int((labels != IGNORE_INDEX).sum(-1).max()) + 1)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep).logits
    return logits[:, :-1].float(), labels[:, width - keep + 1:]


def answer_loss(model, rows: list[tuple[list[int], list[int]]], pad_id: int) -> torch.Tensor:
    """Mean cross-entropy over the answer tokens of a batch (logits only where they count, see
    :func:`answer_logits`)."""
    logits, targets = answer_logits(model, rows, pad_id)
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX
    )


def retention_kl(model, rows: list[tuple[list[int], list[int]]], pad_id: int) -> torch.Tensor:
    """Mean per-token KL(base || model) of the next-token distributions along the answers of ``rows``.

    The base model's logits come from the same PEFT model with its adapter disabled (no second copy in
    memory, no gradient); the divergence is taken where the loss is, at the positions predicting answer
    tokens. The reference is the *base* model: with ``resume`` or a general adapter serving, that is not
    the serving model, and this term pulls towards what the base model does on general text.
    """
    with torch.no_grad(), model.disable_adapter():
        reference, targets = answer_logits(model, rows, pad_id)
    logits, _ = answer_logits(model, rows, pad_id)
    ref = torch.log_softmax(reference, -1)
    cur = torch.log_softmax(logits, -1)
    mask = (targets != IGNORE_INDEX).float()
    per_token = (ref.exp() * (ref - cur)).sum(-1)
    return (per_token * mask).sum() / mask.sum().clamp(min=1)
