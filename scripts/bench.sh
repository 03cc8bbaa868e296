#!/usr/bin/env bash
# Runs the benchmarks in benchmarks/ and writes their results into docs/benchmarks.md.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
exec .venv/bin/python benchmarks/run.py "$@"
