#!/usr/bin/env bash
# The main job: installs what is missing (scripts/setup.sh), then runs `maeprobe demo` on the
# bundled sample data. Extra arguments go to maeprobe demo (e.g. --out DIR, --gui).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
exec .venv/bin/maeprobe demo "$@"
