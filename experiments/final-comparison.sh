#!/usr/bin/env bash
# The final comparison of every training method at its tuned setting (issue 31): for each seed,
# the plain ensemble, then cos, GAL, GDR, DRT, ADP, TRS and DVERGE (fine-tuning that seed's
# plain ensemble), each trained with the settings `ensdiv tune` chose (results/tune-DATASET/
# chosen.json; a rejected method's stated fallback), then carded at every ε. After each
# ensemble its records (config.json, metrics.jsonl, the cards) are committed, so a killed
# series, or the next session, resumes from what is committed and on disk: a finished run or
# card is skipped, an interrupted one resumes from its checkpoint.
#
#   experiments/final-comparison.sh mnist5k      # or fashion-mnist
#   THREADS=1 SEEDS="0 1" experiments/final-comparison.sh mnist5k
#
# Everything below is the protocol; change it only with the docs (docs/training.md, "The final
# comparison").
set -euo pipefail
cd "$(dirname "$0")/.."

DATASET=${1:?usage: experiments/final-comparison.sh DATASET}
ENSDIV=${ENSDIV:-.venv/bin/python -m ensdiv}
THREADS=${THREADS:-2}
SEEDS=${SEEDS:-0 1 2}
METHODS=${METHODS:-none cos gal gdr drt adp trs dverge}
TUNE=results/tune-$DATASET
OUT=results/final/$DATASET
SURROGATE_SEED=10000  # an independent plain ensemble, the cards' black-box source
case $DATASET in
  # plain's validation accuracy stops improving by then: flat at 0.9725 from epoch 15 of a
  # 20-epoch cosine schedule (0.970 at its end); a 30-epoch schedule ends at 0.975, within one
  # standard error (0.8 points at n = 400) — results/final/mnist5k/epochs-probe/
  mnist5k) EPOCHS=${EPOCHS:-20} ;;
  fashion-mnist) EPOCHS=${EPOCHS:-5} ;;  # what this machine affords (TRS: ~23 min an epoch)
  *) echo "final-comparison: no protocol for $DATASET (mnist5k, fashion-mnist)" >&2; exit 2 ;;
esac
EPS_LIST=${EPS_LIST:-0.1 0.05}
N=${N:-500}

common=(--dataset "$DATASET" --arch cnn --members 3 --epochs "$EPOCHS" --schedule cosine
        --val-fraction 0.1 --val-seed 0 --threads "$THREADS" --quiet)

train() {  # train RUN_FOLDER [flags...]: start it, or resume it (a finished run: nothing to do)
  local run=$1; shift
  if [[ -f $run/config.json ]]; then
    $ENSDIV train --out "$run" --resume --quiet  # the thread count its checkpoint saved
  else
    $ENSDIV train "${common[@]}" "$@" --out "$run"
  fi
}

card() {  # card RUN CARD_FOLDER EPS
  local run=$1 folder=$2 eps=$3
  if [[ -f $folder/card.json ]]; then return 0; fi
  if [[ -f $folder/evaluate.json ]]; then
    $ENSDIV evaluate --out "$folder" --resume --threads "$THREADS" --quiet
  else
    $ENSDIV evaluate "$run" --eps "$eps" --n "$N" --surrogate "$OUT/runs/surrogate" \
      --out "$folder" --threads "$THREADS" --quiet
  fi
}

commit() {  # commit MESSAGE PATH...: only these paths (whatever else is staged stays staged)
  local msg=$1; shift
  git add -- "$@"
  for _ in 1 2 3 4 5; do  # another git command may hold the index for a moment
    if git diff --cached --quiet -- "$@"; then return 0; fi
    if git commit -q -m "$msg" -- "$@"; then return 0; fi
    sleep 5
  done
  echo "final-comparison: could not commit $*" >&2
}

records() {  # the committed part of a run folder
  echo "$1/config.json" "$1/metrics.jsonl"
}

[[ -f $TUNE/chosen.json ]] || { echo "final-comparison: run ensdiv tune --out $TUNE first" >&2; exit 2; }

train "$OUT/runs/surrogate" --seed "$SURROGATE_SEED"
commit "results/final/$DATASET: the surrogate (plain, seed $SURROGATE_SEED)" \
  $(records "$OUT/runs/surrogate")

for seed in $SEEDS; do
  for m in $METHODS; do
    run=$OUT/runs/$m-s$seed
    init=()
    if [[ $m == dverge ]]; then init=(--init-from "$OUT/runs/none-s$seed"); fi
    echo "== $DATASET $m seed $seed ($(date -u +%H:%M))"
    train "$run" --tuned "$TUNE" --diversity "$m" --seed "$seed" "${init[@]}"
    cards=()
    for eps in $EPS_LIST; do
      card "$run" "$OUT/cards-eps$eps/$m-s$seed" "$eps"
      cards+=("$OUT/cards-eps$eps/$m-s$seed")
    done
    commit "results/final/$DATASET: $m seed $seed trained ($EPOCHS epochs) and carded at ε $EPS_LIST" \
      $(records "$run") "${cards[@]}"
  done
done
echo "== $DATASET: every ensemble trained and carded"
