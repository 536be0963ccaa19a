#!/usr/bin/env bash
# The runs behind the shipped S2CAC weights and their reports, from the repository root:
#   scripts/train_s2cac_release.sh OUT_DIR [BUDGET_S]
# 1. Makes the training phantoms (seed 0) and the held-out ones (seeds 1000-1002: the test set and the
#    out-of-distribution sets with 1.5 mm slices and large patients).
# 2. Trains three networks side by side (they share one GPU): coronary semi-supervised (model.pt),
#    the same labeled cases supervised-only (the semi-supervised gain) and ICA calcium (model_ica.pt).
#    Each fits its number of epochs to BUDGET_S seconds (--time_budget_s); its log says how many.
# 3. Evaluates them on the held-out sets (OUT_DIR/eval_*/evaluation/evaluation.{json,md}).
# Environment: PYTHON (default python), SIZE (phantom size, default medium), N_CHEST, N_HEAD, N_TEST,
# DEVICE, AMP (default true), ICA_PRETRAINED (an ICA checkpoint to start from), STAGES ("train eval" by
# default; one 10-minute GPU lease fits "train" with BUDGET_S ~480, then "eval" in a second lease with
# OUT_DIR's weights carried back).
set -euo pipefail
out=${1:?usage: $0 OUT_DIR [BUDGET_S]}
budget=${2:-300}
py=${PYTHON:-python}
size=${SIZE:-medium}
n_test=${N_TEST:-100}
cores=$(nproc)
cfg=bundles/s2cac_coronary_calcium/configs
mkdir -p "$out"

waitall() {
    local status=0
    for pid in "$@"; do wait "$pid" || status=1; done
    return $status
}

phantoms() {  # KIND NUM NAME SEED [options]
    local kind=$1 num=$2 name=$3 seed=$4
    shift 4
    $py scripts/make_phantoms.py "$kind" --num "$num" --out "data/$name" --size "$size" --seed "$seed" \
        --workers "$cores" "$@" >"$out/phantoms_$name.log" 2>&1
}
stages=${STAGES:-train eval}
jobs=()
if [[ $stages == *train* ]]; then
    phantoms chest "${N_CHEST:-200}" "chest_$size" 0 --unlabeled-fraction 0.5 &
    jobs+=($!)
    phantoms head "${N_HEAD:-120}" "head_$size" 0 --unlabeled-fraction 0.5 &
    jobs+=($!)
fi
if [[ $stages == *eval* ]]; then
    phantoms chest "$n_test" "chest_test_$size" 1000 &
    jobs+=($!)
    phantoms chest $((n_test * 3 / 10)) "chest_test_${size}_1.5mm" 1001 --thickness 1.5 &
    jobs+=($!)
    phantoms chest $((n_test * 3 / 10)) "chest_test_${size}_large" 1002 --patient-size large &
    jobs+=($!)
    phantoms head $((n_test * 6 / 10)) "head_test_$size" 1000 &
    jobs+=($!)
fi
waitall "${jobs[@]}"

# Data loading and the crop/intensity transforms run on the CPU: a quarter of the cores per run.
export OMP_NUM_THREADS=$((cores / 4 > 0 ? cores / 4 : 1))
common=(--num_workers "$OMP_NUM_THREADS")
[ -n "${DEVICE:-}" ] && common+=(--device "\$torch.device('$DEVICE')")
train=(--max_epochs 1000 --time_budget_s "$budget" --patience 1000 --val_interval 5 --batch_size 4
    --num_samples 2 --unlabeled_batch 4 --amp "${AMP:-true}")
ica=(--config_file "['$cfg/train.yaml','$cfg/train_ica.yaml']" --dataset_dir "data/head_$size")
[ -n "${ICA_PRETRAINED:-}" ] && ica+=(--pretrained "$ICA_PRETRAINED")
run_training() {  # NAME [options]
    local name=$1
    shift
    $py -m monai.bundle run training --output_dir "$out/$name" --ckpt_dir "$out/$name" "${common[@]}" "${train[@]}" \
        "$@" >"$out/$name.log" 2>&1
}
if [[ $stages == *train* ]]; then
    run_training coronary --config_file "$cfg/train.yaml" --dataset_dir "data/chest_$size" &
    jobs=($!)
    run_training coronary_supervised --config_file "$cfg/train.yaml" --dataset_dir "data/chest_$size" \
        --unlabeled_batch 0 &
    jobs+=($!)
    run_training ica "${ica[@]}" &
    jobs+=($!)
    waitall "${jobs[@]}" || echo "a training run failed: see $out/*.log"
    grep -h "time budget" "$out"/*.log | grep fixed || true
fi
[[ $stages == *eval* ]] || exit 0

evaluate() {  # NAME MODEL DATASET CONFIGS
    $py -m monai.bundle run evaluating --config_file "$4" --model_file "$2" --eval_dataset_dir "data/$3" \
        --output_dir "$out/eval_$1" "${common[@]}" >"$out/eval_$1.log" 2>&1
}
coronary="['$cfg/train.yaml','$cfg/evaluate.yaml']"
evaluate coronary "$out/coronary/model.pt" "chest_test_$size" "$coronary" &
jobs=($!)
evaluate coronary_supervised "$out/coronary_supervised/model.pt" "chest_test_$size" "$coronary" &
jobs+=($!)
evaluate coronary_1.5mm "$out/coronary/model.pt" "chest_test_${size}_1.5mm" "$coronary" &
jobs+=($!)
evaluate coronary_large "$out/coronary/model.pt" "chest_test_${size}_large" "$coronary" &
jobs+=($!)
evaluate ica "$out/ica/model_ica.pt" "head_test_$size" "['$cfg/train.yaml','$cfg/evaluate.yaml','$cfg/train_ica.yaml']" &
jobs+=($!)
waitall "${jobs[@]}"
