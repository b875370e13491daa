#!/usr/bin/env bash
# The whole test suite: formatting, lints, then every test of every crate.
#
# Tests that need PostgreSQL or a browser skip when those are missing, except under CI=true,
# where they fail instead. Each skip adds a line to $CORSAIR_SKIP_LOG, and the skips are
# listed at the end: cargo shows nothing of a test that passed.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "==> cargo test"
CORSAIR_SKIP_LOG=$(mktemp)
export CORSAIR_SKIP_LOG
trap 'rm -f "$CORSAIR_SKIP_LOG"' EXIT
status=0
cargo test --workspace --locked || status=$?

skipped=$(($(wc -l <"$CORSAIR_SKIP_LOG")))
if [ "$skipped" -gt 0 ]; then
  echo
  echo "==> skipped"
  sort "$CORSAIR_SKIP_LOG" | sed 's/^/  /'
  echo "skipped: $skipped scenarios (see above)"
else
  echo "skipped: 0 scenarios"
fi
exit "$status"
