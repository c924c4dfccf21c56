#!/usr/bin/env bash
# A/B of two roomcast binaries in one sitting: compare.sh's SCENARIO... for OLD, then for NEW,
# ROUNDS times (default 3), so that the machine's drift hits both sides alike. The same
# loadtest binary drives both. Reports: loadtest/results/NAME/{old,new}-rN/*.json.
#
#   OLD=/path/to/old/roomcast NEW=target/release/roomcast loadtest/ab/alternate.sh NAME SCENARIO...
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
: "${OLD:?the old roomcast binary}" "${NEW:=$here/../target/release/roomcast}"
name=${1:?a name for the results directory}
shift
for round in $(seq "${ROUNDS:-3}"); do
    for side in old new; do
        bin=$OLD; [[ $side == new ]] && bin=$NEW
        ROOMCAST_BIN=$bin PEERS=roomcast CHURN_DURATION=${CHURN_DURATION:-10s} \
            RESULTS_DIR=$here/results/$name/$side-r$round \
            bash "$here/compare.sh" "$@"
    done
done
