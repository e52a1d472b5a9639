#!/usr/bin/env bash
# Installs everything into .venv (same install as the quickstart), then lints and runs the whole test suite offline.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k config`.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
.venv/bin/ruff check .
.venv/bin/ruff format --check .
# One pytest-xdist worker per core (at most 4: each CLI test starts one to three processes of its own), so CI's two
# cores both work. With loadgroup, tests/conftest.py's scheduler keeps the tests that share a module-scoped CLI run on
# one worker; the rest go to whichever worker is free. `bash scripts/test.sh -n 0` runs everything in this process.
workers="$(nproc)"
if [ "$workers" -gt 4 ]; then workers=4; fi
# pytest exits 5 when it collects no test: with `set -e` that fails the run, as it should.
.venv/bin/python -m pytest -n "$workers" --dist loadgroup "$@"
