#!/usr/bin/env bash
# The GPU figures of the engine, on a machine with a CUDA GPU, vLLM installed (pip install 's2agent[vllm]')
# and the model on local disk: tokens/s and latency at 1, 8 and 64 concurrent clients through
#   1. agent serve on the vLLM backend (System 1 only: routing off, no training), and
#   2. vLLM's own OpenAI server (vllm serve) on the same model,
# one after the other on the same GPU, each driven by `agent bench serving --url` with the same requests.
#   bash bench/gpu_check.sh /path/to/hf-model-folder [clients] [requests-per-client] [max-tokens]
# Writes bench/out/gpu_check/{agent,vllm}.json and prints both tables. Each server gets 0.85 of the GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:?usage: bash bench/gpu_check.sh MODEL_DIR [clients] [requests-per-client] [max-tokens]}
CLIENTS=${2:-1,8,64}
PER_CLIENT=${3:-8}
MAX_TOKENS=${4:-128}
PY=${PYTHON:-.venv/bin/python}
OUT=bench/out/gpu_check
mkdir -p "$OUT"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU visible to torch')"
"$PY" -c "import vllm" || { echo "vLLM is not installed: pip install 's2agent[vllm]'" >&2; exit 2; }
free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_ready() {  # URL PID: until the server answers /v1/models, or its process died
  for _ in $(seq 1 600); do
    curl -fsS "$1/v1/models" >/dev/null 2>&1 && return 0
    kill -0 "$2" 2>/dev/null || { echo "the server exited; see $OUT/*.log" >&2; return 1; }
    sleep 1
  done
  echo "the server did not start in 10 minutes" >&2; return 1
}
measure() {  # NAME URL SERVED_MODEL PID
  wait_ready "$2" "$4"
  "$PY" -m agent.cli bench serving --url "$2" --served-model "$3" --clients "$CLIENTS" \
    --requests-per-client "$PER_CLIENT" --max-tokens "$MAX_TOKENS" --json > "$OUT/$1.json"
  "$PY" -c "import json, sys; from bench import serving; print(serving.report(json.load(open(sys.argv[1]))))" "$OUT/$1.json"
  kill -TERM "$4"; wait "$4" || true
}
HOME_DIR=$(mktemp -d)
trap 'rm -rf "$HOME_DIR"; jobs -p | xargs -r kill' EXIT

port=$(free_port)
echo "== agent serve, backend vllm, on :$port"
S2AGENT_HOME="$HOME_DIR" S2AGENT_BACKEND=vllm S2AGENT_ROUTING__ROUTER=never S2AGENT_VLLM__GPU_MEMORY_UTILIZATION=0.85 \
  "$PY" -m agent.cli --model "$MODEL" serve --port "$port" --no-train > "$OUT/agent.log" 2>&1 &
measure agent "http://127.0.0.1:$port" default $!

port=$(free_port)
echo "== vllm serve on :$port"
"$PY" -m vllm.entrypoints.openai.api_server --model "$MODEL" --served-model-name gpu-check --port "$port" \
  --host 127.0.0.1 --gpu-memory-utilization 0.85 > "$OUT/vllm.log" 2>&1 &
measure vllm "http://127.0.0.1:$port" gpu-check $!
