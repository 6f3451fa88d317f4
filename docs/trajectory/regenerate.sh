#!/usr/bin/env bash
# Regenerates the pictures in docs/trajectory from smollm2-135m.
#   docs/trajectory/regenerate.sh          logit lens only
#   docs/trajectory/regenerate.sh tuned    also logit vs tuned, with the lens `depthlens train` saved
set -euo pipefail
cd "$(dirname "$0")/../.."
text="Tomorrow, and tomorrow, and tomorrow, creeps in this petty pace from day to day"
out=docs/trajectory
depthlens show "$text" --lens logit --out "$out/smollm2-logit.png"
depthlens show "$text" --lens logit --out "$out/smollm2-logit.html" --plotlyjs cdn
depthlens show "$text" --lens logit --stat rank --out "$out/smollm2-logit-rank.png"
if [ "${1:-}" = tuned ]; then
    depthlens show "$text" --compare --out "$out/smollm2-logit-vs-tuned.png"
    depthlens show "$text" --compare --out "$out/smollm2-logit-vs-tuned.html" --plotlyjs cdn
    depthlens show "$text" --compare --stat rank --out "$out/smollm2-logit-vs-tuned-rank.png"
fi
