#!/usr/bin/env bash
# Side-by-side throughput on one GPU, random weights, bf16, batch 512: Flax through featdp's runner path
# vs timm under torch.compile, for ViT-B/16, CLIP ViT-L/14 and DINOv2 ViT-B/14 (Flax ViT-B/16 also with
# XLA's attention instead of cuDNN's). Writes one markdown table to $OUT/gpu_check.md and prints it;
# the raw rows are in $OUT/flax.json and $OUT/timm.json, the logs in $OUT/*.log.
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh        # on the GPU machine, from the repository root
#   GPU_CHECK_QUICK=1 bash benchmarks/gpu_check.sh    # smoke test anywhere: depth-2 models, batch 4
#
# Needs python3 with jax (+ CUDA plugin), flax, numpy, torch, timm; featdp is not installed: it runs
# with PYTHONPATH=. and imports featdp.extraction.backbones only (featdp.extraction.extract too where its imports are met).
# Each framework runs in its own process under a timeout (Flax 200 s, timm 250 s): with compilation the
# whole script ends inside 8 minutes; a model cut off by its timeout shows as "not measured".
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/featdp_gpu_check}"
PY="${PYTHON:-python3}"
MODELS="${GPU_CHECK_MODELS:-vit-b16,clip-vit-l14,dinov2-vit-b14}"
mkdir -p "$OUT"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [[ "${GPU_CHECK_QUICK:-0}" != 0 ]]; then
  ARGS=(--quick --batch "${GPU_CHECK_BATCH:-4}" --steps 2)
  TIMM_ARGS=(--eager)  # CPU inductor builds take minutes; GPU_CHECK_COMPILE=1 compiles anyway
  if [[ -n "${GPU_CHECK_COMPILE:-}" ]]; then TIMM_ARGS=(); fi
  FLAX_LIMIT=300 TIMM_LIMIT=300
else
  ARGS=(--batch "${GPU_CHECK_BATCH:-512}" --steps "${GPU_CHECK_STEPS:-10}")
  TIMM_ARGS=()
  FLAX_LIMIT="${GPU_CHECK_FLAX_LIMIT:-200}" TIMM_LIMIT="${GPU_CHECK_TIMM_LIMIT:-250}"
fi

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  "$PY" -c 'import sys, jax; print(sys.version.split()[0], "jax", jax.__version__, jax.devices())' 2>&1
} | tee "$OUT/env.log"

start=$(date +%s)
timeout -k 10 "$FLAX_LIMIT" "$PY" benchmarks/extract_throughput.py --side-by-side flax --models "$MODELS" \
  "${ARGS[@]}" --json "$OUT/flax.json" 2>&1 | tee "$OUT/flax.log" | grep -E '^\{|Error|error' || true
echo "flax done after $(( $(date +%s) - start )) s"
XLA_PYTHON_CLIENT_PREALLOCATE=false timeout -k 10 "$TIMM_LIMIT" "$PY" benchmarks/extract_throughput.py \
  --side-by-side timm --models "$MODELS" "${ARGS[@]}" ${TIMM_ARGS[@]+"${TIMM_ARGS[@]}"} --json "$OUT/timm.json" 2>&1 \
  | tee "$OUT/timm.log" | grep -E '^\{|Error|error' || true
echo "timm done after $(( $(date +%s) - start )) s"
"$PY" benchmarks/extract_throughput.py --table "$OUT/flax.json" "$OUT/timm.json" > "$OUT/gpu_check.md"
echo "total $(( $(date +%s) - start )) s" >> "$OUT/gpu_check.md"
cat "$OUT/gpu_check.md"
