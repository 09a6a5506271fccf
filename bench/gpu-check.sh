#!/usr/bin/env bash
# GPU check: on a host with an NVIDIA GPU, serves the default models on the CUDA execution
# provider next to the same binary on the CPU, and checks parity and speed.
#
#   bench/gpu-check.sh [LMSERVE_BINARY]
#
# Needs: the release binary (default target/release/lmserve), the ONNX Runtime CUDA build in
# ORT_GPU_LIB (`make onnxruntime-gpu` prints the path; its CUDA and cuDNN libraries must be on
# the loader's path) and the CPU build in ORT_DYLIB_PATH (`make onnxruntime`). It fetches
# nothing, so it runs on a host without a network.
#
# Checks, each printed PASS or FAIL (the exit status is the number of failures):
#   1. every model loads on cuda:0 (required_provider, so no silent fallback to the CPU) and
#      GetModel reports the provider;
#   2. greedy tokens of every generating model are identical on the GPU and the CPU;
#   3. embeddings of tiny-encoder agree within 1e-3;
#   4. greedy tokens of 8 streams that join and leave one batch on the GPU (its carried state
#      kept in GPU memory between steps) are those of each stream alone on the CPU;
#   5. tiny-llama converted to a KV cache written in place (tests/fixtures/in-place), in float32
#      and in float16 (whose cache buffers stay in GPU memory), loads on the GPU, decodes
#      tiny-llama's greedy text, and decodes 8 streams joining and leaving one batch as each
#      alone (a note says whether each graph's text on the GPU is its own on the CPU, which
#      tells a fault of the GPU path from float16's precision);
# then prints tokens/s of one stream and of 8 concurrent streams on each, and their ratio.
# Where `make real-models` has built the real models (REAL_REPO), it also checks:
#   6. SmolLM2-135M's greedy text and all-MiniLM-L6-v2's embeddings (within 1e-3) on the GPU
#      against the CPU, and prints SmolLM2's tokens/s on each;
#   7. SmolLM2-135M in float16 (FLOAT16_REPO, which `make real-models` builds beside REAL_REPO;
#      its cache buffers stay in GPU memory): it loads on the GPU, its greedy text is the CPU's
#      float32 text, and 8 streams joining and leaving one batch each decode as alone; then
#      prints its tokens/s.
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-target/release/lmserve}
: "${ORT_GPU_LIB:?set ORT_GPU_LIB to libonnxruntime.so of onnxruntime-gpu 1.31.1}"
: "${ORT_DYLIB_PATH:=$PWD/.cache/onnxruntime-1.31.1/libonnxruntime.so}"
REPO=${REPO:-models/repository}
IN_PLACE_REPO=${IN_PLACE_REPO:-tests/fixtures/in-place}
REAL_REPO=${REAL_REPO:-$HOME/.cache/lmserve/real-models/repository}
FLOAT16_REPO=${FLOAT16_REPO:-$(dirname "$REAL_REPO")/float16}
# The provider under test; GPU_PROVIDER=cpu with ORT_GPU_LIB=$ORT_DYLIB_PATH dry-runs the script.
GPU=${GPU_PROVIDER:-cuda:0}
CPU_PORT=${CPU_PORT:-50171}
GPU_PORT=${GPU_PORT:-50172}
failures=0
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$work"' EXIT

