#!/usr/bin/env bash
# Installs everything napari-maeprobe needs on a fresh Debian machine (root, Python 3.11, no GPU):
# the system libraries for a headless Qt/OpenGL window (Xvfb + Mesa) and a virtual environment
# in .venv with the package (editable) and its test tools. Re-running it is cheap: each step is
# skipped when already done.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

sys_pkgs=(xvfb xauth libgl1 libegl1 libglx-mesa0 libxcb-icccm4 libxcb-keysyms1 libxcb-xinerama0
  libxcb-image0 libxcb-render-util0 libxcb-xkb1 libxkbcommon-x11-0 libxcb-randr0 libxcb-shape0
  libxcb-cursor0 libdbus-1-3 libfontconfig1)
missing=()
for p in "${sys_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "[setup] installing system packages: ${missing[*]}"
  sudo_cmd=""; [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

py="${PYTHON:-python3.11}"
command -v "$py" >/dev/null || py=python3
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($py --version)"
  "$py" -m venv .venv
fi
stamp=".venv/.maeprobe-installed"
want="$(cat pyproject.toml scripts/setup.sh scripts/constraints.txt | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing Python packages into .venv (first time: a few minutes)"
  quiet() { grep -v "is ignored: it is neither a file nor a directory" || true; }
  .venv/bin/python -m pip install -q --upgrade pip 2>&1 | quiet
  # The CPU build of torch first: a bare "torch" requirement would pull several GB of CUDA
  # packages; scripts/constraints.txt then keeps every later install on this build.
  .venv/bin/python -m pip install -q "torch==2.13.0" 2>&1 | quiet
  .venv/bin/python -m pip install -q -c scripts/constraints.txt -e ".[dev]" 2>&1 | quiet
  .venv/bin/python -c "import napari_maeprobe, torch, cellpose, napari" || { echo "[setup] install failed"; exit 1; }
  echo "$want" > "$stamp"
fi
