#!/usr/bin/env bash
# The runs behind the shipped DST weights and their reports, from the repository root:
#   scripts/train_dst_release.sh OUT_DIR
# 1. Makes the phantoms: head (landmarks) for training (seed 0) and held-out (seed 1000); lung in the
#    Clean-CC-CCII layout, prepared by scripts/prepare_clean_cc_ccii.py, likewise.
# 2. Trains localization (model.pt) and classification (model_classification.pt) side by side.
# 3. Evaluates both on the held-out sets (OUT_DIR/eval_*/evaluation/evaluation.{json,md}) and
#    benchmarks the small and paper settings (OUT_DIR/benchmark.md).
# Environment: PYTHON (default python), N_HEAD, N_LUNG, EPOCHS_LOC, EPOCHS_CLS, DEVICE, AMP (default true).
set -euo pipefail
out=${1:?usage: $0 OUT_DIR}
py=${PYTHON:-python}
cores=$(nproc)
cfg=bundles/dst_ica_calcification/configs
n_head=${N_HEAD:-600}
n_lung=${N_LUNG:-150}
mkdir -p "$out"

waitall() {
    local status=0
    for pid in "$@"; do wait "$pid" || status=1; done
    return $status
}

heads() {  # NAME NUM SEED
    $py scripts/make_phantoms.py head --num "$2" --out "data/$1" --seed "$3" --workers "$cores" >"$out/phantoms_$1.log" 2>&1
}
lungs() {  # NAME NUM SEED
    $py scripts/make_phantoms.py lung --num "$2" --out "data/$1_raw" --seed "$3" --workers "$cores" \
        >"$out/phantoms_$1.log" 2>&1
    $py scripts/prepare_clean_cc_ccii.py --raw-root "data/$1_raw" --out "data/$1" --workers "$cores" >>"$out/phantoms_$1.log" 2>&1
}
heads head_small "$n_head" 0 &
jobs=($!)
heads head_test "$((n_head / 4))" 1000 &
jobs+=($!)
lungs lung_small "$n_lung" 0 &
jobs+=($!)
lungs lung_test "$((n_lung * 2 / 5))" 1000 &
jobs+=($!)
waitall "${jobs[@]}"

export OMP_NUM_THREADS=$((cores / 4 > 0 ? cores / 4 : 1))
common=(--num_workers "$OMP_NUM_THREADS")
[ -n "${DEVICE:-}" ] && common+=(--device "\$torch.device('$DEVICE')")
train=(--batch_size 16 --amp "${AMP:-true}" --patience 1000)
$py -m monai.bundle run training --config_file "$cfg/train.yaml" --task localization --dataset_dir data/head_small \
    --max_epochs "${EPOCHS_LOC:-150}" --output_dir "$out/localization" --ckpt_dir "$out/localization" \
    "${common[@]}" "${train[@]}" >"$out/localization.log" 2>&1 &
jobs=($!)
$py -m monai.bundle run training --config_file "$cfg/train.yaml" --task classification --dataset_dir data/lung_small \
    --max_epochs "${EPOCHS_CLS:-100}" --output_dir "$out/classification" --ckpt_dir "$out/classification" \
    "${common[@]}" "${train[@]}" >"$out/classification.log" 2>&1 &
jobs+=($!)
waitall "${jobs[@]}" || echo "a training run failed: see $out/*.log"

evaluate="['$cfg/train.yaml','$cfg/evaluate.yaml']"
$py -m monai.bundle run evaluating --config_file "$evaluate" --task localization --eval_dataset_dir data/head_test \
    --model_file "$out/localization/model.pt" --output_dir "$out/eval_localization" "${common[@]}" \
    >"$out/eval_localization.log" 2>&1 &
jobs=($!)
$py -m monai.bundle run evaluating --config_file "$evaluate" --task classification --eval_dataset_dir data/lung_test \
    --model_file "$out/classification/model_classification.pt" --output_dir "$out/eval_classification" \
    "${common[@]}" >"$out/eval_classification.log" 2>&1 &
jobs+=($!)
waitall "${jobs[@]}"
