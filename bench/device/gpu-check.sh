#!/usr/bin/env bash
# On the air-gapped GPU host, from the repository root (bench/device/README.md):
#   gpu-check.sh stage     keep the carried .whl/ort/part-* in $MNISTOPS_STAGE (outside the checkout,
#                          which a transfer may replace); the stage must survive until `check`
#   gpu-check.sh assemble  put onnxruntime-gpu's wheel together from the staged parts and verify it
#                          against SHA256SUMS; print its path (exit 1, naming what is missing, if it cannot)
#   gpu-check.sh check     stage, assemble, install the carried wheels into /tmp/site (the image's
#                          python3 has torch with CUDA; nothing can be fetched there) and run
#                          bench/gpu_check.py, its figures and log into $OUT. Without a complete
#                          onnxruntime-gpu it runs with the image's CPU onnxruntime: the training is
#                          checked and measured, parity and throughput on the CUDA provider fail as absent.
set -uo pipefail
cd "$(dirname "$0")/../.."
STAGE=${MNISTOPS_STAGE:-/tmp/mnistops-stage}
SITE=${MNISTOPS_SITE:-/tmp/site}
PY=${PYTHON:-python3}

stage() {
    mkdir -p "$STAGE"
    for f in .whl/ort/part-* .whl/ort/SHA256SUMS; do
        [ -f "$f" ] && cp -f "$f" "$STAGE/"
    done
    echo "staged in $STAGE: $(cd "$STAGE" && ls part-* 2>/dev/null | tr '\n' ' ')"
}

assemble() {
    local sums="$STAGE/SHA256SUMS" wheel parts
    if [ ! -f "$sums" ]; then
        echo "onnxruntime-gpu: $sums is missing (it travels with the last part)" >&2
        return 1
    fi
    wheel=$(awk '$2 ~ /\.whl$/ {print $2}' "$sums")
    parts=$(awk '$2 ~ /^part-/ {print $2}' "$sums")
    for p in $parts; do
        if [ ! -f "$STAGE/$p" ]; then
            echo "onnxruntime-gpu: $p was not staged (staged: $(cd "$STAGE" && ls part-* 2>/dev/null | tr '\n' ' ')); a stage wiped between transfers loses them" >&2
            return 1
        fi
    done
    if ! (cd "$STAGE" && grep ' part-' SHA256SUMS | sha256sum --quiet -c -); then
        echo "onnxruntime-gpu: a staged part does not match $sums" >&2
        return 1
    fi
    (cd "$STAGE" && for p in $parts; do cat "$p"; done > "$wheel.tmp" && mv "$wheel.tmp" "$wheel")
    if ! (cd "$STAGE" && grep " $wheel\$" SHA256SUMS | sha256sum --quiet -c -); then
        echo "onnxruntime-gpu: $STAGE/$wheel does not match $sums" >&2
        rm -f "$STAGE/$wheel"
        return 1
    fi
    echo "$STAGE/$wheel"
}

check() {
    local out=${OUT:-bench/out} wheels=() ort
    mkdir -p "$out"
    shopt -s nullglob
    wheels=(.whl/mlflow/*.whl)
    if [ ${#wheels[@]} -eq 0 ]; then
        echo "gpu-check: no wheels in .whl/mlflow: make them here with bench/device/wheels.py and carry .whl/mlflow" >&2
        exit 1
    fi
    stage
    if ort=$(assemble); then
        wheels+=("$ort")
    else
        echo "gpu-check: running with the image's onnxruntime ($($PY -c 'import onnxruntime; print(onnxruntime.__version__)' 2>&1))"
    fi
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}" || exit 1
    export PYTHONPATH="$SITE" PYTHONUNBUFFERED=1 MNISTOPS_DATA_SOURCE="${MNISTOPS_DATA_SOURCE:-$PWD/.whl/mnist}"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee "$out/nvidia-smi.txt"
    $PY bench/gpu_check.py --out "$out/gpu.json" 2>&1 | tee "$out/gpu-check.log"
    return "${PIPESTATUS[0]}"
}

case "${1:-}" in
    stage) stage ;;
    assemble) assemble ;;
    check) check ;;
    *) echo "usage: $0 stage|assemble|check" >&2; exit 2 ;;
esac
