#!/usr/bin/env bash
# Installs everything into .venv and fine-tunes the embedded default model, SmolLM2-135M-Instruct, on the demo
# dataset (data/demo: answers in the voice of a pirate). Shows the eval loss (with the dtype the run computed in), the
# demo benchmark (data/demo/benchmark: lm-evaluation-harness, pirate or plain answers to 40 held-out questions) and
# the answers to the held-out prompts (data/demo/heldout_prompts.txt, asked in no training question's form) before
# and after training. About 5 minutes on a 2-core CPU; rerunning reuses the install and the converted model.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
# What accelerate would pick on a CPU anyway; set here so that it does not print a note about choosing it.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
PY=.venv/bin/python
RUN_DIR=runs/quickstart
ANSWERS="$(mktemp -d)"
trap 'rm -rf "$ANSWERS"' EXIT
# generate.py --batch answers a JSONL file of {"prompt"} rows with one model load
$PY -c 'import json, sys; [print(json.dumps({"prompt": line.strip()})) for line in open(sys.argv[1]) if line.strip()]' \
    data/demo/heldout_prompts.txt >"$ANSWERS/prompts.jsonl"

MODEL_DIR="$($PY scripts/prepare_smollm2.py | tail -n 1)"
echo "== Before training, the model answers the held-out prompts:"
$PY scripts/generate.py "$MODEL_DIR" --batch "$ANSWERS/prompts.jsonl" --out "$ANSWERS/before.jsonl" 2>/dev/null
$PY -c 'import json, sys; [print("   " + r["prompt"], "->", r["completion"]) for r in map(json.loads, open(sys.argv[1]))]' \
    "$ANSWERS/before.jsonl"

# train.supervise: Ctrl-C ends with one message, a checkpoint and exit code 75 (bare accelerate launch cannot exit 75).
# The benchmark runs before training and on the final model (every 30 steps: the run has 30), each prompt in the chat
# template as the model is used.
$PY -m train.supervise .venv/bin/accelerate launch --config_file accelerate_config/cpu_single_process.yaml launch.py \
    loss=sft model=smollm2 exp_name=quickstart overwrite_run=true \
    datasets=[data/demo/train.jsonl] eval_datasets=[data/demo/eval.jsonl] \
    "++model.name_or_path=$MODEL_DIR" n_epochs=2 lr=2e-5 eval_every_steps=15 \
    benchmarks.tasks=[pirate_style] benchmarks.include_path=data/demo/benchmark benchmarks.apply_chat_template=true \
    benchmarks.every_steps=30

$PY scripts/generate.py "$RUN_DIR/FINAL" --batch "$ANSWERS/prompts.jsonl" --out "$ANSWERS/after.jsonl" 2>/dev/null
$PY - "$RUN_DIR" "$ANSWERS" <<'PY'
import json, sys
from pathlib import Path

import yaml

run, answers = Path(sys.argv[1]), Path(sys.argv[2])
dtype = yaml.safe_load((run / "config.yaml").read_text())["model"]["dtype"]  # model.dtype=auto, as the run resolved it
rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
evals = [row["loss/eval"] for row in rows if "loss/eval" in row]
print(f"== Eval loss on held-out data ({dtype}): before {evals[0]:.3f}, after {evals[-1]:.3f}")
bench = [row["bench/pirate_style/acc"] for row in rows if "bench/pirate_style/acc" in row]
questions = len(open("data/demo/benchmark/pirate_style.jsonl").readlines())
print(f"== Benchmark pirate_style (lm-eval, {questions} held-out questions: the pirate's answer or a plain one): "
      f"acc before {bench[0]:.3f}, after {bench[-1]:.3f}")
after = [json.loads(line) for line in open(answers / "after.jsonl")]
for before, later in zip(map(json.loads, open(answers / "before.jsonl")), after):
    print(f"== \"{before['prompt']}\"\n   before: {before['completion']}\n   after:  {later['completion']}")
PY
echo "== The fine-tuned model is in $RUN_DIR/FINAL; chat with it: $PY scripts/generate.py $RUN_DIR/FINAL"
