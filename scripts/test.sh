#!/usr/bin/env bash
# The whole test suite: formatting, lints, then every test of every crate.
#
# Tests that need PostgreSQL or a browser skip with a loud message when those are missing,
# except under CI=true, where they fail instead.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "==> cargo test"
cargo test --workspace --locked
