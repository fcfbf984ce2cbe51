#!/bin/sh
# Creates .venv with a Python >= 3.12 and installs jaxinfer into it (editable), with the extras
# named as arguments: `./install.sh` for the package, `./install.sh test` for the test suite too.
# Finds the interpreter itself, 3.12 first (the version CI and the GPU image run): $PYTHON, python3.12,
# pyenv's 3.12, then python3.13, python3 and pyenv's newer versions (a pyenv shim for a version that
# is not selected fails to run, so each candidate is tried).
set -eu
cd "$(dirname "$0")"
ok() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1; }
py=""
pyenv_versions() { ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/$1*/bin/python3 2>/dev/null | sort -rV; }
for cand in "${PYTHON:-}" python3.12 $(pyenv_versions 3.12) python3.13 python3 $(pyenv_versions 3.1[3-9]); do
  if [ -n "$cand" ] && ok "$cand"; then py=$cand; break; fi
done
if [ -z "$py" ]; then
  echo "install.sh: no Python >= 3.12 found (tried \$PYTHON, python3.12, python3.13, python3 and pyenv's versions);" \
       "install one (e.g. apt-get install python3.12-venv) or set PYTHON=/path/to/python3.12" >&2
  exit 1
fi
[ -x .venv/bin/python ] && ok .venv/bin/python || "$py" -m venv .venv
spec="."
[ $# -gt 0 ] && spec=".[$(echo "$*" | tr ' ' ',')]"
.venv/bin/python -m pip install -q -e "$spec"
echo "install.sh: jaxinfer installed in .venv ($(.venv/bin/python --version))"
