#!/usr/bin/env bash
# A/B of two roomcast binaries in one sitting, alternating, three rounds each: the fan-out,
# churn and idle-memory scenarios of compare.sh. Used for the hardening round (issue 10):
# OLD is the last commit before it (29b96c4), NEW the current build.
#
#   OLD=/path/to/old/roomcast NEW=target/release/roomcast loadtest/ab/issue10.sh
#
# Build the old binary in its own target dir, e.g.
#   git worktree add /tmp/old 29b96c4 && CARGO_TARGET_DIR=/tmp/tgt-old cargo build --release \
#       --manifest-path /tmp/old/Cargo.toml -p roomcast
# Reports: loadtest/results/issue10-ab/{old,new}-rN/*.json (the same loadtest binary for both).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
exec bash "$here/alternate.sh" issue10-ab fanout-1k fanout-5k-saturated churn idle-19k
