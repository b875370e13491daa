#!/usr/bin/env bash
# Builds the three binaries and runs the whole system locally: the control plane on SQLite,
# a demo service, a sidecar in front of it and an example policy. Ctrl-C stops everything.
# Flags are passed to `corsairctl quickstart` (see `--help`).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --bins -p corsair-control-plane -p corsair-sidecar -p corsair-cli
exec "${CARGO_TARGET_DIR:-target}/debug/corsairctl" quickstart "$@"
