#!/usr/bin/env bash
# The GPU runs of issues 3 (BLL vs the paper's ResNet-18) and 7 (Pred-Sim on vgg8b) as one command
# for a lent GPU machine that has torch but not edgebll's other packages.
#
#   make device-carry                          # here: .whl/ (edgebll, cp312 onnxruntime-training-cpu 1.19.2,
#                                              # onnx 1.17) and .fmnist/ (the four Fashion-MNIST files), ~57 MB
#   bash benchmarks/gpu_session.sh predsim     # there, with .whl and .fmnist carried; or: resnet18
#
# predsim: vgg8b (full width), K=4, bp / bwbpf-conv / predsim / bll at once, cutout 14.
# resnet18: the BLL paper's comparison, K=4, bp / bwbpf-conv / bll at once.
# Every run prints its test accuracy after each epoch (a run cut short keeps its curve in the log);
# the tables go to $OUT when it is set (a device machine's output folder), else benchmarks/results.
# Settings: EPOCHS (default 20), DEVICE (cuda), PRECISION (bf16), PYTHON (python3), and EXTRA
# (more options for the benchmark, e.g. "--limit 512 --test-limit 500" for a smoke test on a CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
plan=${1:?usage: bash benchmarks/gpu_session.sh predsim|resnet18}
python=${PYTHON:-python3}
case $plan in
    predsim) name=predsim_accuracy_vgg8b_gpu
             args=(--model vgg8b --cutout 14 --methods bp bwbpf-conv predsim bll --jobs 4) ;;
    resnet18) name=accuracy_resnet18_gpu
              args=(--model resnet18 --methods bp bwbpf-conv bll --jobs 3) ;;
    *) echo "gpu_session.sh: unknown plan '$plan'; choose predsim or resnet18" >&2; exit 2 ;;
esac
if ! "$python" -c "import edgebll.export, onnxruntime.training" 2> /dev/null; then
    if ! compgen -G ".whl/*.whl" > /dev/null; then
        echo "gpu_session.sh: $python cannot import edgebll.export and onnxruntime.training, and no .whl/ was" \
             "carried; hint: run make device-carry where pip works, and carry .whl and .fmnist" >&2
        exit 2
    fi
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/edgebll-site .whl/*.whl
    export PYTHONPATH=/tmp/edgebll-site${PYTHONPATH:+:$PYTHONPATH}
fi
if [ -d .fmnist ]; then export EDGEBLL_DATA_DIR=$PWD/.fmnist; fi
export PYTHONUNBUFFERED=1
common=(--backend torch --device "${DEVICE:-cuda}" --precision "${PRECISION:-bf16}" --epochs "${EPOCHS:-20}"
        --blocks 4 --val-split 5000)
# shellcheck disable=SC2086  # EXTRA is a list of options
"$python" benchmarks/predsim_accuracy.py "${common[@]}" "${args[@]}" --name "${OUT:-$PWD/benchmarks/results}/$name" \
    ${EXTRA:-}
