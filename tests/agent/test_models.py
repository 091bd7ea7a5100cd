"""Model specs resolve to folders transformers loads offline: local folders, the embedded GGUF, hub ids."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agent.models import (
    EMBEDDED_NAME,
    ModelNotFoundError,
    default_cache_dir,
    display_name,
    embedded_gguf_path,
    resolve_model,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def model_folder(tmp_path: Path) -> Path:
    """A folder that looks like a checkpoint to ``resolve_model`` (it only checks for config.json)."""
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return folder


def test_local_folder_resolves_to_itself(model_folder: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    assert resolve_model(str(model_folder), cache_dir=cache) == str(model_folder)
    assert not cache.exists()  # nothing is cached for a local folder


def test_local_folder_with_tilde(model_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(model_folder.parent))
    assert resolve_model("~/my-model") == str(model_folder)


def test_folder_without_config_json(tmp_path: Path) -> None:
    folder = tmp_path / "not-a-model"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(b"\0" * 16)
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model(str(folder), cache_dir=tmp_path / "cache")
    assert "config.json" in str(info.value)
    assert str(folder) in str(info.value)


def test_unknown_hub_id_offline_names_what_was_tried(tmp_path: Path) -> None:
    """In a child process, so that HF_HUB_OFFLINE is read when huggingface_hub is first imported."""
    code = (
        "from agent.models import resolve_model, ModelNotFoundError\n"
        "try:\n"
        "    resolve_model('s2agent-tests/no-such-model-anywhere')\n"
        "except ModelNotFoundError as exc:\n"
        "    print(exc)\n"
        "else:\n"
        "    print('RESOLVED')\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "S2AGENT_CACHE_DIR": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    message = result.stdout
    assert "RESOLVED" not in message
    assert "cannot find model 's2agent-tests/no-such-model-anywhere'" in message
    assert "local path" in message
    assert "Hugging Face cache" in message
    assert "hub download" in message


def test_default_cache_dir_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("S2AGENT_CACHE_DIR", str(tmp_path / "own"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "own"
    monkeypatch.delenv("S2AGENT_CACHE_DIR")
    assert default_cache_dir() == tmp_path / "xdg" / "s2agent"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert default_cache_dir() == tmp_path / "user" / ".cache" / "s2agent"


def test_embedded_gguf_is_installed() -> None:
    path = embedded_gguf_path()
    assert path.is_file()
    assert path.suffix == ".gguf"
    assert path.stat().st_size > 50_000_000  # the 135M model at Q4_1
    with path.open("rb") as f:
        assert f.read(4) == b"GGUF"


def test_default_uses_an_existing_cache_without_dequantizing(model_folder: Path, tmp_path: Path) -> None:
    cached = tmp_path / "models" / EMBEDDED_NAME
    shutil.copytree(model_folder, cached)
    before = {p.name: p.stat().st_mtime_ns for p in cached.iterdir()}
    assert resolve_model("default", cache_dir=tmp_path) == str(cached)
    assert {p.name: p.stat().st_mtime_ns for p in cached.iterdir()} == before


def test_display_name(model_folder: Path) -> None:
    assert display_name("default") == EMBEDDED_NAME
    assert display_name(str(model_folder)) == "my-model"
    assert display_name(str(model_folder) + "/") == "my-model"
    assert display_name("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.mark.slow
def test_gguf_is_dequantized_into_the_cache_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("S2AGENT_CACHE_DIR", str(tmp_path))
    gguf = embedded_gguf_path()

    folder = Path(resolve_model(str(gguf)))

    assert folder == tmp_path / "models" / gguf.stem
    assert (folder / "config.json").is_file()
    assert (folder / "model.safetensors").is_file()
    assert (folder / "model.safetensors").stat().st_size > 400_000_000  # fp32, 135M parameters
    assert json.loads((folder / "config.json").read_text()).get("quantization_config") is None
    assert any(folder.glob("tokenizer*"))
    assert [p.name for p in (tmp_path / "models").iterdir()] == [gguf.stem]  # no temp folder left behind
    mtimes = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}

    assert resolve_model(str(gguf)) == str(folder)
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == mtimes

    from transformers import AutoConfig, AutoTokenizer

    assert AutoConfig.from_pretrained(folder).model_type == "llama"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.decode(tokenizer.encode("Hello world", add_special_tokens=False)) == "Hello world"
