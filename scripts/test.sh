#!/bin/sh
# Runs berth's whole test suite: unit tests everywhere, e2e tests (real
# systemd-nspawn containers inside network namespaces the tests create) where
# the machine allows. e2e tests print why they skip; with BERTH_E2E_REQUIRED=1
# (set by .ci/run) a missing capability fails instead.
#
#   sudo scripts/test.sh            # as root, to include the e2e tests
#   scripts/test.sh -- --nocapture  # extra args go to the test harness
set -eu
cd "$(dirname "$0")/.."

echo "==> cargo build (workspace, all targets)"
cargo build --workspace --all-targets --quiet

echo "==> fixture: busybox rootfs"
fixtures=${BERTH_FIXTURE_DIR:-target/berth-fixtures}
mkdir -p "$fixtures"
if [ -x /bin/busybox ]; then
    sh scripts/mk-busybox-rootfs.sh "$fixtures/rootfs-busybox" >/dev/null
fi

echo "==> cargo test"
if [ "${1:-}" = "--" ]; then shift; fi
cargo test --workspace --no-fail-fast --quiet -- "$@"
