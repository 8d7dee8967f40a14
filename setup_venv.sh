#!/usr/bin/env bash
# Creates the virtualenv ssr_jax runs in and installs a requirements file into it:
#   ./setup_venv.sh requirements.txt         (runtime: train, evaluate, the demo)
#   ./setup_venv.sh requirements-test.txt    (runtime + pytest, ruff, the torch parity oracle)
# The venv is $VENV (default .venv). Python 3.12 is required: jax 0.10.2, the last jax for 3.11,
# miscompiles the train step on CPU (README "Environment"). The interpreter is $PYTHON if set,
# else the first Python 3.12 found on PATH, in pyenv's versions or in /usr/bin, /usr/local/bin.
set -euo pipefail
cd "$(dirname "$0")"
req="${1:-requirements.txt}"
venv="${VENV:-.venv}"
if [[ ! -f "$req" ]]; then
  echo "setup_venv.sh: no requirements file '$req' (use requirements.txt or requirements-test.txt)" >&2
  exit 2
fi

is_312() { "$1" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' >/dev/null 2>&1; }

find_python() {
  if [[ -n "${PYTHON:-}" ]]; then
    is_312 "$PYTHON" && { echo "$PYTHON"; return; }
    echo "setup_venv.sh: PYTHON=$PYTHON is not a working Python 3.12" >&2
    exit 2
  fi
  local c
  for c in python3.12 python3 "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12 \
    /usr/local/bin/python3.12 /usr/bin/python3.12; do
    if command -v "$c" >/dev/null 2>&1 && is_312 "$c"; then
      command -v "$c"
      return
    fi
  done
  echo "setup_venv.sh: Python 3.12 not found. Install it (e.g. 'pyenv install 3.12', \
'apt-get install python3.12-venv' or 'uv python install 3.12') or set PYTHON=/path/to/python3.12" >&2
  exit 2
}

if [[ ! -x "$venv/bin/python" ]] || ! is_312 "$venv/bin/python"; then
  py="$(find_python)"
  echo "setup_venv.sh: creating $venv with $py ($("$py" --version 2>&1))"
  rm -rf "$venv"
  "$py" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
fi
"$venv/bin/python" -m pip install -q -r "$req"
echo "setup_venv.sh: $venv ready ($("$venv/bin/python" --version 2>&1), $req)"
