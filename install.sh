#!/bin/sh
# Creates .venv with a Python >= 3.12 and installs jaxinfer into it (editable), with the extras
# named as arguments: `./install.sh` for the package, `./install.sh test` for the test suite too.
# Finds the interpreter itself: python3.12 (the tested one) / python3.13 / python3 on PATH, then pyenv's versions
# (a pyenv shim for a version that is not selected fails to run, so each candidate is tried).
set -eu
cd "$(dirname "$0")"
ok() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1; }
py=""
for cand in "${PYTHON:-}" python3.12 python3.13 python3 \
    $(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.1[2-9]*/bin/python3 2>/dev/null | sort -rV); do
  if [ -n "$cand" ] && ok "$cand"; then py=$cand; break; fi
done
if [ -z "$py" ]; then
  echo "install.sh: no Python >= 3.12 found (tried \$PYTHON, python3.13, python3.12, python3, pyenv);" \
       "install one (e.g. apt-get install python3.12-venv) or set PYTHON=/path/to/python3.12" >&2
  exit 1
fi
[ -x .venv/bin/python ] && ok .venv/bin/python || "$py" -m venv .venv
spec="."
[ $# -gt 0 ] && spec=".[$(echo "$*" | tr ' ' ',')]"
.venv/bin/python -m pip install -q -e "$spec"
echo "install.sh: jaxinfer installed in .venv ($(.venv/bin/python --version))"
