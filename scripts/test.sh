#!/usr/bin/env bash
# The test command: installs what is missing (scripts/setup.sh), lints, then runs the whole test
# suite, GUI tests included, in a virtual X server (Xvfb with Mesa's software OpenGL).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
.venv/bin/ruff check src tests benchmarks
export MPLBACKEND=Agg
exec xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python -m pytest -p no:cacheprovider "$@"
