#!/usr/bin/env bash
# The GPU checks of the continual-learning methods, in one run (about 6 minutes on one H100):
#   1. benchmarks/continual.py at the published shapes (ViT-B/16, 224 px, batch 64, 100 classes), bf16-mixed;
#   2. every embedded digits recipe of the prompt methods and ER under 16-mixed and bf16-mixed on the GPU,
#      each must finish with finite A_auc / A_last (the fp16 loss scaler and the bf16 autocast paths);
#   3. the multi-task aggregation and sharpness benchmarks at their GPU sizes (figures for the docs).
# Everything goes to stdout and, when OUT is set, to $OUT/gpu_checks.log.
#   bash benchmarks/gpu_checks.sh
set -uo pipefail
cd "$(dirname "$0")/.."
log="${OUT:-/tmp}/gpu_checks.log"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
run() {  # run <seconds> <command...>: a part that overruns is stopped and reported, the rest goes on
    local limit=$1
    shift
    echo "=== $* (limit ${limit}s)"
    local start=$SECONDS
    timeout "$limit" "$@"
    echo "=== exit $? after $((SECONDS - start))s"
}
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch, lightning, timm; print('torch', torch.__version__, 'lightning', lightning.__version__, 'timm', timm.__version__)"
    run 200 python3 benchmarks/continual.py --device cuda --precision bf16-mixed
    for precision in 16-mixed bf16-mixed; do
        for method in mvp ovor l2p dualprompt er; do
            cells=()  # the small stream's settings of ER and OVOR (configs/continual/data/digits.yaml)
            [ "$method" = er ] && cells=(--data.init_args.memory_size=100)
            [ "$method" = ovor ] && cells=(--trainer.callbacks.init_args.k=10 --trainer.callbacks.init_args.num_boundary=10
                --trainer.callbacks.init_args.num_candidates=100 --trainer.callbacks.init_args.num_outliers=20)
            run 60 python3 -m lightning_mtl fit --config configs/continual/data/digits.yaml \
                --config "configs/continual/methods/$method.yaml" "${cells[@]}" \
                --trainer.accelerator=gpu --trainer.precision="$precision" --trainer.enable_progress_bar=false \
                --trainer.logger.init_args.save_dir=/tmp/runs 2>&1 | grep -E "Continual metrics|Error|error|nan" || true
        done
    done
    run 120 python3 benchmarks/aggregation.py --no-torchjd --encoders digits resnet18 --tasks 2 10 --methods ls upgrad mgda pcgrad cagrad nashmtl --rounds 2 --steps 5
    run 60 python3 benchmarks/sharpness.py --steps 40 --warmup 5 --repeats 2 --precision bf16-mixed --methods sam
} 2>&1 | tee "$log"
