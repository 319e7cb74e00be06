#!/usr/bin/env bash
# Set up .venv and run the whole test suite (about 13 minutes on 2 CPU cores, plus the setup).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m ruff check src tests benchmarks
.venv/bin/python -m pytest -q tests "$@"
