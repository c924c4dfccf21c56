# Sourced by the two-sided A/B scripts (pusher.sh, sockudo.sh, compression.sh) after they set
# `here` (the loadtest directory): the binaries they run, the rounds, and compare.sh's fan-out
# scenarios, in one place.
#   BIN, LOADTEST_BIN  the roomcast and roomcast-loadtest binaries (default
#                      $CARGO_TARGET_DIR/release, else <repo>/target/release)
#   ROUNDS             rounds, alternating the two sides (default 3)
# shellcheck shell=bash disable=SC2154,SC2034
repo=$(cd "$here/.." && pwd)
target=${CARGO_TARGET_DIR:-$repo/target}
bin=${BIN:-$target/release/roomcast}
loadtest=${LOADTEST_BIN:-$target/release/roomcast-loadtest}
rounds=${ROUNDS:-3}
for b in "$bin" "$loadtest"; do
    [[ -x $b ]] || { echo "not built: $b (cargo build --release -p roomcast -p roomcast-loadtest)" >&2; exit 1; }
done

params() { # SCENARIO -> compare.sh's fanout arguments for it
    case $1 in
    fanout-1k) echo --subscribers 1000 --rooms 1 --publishers 1 --rate 100 --duration 10s ;;
    # A paced load the one-thread generator sustains even while it inflates every message.
    fanout-1k-30) echo --subscribers 1000 --rooms 1 --publishers 1 --rate 30 --duration 10s ;;
    fanout-5k-saturated)
        echo --subscribers 5000 --rooms 1 --publishers 1 --rate 0 --duration 10s --timeout 60s ;;
    *) echo "unknown scenario: $1" >&2; exit 2 ;;
    esac
}
