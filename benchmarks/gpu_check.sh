#!/usr/bin/env bash
# The GPU checks as one script for a lent device machine (the image has jax[cuda], flax,
# chex, optax and torch; nothing is installed). Writes JSON (and plots, where matplotlib
# exists) to $OUT, default runs/benchmarks/gpu (git-ignored); OUT=benchmarks/results
# refreshes the committed results. At most 10 minutes on one H100/H200.
#   OUT=/tmp/gpu bash benchmarks/gpu_check.sh
# The open speculative checks run first; they save their rows after each group, so a run
# cut short by the device time limit still leaves numbers.
set -u
out=${OUT:-runs/benchmarks/gpu}
py=${PYTHON:-python}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total --format=csv > "$out/gpu.txt" 2>&1
# Speculative decoding on a memory-bound target (the bundled one widened to 1B parameters).
# (a few K values: each program compiles separately, and the device time is short)
timeout 190 "$py" benchmarks/speculative.py --memory-bound 1e9 --batches 1,16 --ks 2,4,6 \
    --out "$out/speculative-memory-bound-gpu.json"
timeout 110 "$py" benchmarks/speculative.py --self --memory-bound 1e9 --modes greedy --exit-layers 1,2 --ks 3,4 \
    --out "$out/self-speculative-memory-bound-gpu.json"
# Sampler vs full-sort JAX chains and PyTorch's sort fallback; the candidate fast path
# (lax.top_k) vs the whole-vocabulary search; sampling overhead in a decode step.
timeout 120 "$py" benchmarks/sampler.py --shapes 8x32000,64x128256 --out "$out/sampler-gpu.json"
timeout 100 "$py" benchmarks/decode.py --out "$out/decode-gpu.json"
# XLA:GPU reads each lax.cond predicate back to the host (a stream sync) unless conditionals
# are recorded into CUDA graphs; the sampler's filters branch with lax.cond. Same decode
# benchmark with them recorded: the difference in sampling overhead is the cost of the syncs.
XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer=+CONDITIONAL,+WHILE" \
    timeout 75 "$py" benchmarks/decode.py --out "$out/decode-gpu-cmdbuf-conditionals.json"
