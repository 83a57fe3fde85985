#!/usr/bin/env bash
# Runs the libFuzzer targets of BUILD_DIR (configured with LORASERVE_FUZZ=ON; this builds
# nothing) for SECONDS each: first every committed regression input of the target once
# (tests/fuzz/regressions/TARGET/), then the fuzzer over a copy of its seed corpus
# (tests/fuzz/corpus/TARGET/) plus those regression inputs, with its dictionary
# (tests/fuzz/dicts/TARGET.dict) when there is one. Prints per target the executions,
# executions per second, crashes, and the coverage and corpus it gained; exits 1 if any
# target crashed (a sanitizer report, a FUZZ_CHECK, a timeout or running out of memory).
# A crashing input is kept under BUILD_DIR/fuzz-artifacts/TARGET/: once its bug is fixed,
# commit it under tests/fuzz/regressions/TARGET/.
#
# Usage: tests/fuzz/run.sh BUILD_DIR SECONDS [TARGET...]   (TARGET: e.g. safetensors; default all)
# Env: FUZZ_KEEP_CORPUS=DIR keeps each grown corpus in DIR/TARGET/; FUZZ_SEED=N fixes
# libFuzzer's random seed (CI: the same mutations on every run of the same code; without it
# each run draws its own and explores further).
set -uo pipefail
if [ $# -lt 2 ]; then
  sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
fi
here=$(cd "$(dirname "$0")" && pwd)
build=$(cd "$1" && pwd)
seconds=$2
shift 2
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  for source in "$here"/*_fuzz.cc; do
    name=$(basename "$source" _fuzz.cc)
    targets+=("$name")
  done
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/loraserve-fuzz-run.XXXXXX")
trap 'rm -rf "$work"' EXIT
failed=()
summary=()
for target in "${targets[@]}"; do
  binary="$build/tests/fuzz/${target}_fuzz"
  if [ ! -x "$binary" ]; then
    echo "run.sh: $binary is not built (cmake --build $build --target loraserve_fuzz)" >&2
    failed+=("$target")
    continue
  fi
  artifacts="$build/fuzz-artifacts/$target"
  mkdir -p "$artifacts" "$work/$target/corpus" "$work/$target/tmp"
  regressions="$here/regressions/$target"
  options=(-timeout=30 -rss_limit_mb=2048 -artifact_prefix="$artifacts/")
  [ -f "$here/dicts/$target.dict" ] && options+=(-dict="$here/dicts/$target.dict")
  [ -n "${FUZZ_SEED:-}" ] && options+=(-seed="$FUZZ_SEED")
  # The scratch files of targets that read directories go where they are cleaned up.
  export TMPDIR="$work/$target/tmp"

  inputs=()
  if [ -d "$regressions" ]; then
    while IFS= read -r -d '' file; do inputs+=("$file"); done \
      < <(find "$regressions" -type f ! -name 'README*' -print0 | sort -z)
  fi
  if [ ${#inputs[@]} -gt 0 ]; then
    if ! "$binary" "${options[@]}" "${inputs[@]}" > "$work/$target/regressions.log" 2>&1; then
      tail -n 40 "$work/$target/regressions.log"
      echo "== $target: a regression input crashes again (log above)"
      failed+=("$target")
      summary+=("$(printf '%-20s regression input crashes' "$target")")
      continue
    fi
  fi

  cp -r "$here/corpus/$target/." "$work/$target/corpus/"
  # Whole shared files as seeds (shared_seeds/TARGET: paths under ../shared, one a line),
  # read where they are rather than copied into the repository.
  if [ -f "$here/shared_seeds/$target" ]; then
    while read -r path; do
      cp "$here/../../../shared/$path" "$work/$target/corpus/shared-$(basename "$(dirname "$path")")-$(basename "$path")"
    done <"$here/shared_seeds/$target"
  fi
  # Inputs as long as the longest seed (at least libFuzzer's 4096): a regression input
  # may be far longer (it has run whole above) without making every mutation that long.
  max_len=$(find "$work/$target/corpus" -type f -printf '%s\n' | sort -n | tail -n 1)
  [ "${max_len:-0}" -lt 4096 ] && max_len=4096
  corpus_dirs=("$work/$target/corpus")
  [ -d "$regressions" ] && corpus_dirs+=("$regressions")
  log="$work/$target/fuzz.log"
  started=$(date +%s)
  "$binary" "${options[@]}" -max_len="$max_len" -max_total_time="$seconds" -print_final_stats=1 \
    "${corpus_dirs[@]}" > "$log" 2>&1
  rc=$?
  elapsed=$(( $(date +%s) - started ))
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n 1)
  new_units=$(sed -n 's/^stat::new_units_added: *//p' "$log" | tail -n 1)
  cov_start=$(grep -m 1 -E '^#[0-9]+\s+INITED' "$log" | sed -n 's/.* cov: \([0-9]*\).*/\1/p')
  last=$(grep -E '^#[0-9]+\s+(NEW|REDUCE|pulse|DONE|INITED)' "$log" | tail -n 1)
  cov_end=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<< "$last")
  corpus=$(sed -n 's/.* corp: \([0-9]*\/[0-9a-zA-Z]*\).*/\1/p' <<< "$last")
  crashes=0
  if [ $rc -ne 0 ]; then
    crashes=1
    tail -n 60 "$log"
    echo "== $target: crashed (exit $rc); input: $(sed -n 's/.*Test unit written to \(.*\)/\1/p' "$log" | tail -n 1)"
    failed+=("$target")
  fi
  if [ -n "${FUZZ_KEEP_CORPUS:-}" ]; then
    mkdir -p "$FUZZ_KEEP_CORPUS/$target"
    cp -r "$work/$target/corpus/." "$FUZZ_KEEP_CORPUS/$target/"
  fi
  summary+=("$(printf '%-20s %5ss of %ss %12s execs %8s exec/s  crashes %d  regressions %d  cov %s -> %s  new units %s  corpus %s' \
    "$target" "$elapsed" "$seconds" "${execs:-?}" "${rate:-?}" "$crashes" "${#inputs[@]}" \
    "${cov_start:-?}" "${cov_end:-?}" "${new_units:-?}" "${corpus:-?}")")
  echo "${summary[-1]}"
done

echo "== fuzz summary"
printf '%s\n' "${summary[@]}"
if [ ${#failed[@]} -gt 0 ]; then
  echo "== FAILED: ${failed[*]}"
  exit 1
fi
