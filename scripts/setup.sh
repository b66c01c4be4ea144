#!/usr/bin/env bash
# Creates .venv (once) and installs flaxzoo into it, editable, with its pinned-range dependencies.
# `bash scripts/setup.sh test` also installs the test extras, PyTorch (the `bench` extra, for the
# side-by-side benchmark and its tests) and the `export` extra; `bash scripts/setup.sh export` only
# the export extra. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
extras=""
[ "${1:-}" = "test" ] && extras="[test,bench,export]"
[ "${1:-}" = "export" ] && extras="[export]"
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" --editable ".${extras}"
# jax2onnx's own orbax-checkpoint pin conflicts with flaxzoo's; its conversion does not use orbax.
[[ "$extras" == *export* ]] && "${pip[@]}" --no-deps "jax2onnx==0.17.1"
true
