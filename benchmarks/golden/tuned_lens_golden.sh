#!/usr/bin/env bash
# Rebuild tests/golden/tuned_lens with tuned-lens's own releases, and check that tuned-lens loads
# depthlens's export. tuned-lens needs transformers 4.x, so it gets an environment of its own:
#
#   benchmarks/golden/tuned_lens_golden.sh [VENV_DIR]
#
# VENV_DIR defaults to ${XDG_CACHE_HOME:-~/.cache}/depthlens/tuned-lens-venv (outside the repository).
# Run it from depthlens's environment (its `python` runs the export step). Takes a few minutes.
set -euo pipefail
cd "$(dirname "$0")/../.."
venv=${1:-${XDG_CACHE_HOME:-$HOME/.cache}/depthlens/tuned-lens-venv}
out=tests/golden/tuned_lens
script=benchmarks/golden/tuned_lens_golden.py
export OMP_NUM_THREADS=1

[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install -q "tuned-lens==0.2.0" "transformers==4.57.6" "torch==2.13.0" "numpy==2.4.6"
# Older releases, for their file layouts: their modules only, on top of the same environment.
"$venv/bin/pip" install -q --no-deps --upgrade --target "$venv/tuned-lens-0.1.0" "tuned-lens==0.1.0"
"$venv/bin/pip" install -q --no-deps --upgrade --target "$venv/tuned-lens-0.0.5" "tuned-lens==0.0.5"

rm -rf "$out"
mkdir -p "$out"
"$venv/bin/python" "$script" models "$out"
"$venv/bin/python" "$script" lens "$out"
PYTHONPATH="$venv/tuned-lens-0.1.0" "$venv/bin/python" "$script" lens "$out"
PYTHONPATH="$venv/tuned-lens-0.0.5" "$venv/bin/python" "$script" lens "$out"

# depthlens -> tuned-lens: export with depthlens, load the export with tuned-lens 0.2.0 itself.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for family in gpt2 llama; do
    python benchmarks/golden/tuned_lens_export.py "$out/$family/model" "$tmp/$family"
    "$venv/bin/python" "$script" check-export "$tmp/$family/lens" "$out/$family/model" \
        "$tmp/$family/expected.safetensors" "$out/$family/export_check.json"
done
du -sh "$out"
