#!/usr/bin/env bash
# Creates .venv (once) and installs flaxzoo into it, editable, with its pinned-range dependencies.
# `bash scripts/setup.sh test` also installs the test extras, PyTorch (the `bench` extra, for the
# side-by-side benchmark and its tests) and the `export` extra; `bash scripts/setup.sh export` only
# the export extra. Safe to run again.
#
# The installer is uv (itself installed into .venv by pip): the same packages as pip's resolver
# picks, in a third of the time on 2 cores (docs/development.md). pip's own settings (find-links, index
# URLs, constraints, from its config files or PIP_* variables) are passed on; pip installs when uv
# cannot.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
extras=""
[ "${1:-}" = "test" ] && extras="[test,bench,export]"
[ "${1:-}" = "export" ] && extras="[export]"
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)

pip_config=""  # `pip config list`, read once: every file pip reads and its PIP_* variables
pip_setting() {  # pip's value for option $1 (a later source, such as a PIP_* variable, wins)
  sed -n "s/^[^.]*\.$1='\(.*\)'$/\1/p" <<< "$pip_config" | tail -n 1
}

uv_install() {
  "${pip[@]}" "uv>=0.9,<1" 2>/dev/null || return 1
  pip_config=$(.venv/bin/python -m pip config list 2>/dev/null)
  # unsafe-best-match: the highest version over every index, as pip chooses (uv's default is the
  # first index that has the package); bytecode now, as pip compiles it, so imports stay quick.
  local uv=(.venv/bin/uv pip install --quiet --python .venv/bin/python --native-tls
            --index-strategy unsafe-best-match --compile-bytecode)
  local value
  value=$(pip_setting index-url); [ -n "$value" ] && uv+=(--index-url "$value")
  for value in $(pip_setting extra-index-url); do uv+=(--extra-index-url "$value"); done
  for value in $(pip_setting find-links); do uv+=(--find-links "$value"); done
  for value in $(pip_setting constraint); do uv+=(--constraint "$value"); done
  "${uv[@]}" --editable ".${extras}" || return 1
  # jax2onnx's own orbax-checkpoint pin conflicts with flaxzoo's; its conversion does not use orbax.
  if [[ "$extras" == *export* ]]; then "${uv[@]}" --no-deps "jax2onnx==0.17.1" || return 1; fi
}

if ! uv_install; then
  echo "setup.sh: uv could not install; installing with pip" >&2
  "${pip[@]}" --editable ".${extras}"
  if [[ "$extras" == *export* ]]; then "${pip[@]}" --no-deps "jax2onnx==0.17.1"; fi
fi
