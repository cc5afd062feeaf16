#!/usr/bin/env bash
# A short run of every fuzz target: each must build and survive its seeds
# and a few thousand generated inputs. (Long runs: see the README.)
set -euo pipefail
cd "$(dirname "$0")/.."
export RUSTC_BOOTSTRAP=1 # cargo-fuzz's instrumentation flags are nightly-only
runs=${FUZZ_RUNS:-20000}
targets=$(cargo fuzz list)
cargo fuzz build --sanitizer none
for target in $targets; do
  corpus=fuzz/corpus/$target
  mkdir -p "$corpus"
  seeds=()
  [ -d "fuzz/seeds/$target" ] && seeds+=("fuzz/seeds/$target")
  [ "$target" = manifest ] && seeds+=(examples/local examples/cluster)
  echo "fuzz: $target ($runs inputs)"
  log=$(mktemp)
  if ! cargo fuzz run --sanitizer none "$target" "$corpus" "${seeds[@]}" -- \
    -runs="$runs" -max_total_time=60 >"$log" 2>&1; then
    tail -40 "$log" >&2
    echo "fuzz: $target failed; the input that did it is in fuzz/artifacts/$target" >&2
    exit 1
  fi
  grep -E '^Done' "$log"
  rm -f "$log"
done
