#!/usr/bin/env bash
# The default-size model on real scans, end to end through the README's commands:
# preprocess (512^3) -> stage 0 -> stage 1 -> stage 2 (short runs) -> export (bundle, verified)
# -> evaluate the bundle on the whole scans -> encode a scan and decode it to its own grid.
#
# Usage: bench/real_scans.sh RAW_DIR WORK_DIR [ORGAN_MAPPING_JSON]
# Environment (defaults in brackets):
#   STEPS0 STEPS1 STEPS2 [300 100 200]  training steps per stage
#   RESOLUTION [512]                     cube side of the preprocessing and the model
#   WINDOW [lung]                        the window preprocessed and trained on
#   OVERLAY []                           extra config file for every stage (e.g. bundles/ct_vqvae/demo.json
#                                        for the tiny model of a CPU smoke run)
#   WORKERS [8]                          preprocessing workers and DataLoader workers
#   VERIFY [1]                           0: export without checking the metadata (needs jsonschema)
#   PYTHON [python3]                     interpreter with ctvq's dependencies (run.sh's venv, or
#                                        PYTHONPATH as in bench/README.md on a GPU machine)
# Short runs measure that everything runs on real 512^3 scans and how fast; they are not a
# converged tokenizer, so the quality figures of the report are those of a few hundred steps.
set -euo pipefail
case "${1:-}" in -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;; esac
RAW=${1:?usage: bench/real_scans.sh RAW_DIR WORK_DIR [ORGAN_MAPPING_JSON]}
WORK=${2:?usage: bench/real_scans.sh RAW_DIR WORK_DIR [ORGAN_MAPPING_JSON]}
ORGANS=${3:-}
PY=${PYTHON:-python3}
S0=${STEPS0:-300}; S1=${STEPS1:-100}; S2=${STEPS2:-200}
RES=${RESOLUTION:-512}
WIN=${WINDOW:-lung}
N=${WORKERS:-8}
cd "$(dirname "$0")/.."
BUNDLES=bundles/ct_vqvae
mkdir -p "$WORK"
stamp() { echo "[$(date +%T)] $*"; }

stamp "preprocess $RAW -> $WORK/processed at ${RES}^3"
# a failed case is a metadata.csv row (exit 1), not a reason to stop here
$PY -m pipeline.preprocess "$RAW" "$WORK/processed" $ORGANS "$N" --resolution "$RES" --windows "$WIN" || true

overlay=(); [ -n "${OVERLAY:-}" ] && overlay=(--config "$OVERLAY")
common=(--data_dir "$WORK/processed" --override "window_type=\"$WIN\"" --override "network_def#resolution=$((RES / 8))" --override "num_workers=$N")
train() {  # stage steps extra-args...
  local stage=$1 steps=$2; shift 2
  stamp "stage $stage: $steps steps"
  $PY -m pipeline.train --config "$BUNDLES/stage$stage.json" "${overlay[@]}" --output_dir "$WORK/runs/stage$stage" \
    "${common[@]}" --override "max_steps=$steps" --override "i_save=$steps" --override "i_val=$steps" \
    --override "i_sample=$steps" --override "i_log=$(( steps / 10 > 0 ? steps / 10 : 1 ))" "$@"
}
train 0 "$S0"
train 1 "$S1" --override "pretrained_vae_path=\"$WORK/runs/stage0/ckpts/vqvae_step$(printf %07d "$S0").pt\""
# a stage 1 too short for its k-means (smoke runs): stage 2 trains the codebook instead of keeping it frozen
mapfile -t unfrozen < <($PY -c "import sys; from pipeline.runs import stage2_codebook_overrides as o; sys.stdout.write(''.join(a + '\n' for a in o(sys.argv[1])))" "$WORK/runs/stage1")
[ ${#unfrozen[@]} -eq 0 ] || stamp "$($PY -c "from pipeline.runs import STAGE1_WITHOUT_KMEANS as m; print(m)")"
train 2 "$S2" --load_dir "$WORK/runs/stage1" --ckpt latest "${unfrozen[@]}"

stamp "export"
verify=(); [ "${VERIFY:-1}" = 1 ] && verify=(--verify)
$PY -m pipeline.export --run "$WORK/runs/stage2" --out "$WORK/dist/ct_vqvae" "${verify[@]}"
stamp "evaluate the bundle on whole scans"
$PY -m pipeline.evaluate --bundle "$WORK/dist/ct_vqvae" --data_dir "$WORK/processed" --out "$WORK/reports/stage2"
scan=$(find "$RAW" -name '*.nii.gz' ! -name '*seg*' | sort | head -n 1)
stamp "encode $scan, decode it to the scan's own grid"
$PY -m pipeline.infer encode "$scan" "$WORK/tokens.npz" --bundle "$WORK/dist/ct_vqvae"
$PY -m pipeline.infer decode "$WORK/tokens.npz" "$WORK/recon.nii.gz" --bundle "$WORK/dist/ct_vqvae" --original-grid
stamp "done: report $WORK/reports/stage2/report.html"