check() { # name, status
    if [ "$2" = 0 ]; then echo "PASS $1"; else echo "FAIL $1"; failures=$((failures + 1)); fi
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

serve() { # port, library, providers, log[, repository]
    ORT_DYLIB_PATH=$2 LMSERVE_RUNTIME__EXECUTION_PROVIDERS=$3 \
        LMSERVE_RUNTIME__REQUIRED_PROVIDER=$(echo "$3" | tr -d '[]"' | cut -d, -f1) \
        "$BIN" serve --grpc-addr "127.0.0.1:$1" --no-metrics --repository "${5:-$REPO}" >"$4" 2>&1 &
    for _ in $(seq 1 240); do
        if "$BIN" models list --addr "127.0.0.1:$1" >"$4.models" 2>&1 &&
            ! grep -q LOADING "$4.models"; then
            return 0
        fi
        sleep 0.5
    done
    echo "server on :$1 did not start:"; tail -20 "$4"; return 1
}

serve "$CPU_PORT" "$ORT_DYLIB_PATH" '["cpu"]' "$work/cpu.log" || exit 100
serve "$GPU_PORT" "$ORT_GPU_LIB" "[\"$GPU\"]" "$work/gpu.log" || exit 100

# 1. Every model on the GPU.
"$BIN" models list --addr "127.0.0.1:$GPU_PORT" >"$work/models.txt"
cat "$work/models.txt"
# `models list` prints: name@version, state, tasks, provider.
while read -r model state _ provider; do
    [ "$state" = READY ] && [ "$provider" = "$GPU" ]
    check "$model runs on $GPU" $?
done < <(awk '$1 ~ /@/' "$work/models.txt")

# 2. Greedy parity.
for model in tiny-gpt2 tiny-llama tiny-lstm tiny-transformer-lm tiny-translator; do
    prompt="To be, or not to be"
    [ "$model" = tiny-translator ] && prompt="Where is the station?"
    for port in "$CPU_PORT" "$GPU_PORT"; do
        "$BIN" generate --addr "127.0.0.1:$port" -m "$model" --max-new-tokens 48 "$prompt" \
            >"$work/$model.$port.txt" 2>"$work/$model.$port.err"
    done
    cmp -s "$work/$model.$CPU_PORT.txt" "$work/$model.$GPU_PORT.txt"
    check "$model greedy text identical on GPU and CPU" $?
done

# 3. Embedding parity.
embeddings_agree() { # model, text, label
    for port in "$CPU_PORT" "$GPU_PORT"; do
        "$BIN" embed --addr "127.0.0.1:$port" -m "$1" "$2" | tr -d '[] ' | tr ',' '\n' \
            >"$work/embed.$1.$port.txt"
    done
    paste "$work/embed.$1.$CPU_PORT.txt" "$work/embed.$1.$GPU_PORT.txt" | awk '
        { d = $1 - $2; if (d < 0) d = -d; if (d > worst) worst = d; n++ }
        END { printf "embedding: %d values, largest difference %.2e\n", n, worst; exit !(n > 0 && worst < 1e-3) }'
    check "$3" $?
}
text="Now is the winter of our discontent made glorious summer by this sun of York."
embeddings_agree tiny-encoder "$text" "tiny-encoder embeddings agree within 1e-3"

# 8 streams of `model` started together on :batch_port, stream i with prompt (printf) format
# `prompt` and `step` * i new tokens, so they join as their prompts arrive and leave as each
# reaches its length; each against the same request alone on :alone_port. An empty output
# counts as a failure, not a match.
batch_matches_alone() { # model, batch_port, alone_port, prompt, step
    local i pids=() same=0
    for i in $(seq 1 8); do
        # shellcheck disable=SC2059 # the format is the caller's
        "$BIN" generate --addr "127.0.0.1:$2" -m "$1" --max-new-tokens $(($5 * i)) \
            "$(printf "$4" "$i")" >"$work/$1.$2.batch.$i" 2>/dev/null &
        pids+=($!)
    done
    wait "${pids[@]}"
    for i in $(seq 1 8); do
        # shellcheck disable=SC2059
        "$BIN" generate --addr "127.0.0.1:$3" -m "$1" --max-new-tokens $(($5 * i)) \
            "$(printf "$4" "$i")" >"$work/$1.$3.alone.$i" 2>/dev/null
        [ -s "$work/$1.$2.batch.$i" ] && cmp -s "$work/$1.$3.alone.$i" "$work/$1.$2.batch.$i" ||
            same=1
    done
    return "$same"
}

# 4. Rows joining and leaving a batch whose state lives on the GPU, each stream against the
# same request alone on the CPU. Between steps the carried state stays in GPU memory; a join
# or a leave gathers it through the host.
for model in tiny-gpt2 tiny-lstm tiny-translator; do
    prompt="Stream %d: to be, or not to be"
    [ "$model" = tiny-translator ] && prompt="Where is station number %d?"
    batch_matches_alone "$model" "$GPU_PORT" "$CPU_PORT" "$prompt" 16
    check "$model: 8 streams joining and leaving on the GPU match each alone on the CPU" $?
done

# 5. Caches written in place. The float16 graph runs its attention on the GPU, over buffers in
# GPU memory; the float32 graph runs it on the CPU. Texts are compared with tiny-llama's on the
# CPU, and each of 8 streams on the GPU with the same request alone there (a join or a leave
# copies the buffers through the host). An empty output counts as a failure, not a match.
IN_PLACE_PORT=${IN_PLACE_PORT:-50173}
IN_PLACE_CPU_PORT=${IN_PLACE_CPU_PORT:-50174}
serve "$IN_PLACE_PORT" "$ORT_GPU_LIB" "[\"$GPU\"]" "$work/in-place.log" "$IN_PLACE_REPO" || exit 100
in_place_server=$!
# The same graphs on the CPU, for the note below each check: a text that differs from
# tiny-llama's on the GPU but not on the CPU points at the GPU path, one that differs on both at
# the graph's precision.
serve "$IN_PLACE_CPU_PORT" "$ORT_DYLIB_PATH" '["cpu"]' "$work/in-place-cpu.log" "$IN_PLACE_REPO" ||
    exit 100
in_place_cpu_server=$!
"$BIN" generate --addr "127.0.0.1:$CPU_PORT" -m tiny-llama --max-new-tokens 48 \
    "To be, or not to be" >"$work/tiny-llama.reference.txt" 2>/dev/null
"$BIN" models list --addr "127.0.0.1:$IN_PLACE_PORT" >"$work/in-place.models"
for model in tiny-llama-in-place tiny-llama-in-place-fp16; do
    grep "^$model@1 *READY .*$GPU" "$work/in-place.models" >/dev/null
    check "$model runs on $GPU" $?
    "$BIN" generate --addr "127.0.0.1:$IN_PLACE_PORT" -m "$model" --max-new-tokens 48 \
        "To be, or not to be" >"$work/$model.txt" 2>"$work/$model.err"
    [ -s "$work/tiny-llama.reference.txt" ] && cmp -s "$work/tiny-llama.reference.txt" "$work/$model.txt"
    check "$model greedy text on $GPU is tiny-llama's on the CPU" $?
    "$BIN" generate --addr "127.0.0.1:$IN_PLACE_CPU_PORT" -m "$model" --max-new-tokens 48 \
        "To be, or not to be" >"$work/$model.cpu.txt" 2>/dev/null
    if [ -s "$work/$model.txt" ] && cmp -s "$work/$model.cpu.txt" "$work/$model.txt"; then
        echo "  note: $model decodes the same text on $GPU as on the CPU"
    else
        echo "  note: $model decodes a different text on $GPU than on the CPU"
    fi
    batch_matches_alone "$model" "$IN_PLACE_PORT" "$IN_PLACE_PORT" "Stream %d: to be, or not to be" 16
    check "$model: 8 streams joining and leaving on $GPU decode as each alone" $?
done
kill "$in_place_server" "$in_place_cpu_server" 2>/dev/null

# Speed: one stream, and 8 at once, of 128 tokens each.
rate() { # port, streams
    local start end pids=()
    start=$(date +%s.%N)
    for i in $(seq 1 "$2"); do
        "$BIN" generate --addr "127.0.0.1:$1" -m tiny-gpt2 --max-new-tokens 128 \
            "Stream $i: to be, or not to be" >/dev/null 2>&1 &
        pids+=($!)
    done
    wait "${pids[@]}"
    end=$(date +%s.%N)
    echo "$2 * 128 / ($end - $start)" | bc -l
}
for streams in 1 8; do
    cpu=$(rate "$CPU_PORT" "$streams")
    gpu=$(rate "$GPU_PORT" "$streams")
    printf "tiny-gpt2, %d stream(s): cpu %.0f tokens/s, gpu %.0f tokens/s, %.2fx\n" \
        "$streams" "$cpu" "$gpu" "$(echo "$gpu / $cpu" | bc -l)"
done

# 6-7. Real models, when built.
if [ -d "$REAL_REPO/smollm2-135m-instruct" ]; then
    kill $(jobs -p) 2>/dev/null
    wait 2>/dev/null
    CPU_PORT=$((CPU_PORT + 10))
    GPU_PORT=$((GPU_PORT + 10))
    serve "$CPU_PORT" "$ORT_DYLIB_PATH" '["cpu"]' "$work/real-cpu.log" "$REAL_REPO" || exit 100
    serve "$GPU_PORT" "$ORT_GPU_LIB" "[\"$GPU\"]" "$work/real-gpu.log" "$REAL_REPO" || exit 100
    "$BIN" models list --addr "127.0.0.1:$GPU_PORT"
    prompt="Once upon a time"
    for port in "$CPU_PORT" "$GPU_PORT"; do
        "$BIN" generate --addr "127.0.0.1:$port" -m smollm2-135m-instruct --max-new-tokens 48 \
            "$prompt" >"$work/smollm2.$port.txt" 2>"$work/smollm2.$port.err"
    done
    cat "$work/smollm2.$GPU_PORT.txt"
    cmp -s "$work/smollm2.$CPU_PORT.txt" "$work/smollm2.$GPU_PORT.txt"
    check "smollm2-135m-instruct greedy text identical on GPU and CPU" $?
    embeddings_agree all-minilm-l6-v2 "$text" "all-minilm-l6-v2 embeddings agree within 1e-3"
    smollm2_rate() { # port, label
        # The client prints "[N tokens, ..., total T ms]" on stderr.
        "$BIN" generate --addr "127.0.0.1:$1" -m smollm2-135m-instruct --max-new-tokens 64 \
            "$prompt" 2>&1 >/dev/null | sed -nE 's/^\[([0-9]+) tokens.*total ([0-9.]+) ms\]$/\1 \2/p' |
            awk -v label="$2" '{ printf "smollm2-135m-instruct, 1 stream, %s: %d tokens, %.1f tokens/s\n", label, $1, $1 * 1000 / $2 }'
    }
    smollm2_rate "$CPU_PORT" "float32 on the CPU"
    smollm2_rate "$GPU_PORT" "float32 on $GPU"
    float32_text="$work/smollm2.$CPU_PORT.txt"

    # 7. The float16 graph, whose attention (and so its cache) runs on the GPU.
    if [ -d "$FLOAT16_REPO/smollm2-135m-instruct" ]; then
        kill $(jobs -p) 2>/dev/null
        wait 2>/dev/null
        GPU_PORT=$((GPU_PORT + 10))
        serve "$GPU_PORT" "$ORT_GPU_LIB" "[\"$GPU\"]" "$work/f16-gpu.log" "$FLOAT16_REPO" || exit 100
        "$BIN" models list --addr "127.0.0.1:$GPU_PORT" >"$work/f16.models"
        grep "smollm2-135m-instruct@1 *READY .*$GPU" "$work/f16.models" >/dev/null
        check "float16 smollm2-135m-instruct runs on $GPU" $?
        "$BIN" generate --addr "127.0.0.1:$GPU_PORT" -m smollm2-135m-instruct --max-new-tokens 48 \
            "$prompt" >"$work/smollm2.f16.txt" 2>"$work/smollm2.f16.err"
        [ -s "$float32_text" ] && cmp -s "$float32_text" "$work/smollm2.f16.txt"
        check "float16 smollm2-135m-instruct greedy text on $GPU is the CPU's float32 text" $?
        batch_matches_alone smollm2-135m-instruct "$GPU_PORT" "$GPU_PORT" "Story %d: once upon a time" 8
        check "float16 smollm2-135m-instruct: 8 streams joining and leaving on $GPU decode as alone" $?
        smollm2_rate "$GPU_PORT" "float16 on $GPU"
    else
        echo "(no float16 SmolLM2 in $FLOAT16_REPO: \`make real-models\` builds it)"
    fi
else
    echo "(no real models in $REAL_REPO: \`make real-models\` builds them)"
fi

echo "$failures failure(s)"
exit "$failures"
