#!/usr/bin/env bash
# vLLM's Python API on a CPU machine, for tests/agent/test_vllm_api.py: vLLM's wheel is a CUDA build and
# its engine needs a GPU, but its classes import when the wheel is installed without its dependencies
# beside the CPU torch. This builds ./.venv-vllm on top of ./.venv (setup.sh first: the new venv sees
# .venv's packages through a .pth file, so torch, transformers and the project are not installed twice),
# adds vLLM and the pure-Python packages its imports need, then runs the given command in it.
#   bash .ci/vllm-api.sh                                    # build (idempotent), then run the vLLM API tests
#   bash .ci/vllm-api.sh .venv-vllm/bin/python -m pytest -q tests/agent/test_vllm_api.py -x
set -euo pipefail
cd "$(dirname "$0")/.."
VLLM=${S2AGENT_VLLM:-vllm==0.33.0}
# What `import vllm`, its engine arguments and its v1 engine import, found one ImportError at a time, with the
# versions vLLM's own metadata asks for (pillow and the rest come from .venv).
PURE="cachetools py-cpuinfo aiohttp>=3.14.4 prometheus_client>=0.18.0 llguidance>=1.7.0,<1.8.0 xgrammar==0.2.8
partial-json-parser pyzmq>=25.0.0 msgspec cloudpickle pybase64 cbor2 uvloop openai-harmony"
[ -x .venv/bin/python ] || { echo "run ./setup.sh first: .venv-vllm builds on .venv" >&2; exit 2; }
if [ ! -x .venv-vllm/bin/python ]; then
  "$(.venv/bin/python -c 'import sys; print(sys._base_executable)')" -m venv .venv-vllm
fi
base=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
own=$(.venv-vllm/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# addsitedir, not a bare path: .venv's own .pth files (the editable install) must be read too
echo "import site; site.addsitedir('$base')" > "$own/s2agent-base-venv.pth"
pip() { .venv-vllm/bin/python -m pip "$@"; }
api="import vllm, vllm.engine.arg_utils, vllm.v1.engine.async_llm; print('vLLM API', vllm.__version__)"
if ! .venv-vllm/bin/python -c "$api" 2>/dev/null; then
  pip install -q --no-deps "$VLLM"
  # shellcheck disable=SC2086 - one word per package. pip warns that vLLM's torch and CUDA pins are not met: they
  # are not meant to be (the CPU torch of .venv stands in; no engine runs here)
  pip install -q -c constraints.txt $PURE
fi
.venv-vllm/bin/python -c "$api"
if [ $# -eq 0 ]; then
  set -- .venv-vllm/bin/python -m pytest -q tests/agent/test_vllm_api.py -p no:cacheprovider
fi
exec "$@"
