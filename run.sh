#!/usr/bin/env bash
# ctvq entry point. `./run.sh help` lists the subcommands.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${CTVQ_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"
BENCHES="train_step inference dataloader preprocess profile_step sparse_ops quality code_usage codebook_fit"  # bench/NAME.py

usage() {
  cat <<USAGE
Usage: ./run.sh <command> [args...]

  setup                     create .venv and install everything (idempotent)
  test [pytest args]        run the test suite
  demo [--raw DIR]          phantom (or DIR) -> preprocess -> stage 0/1/2 -> evaluate
  preprocess RAW_DIR OUT_DIR [ORGAN_MAPPING_JSON] [NUM_WORKERS] [options]
                            raw CT collections -> processed 512^3 datasets
  check-data DATA_DIR [--window lung]
                            what the training dataset finds, skips and loads
  train --config CFG --output_dir DIR --data_dir DATA [--num_gpus N ...] [--load_dir D --ckpt latest]
  evaluate --ckpt CKPT|--bundle DIR --data_dir DATA --out REPORT_DIR
  encode SCAN OUT.npz --bundle DIR
  decode IN.npz OUT.nii.gz --bundle DIR [--original-grid] [--depth D]
  export --run RUN_DIR [--ckpt CKPT] --out dist/ct_vqvae
  bench <${BENCHES// /|}> [args]
                            benchmarks (bench/README.md; bench/real_scans.sh runs the model on real scans)

Every command takes --help.
USAGE
}

setup() {
  if [ ! -x "$PY" ]; then
    python3 -m venv "$VENV"
  fi
  local stamp="$VENV/.ctvq-installed"
  local want
  want="$(cat "$ROOT/requirements.txt" "$ROOT/pyproject.toml" | sha1sum | cut -d' ' -f1)"
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "setup: installing requirements.txt and ctvq into $VENV (1-2 min the first time)" >&2
    "$PY" -m pip install -q --upgrade pip
    "$PY" -m pip install -q -r "$ROOT/requirements.txt"
    "$PY" -m pip install -q --no-deps -e "$ROOT"
    echo "$want" > "$stamp"
  fi
}

ensure() { [ -x "$PY" ] && [ -f "$VENV/.ctvq-installed" ] || setup; }

cmd="${1:-help}"; shift || true
# paths on the command line are the user's, relative to where they run it; the code is this checkout's
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# and never a same-named module of the folder it runs in (a user's own pipeline/ or networks.py)
export PYTHONSAFEPATH=1
case "$cmd" in
  setup)
    case "${1:-}" in -h|--help) echo "./run.sh setup: create $VENV (CTVQ_VENV overrides it) and install requirements.txt and ctvq into it; again only when requirements.txt or pyproject.toml changed"; exit 0 ;; esac
    setup ;;
  test)
    case "${1:-}" in -h|--help) echo "./run.sh test [pytest args]: the test suite (pytest -q). Tests on real scans read ../shared/data/ct beside the checkout or CTVQ_CT_DATA, and skip with the reason when it is absent; GPU tests skip without CUDA. pytest's own options follow."; echo ;; esac
    ensure; cd "$ROOT"; exec "$PY" -m pytest -q "$@" ;;
  demo) ensure; exec "$PY" -m pipeline.demo "$@" ;;
  preprocess) ensure; exec "$PY" -m pipeline.preprocess "$@" ;;
  check-data) ensure; exec "$PY" -m pipeline.check_data "$@" ;;
  train) ensure; exec "$PY" -m pipeline.train "$@" ;;
  evaluate) ensure; exec "$PY" -m pipeline.evaluate "$@" ;;
  encode) ensure; exec "$PY" -m pipeline.infer encode "$@" ;;
  decode) ensure; exec "$PY" -m pipeline.infer decode "$@" ;;
  export) ensure; exec "$PY" -m pipeline.export "$@" ;;
  bench)
    sub="${1:-}"
    case " $BENCHES " in
      *" $sub "*) ;;
      *) if [ "$sub" != -h ] && [ "$sub" != --help ]; then echo "run.sh bench: no benchmark '${sub}'; use one of: $BENCHES" >&2; fi
         echo "Usage: ./run.sh bench <${BENCHES// /|}> [args]   (./run.sh bench NAME --help explains one; bench/README.md has the results)"
         if [ "$sub" = -h ] || [ "$sub" = --help ]; then exit 0; fi; exit 2 ;;
    esac
    shift; ensure; exec "$PY" "$ROOT/bench/$sub.py" "$@" ;;
  help|-h|--help) usage ;;
  *) echo "run.sh: unknown command '$cmd'" >&2; usage >&2; exit 2 ;;
esac
