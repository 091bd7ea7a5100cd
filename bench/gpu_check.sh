#!/usr/bin/env bash
# The whole loop on the vLLM backend, on a machine with a CUDA GPU and vLLM (pip install 's2agent[vllm]'):
#   serving       tokens/s and latency at 1, 8 and 64 concurrent clients, then the streamed time to first token
#                 at 1 client, through `agent serve` on the vLLM backend (System 1 only: routing off, no
#                 training), then through vLLM's own OpenAI server (`vllm serve`) on the same model and GPU,
#                 one after the other, each driven by `agent bench serving --url` with the same requests;
#   consolidation `agent bench consolidation` on the vLLM backend: an adapter trained on the GPU beside the
#                 engine (training time, memory), then hot-swapped into the engine (latency, first answer);
#   loop          `agent bench paper --task addition --method pal` on the vLLM backend: System 1, System 2
#                 (PAL, k = 4), the consistency filter, distillation through the runtime's own consolidation,
#                 the distilled System 1 on held-out sums.
#   bash bench/gpu_check.sh [MODEL] [clients] [requests-per-client] [max-tokens]
# MODEL: default (the embedded SmolLM2-135M-Instruct; the default), a .gguf file or a model folder.
# STEPS="serving consolidation loop" (the default) chooses the parts. Writes bench/out/gpu_check/*.{json,log}
# and prints every table. Each server gets 0.85 of the GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
SPEC=${1:-default}
CLIENTS=${2:-1,8,64}
PER_CLIENT=${3:-8}
MAX_TOKENS=${4:-128}
STEPS=${STEPS:-serving consolidation loop}
PY=${PYTHON:-.venv/bin/python}
OUT=bench/out/gpu_check
mkdir -p "$OUT"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU visible to torch')"
"$PY" -c "import vllm" || { echo "vLLM is not installed: pip install 's2agent[vllm]'" >&2; exit 2; }
# vllm serve needs a model folder: a GGUF (the embedded model's too) is dequantized once into the cache
MODEL=$("$PY" -c "import sys; from agent.models import resolve_model; print(resolve_model(sys.argv[1]))" "$SPEC")
"$PY" -c "import sys, torch, vllm; print(f'GPU {torch.cuda.get_device_name()}, torch {torch.__version__}, '
          f'vLLM {vllm.__version__}, model {sys.argv[1]}')" "$MODEL"
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
  local start=$SECONDS
  wait_ready "$2" "$4"
  echo "ready in $((SECONDS - start)) s"
  "$PY" -m agent.cli bench serving --url "$2" --served-model "$3" --clients "$CLIENTS" \
    --requests-per-client "$PER_CLIENT" --max-tokens "$MAX_TOKENS" --json > "$OUT/$1.json"
  "$PY" -c "import json, sys; from bench import serving; print(serving.report(json.load(open(sys.argv[1]))))" "$OUT/$1.json"
  kill -TERM "$4"; wait "$4" || true
}
HOME_DIR=$(mktemp -d)
trap 'rm -rf "$HOME_DIR"; jobs -p | xargs -r kill' EXIT
export S2AGENT_HOME="$HOME_DIR"

if [[ " $STEPS " == *" serving "* ]]; then
  port=$(free_port)
  echo "== agent serve, backend vllm, on :$port"
  S2AGENT_BACKEND=vllm S2AGENT_ROUTING__ROUTER=never S2AGENT_VLLM__GPU_MEMORY_UTILIZATION=0.85 \
    "$PY" -m agent.cli --model "$MODEL" serve --port "$port" --no-train > "$OUT/agent.log" 2>&1 &
  measure agent "http://127.0.0.1:$port" default $!

  port=$(free_port)
  echo "== vllm serve on :$port"
  "$PY" -m vllm.entrypoints.openai.api_server --model "$MODEL" --served-model-name gpu-check --port "$port" \
    --host 127.0.0.1 --gpu-memory-utilization 0.85 > "$OUT/vllm.log" 2>&1 &
  measure vllm "http://127.0.0.1:$port" gpu-check $!
fi
export S2AGENT_BACKEND=vllm
if [[ " $STEPS " == *" consolidation "* ]]; then
  echo "== agent bench consolidation, backend vllm"
  "$PY" -m agent.cli --model "$MODEL" bench consolidation --examples 100 --epochs 1 2>"$OUT/consolidation.log" \
    | tee "$OUT/consolidation.txt"
fi
if [[ " $STEPS " == *" loop "* ]]; then
  echo "== agent bench paper --task addition --method pal, backend vllm"
  "$PY" -m agent.cli --model "$MODEL" bench paper --task addition --method pal --n-train 200 --n-eval 100 \
    --out "$OUT/paper" 2>"$OUT/paper.log" | tee "$OUT/paper.txt"
fi
