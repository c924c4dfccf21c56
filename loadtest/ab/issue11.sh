#!/usr/bin/env bash
# A/B of two roomcast binaries in one sitting, alternating, three rounds each: the fan-out and
# churn scenarios of compare.sh. Used for the rest of issue 11 (the connection registry, the
# proxies and webhooks, none of them configured): OLD is the last commit before it (c2d54ba),
# NEW the build with them.
#
#   OLD=/path/to/old/roomcast NEW=target/release/roomcast loadtest/ab/issue11.sh
#
# Build the old binary in its own target dir, e.g.
#   git worktree add /tmp/old c2d54ba && CARGO_TARGET_DIR=/tmp/tgt-old cargo build --release \
#       --manifest-path /tmp/old/Cargo.toml -p roomcast
# Reports: loadtest/results/issue11-ab/{old,new}-rN/*.json (the same loadtest binary for both).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
exec bash "$here/alternate.sh" issue11-ab fanout-1k fanout-5k-saturated churn
