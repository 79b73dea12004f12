#!/usr/bin/env bash
# Runs every fuzz target (or those named) for SECONDS each, one after the other, at the lowest
# CPU priority, and prints a markdown row per target: seconds, execs, execs/s, edges covered,
# corpus size, findings.
#
#   wire/fuzz/run-all.sh 600                 # every target, 10 minutes each
#   wire/fuzz/run-all.sh 60 frame message    # two targets, one minute each
#
# New inputs go to target/work-corpus/<target> (ignored by git); the committed seeds in
# corpus/<target> are read, never written. Crashes land in artifacts/<target>/.
# Needs cargo-fuzz (`cargo install cargo-fuzz`); only stable Rust is installed, so
# RUSTC_BOOTSTRAP=1 lets it use the nightly flags libFuzzer's instrumentation needs.
set -euo pipefail
cd "$(dirname "$0")"
seconds="${1:?usage: run-all.sh SECONDS [TARGET...]}"
shift
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(RUSTC_BOOTSTRAP=1 cargo fuzz list)
fi
export RUSTC_BOOTSTRAP=1
nice -n 19 cargo fuzz build
mkdir -p target/logs
echo "| target | seconds | execs | execs/s | edges covered | corpus (seeds + kept) | findings |"
echo "| --- | --- | --- | --- | --- | --- | --- |"
for t in "${targets[@]}"; do
    work="target/work-corpus/$t"
    mkdir -p "$work" "artifacts/$t"
    log="target/logs/$t.log"
    status=0
    nice -n 19 cargo fuzz run "$t" "$work" "corpus/$t" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1 || status=$?
    execs_per_sec=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo "?")
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo "?")
    cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | grep -o '[0-9]*$' || echo "?")
    kept=$(find "$work" -type f | wc -l)
    seeds=$(find "corpus/$t" -type f | wc -l)
    crashes=$(find "artifacts/$t" -type f | wc -l)
    if [ "$status" -eq 0 ]; then finding="none"; else finding="exit $status, $crashes file(s) in artifacts/$t (see $log)"; fi
    echo "| $t | $seconds | $execs | $execs_per_sec | $cov | $seeds + $kept | $finding |"
done
