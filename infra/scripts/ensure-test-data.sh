#!/usr/bin/env bash
# Make sure the real Fashion-MNIST files the tests use are installed, from Debian's package
# dataset-fashion-mnist (into /usr/share/datasets/fashion-mnist; Debian recompressed the official gzip
# files, so they exercise the content pins). Idempotent and quiet: does nothing when they are there.
set -euo pipefail

dir=/usr/share/datasets/fashion-mnist
have_data() { [ -f "$dir/t10k-labels-idx1-ubyte.gz" ] || [ -f "$dir/t10k-labels-idx1-ubyte" ]; }

have_data && exit 0

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "ensure-test-data: need root or sudo to install dataset-fashion-mnist" >&2; exit 1; }
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
echo "ensure-test-data: installing dataset-fashion-mnist from Debian packages" >&2
$SUDO apt-get update -qq >/dev/null
$SUDO apt-get install -y -qq --no-install-recommends dataset-fashion-mnist >/dev/null
have_data || { echo "ensure-test-data: dataset-fashion-mnist installed but $dir has no files" >&2; exit 1; }
