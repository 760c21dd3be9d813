#!/usr/bin/env bash
# Installs the Debian packages moe-cluster needs to build (and, with --tests, to run the whole
# test suite and CI's style checks: the Prometheus server, Python's venv for the deployment
# tools, clang and clang-format for scripts/lint.sh). Idempotent:
# packages that are already installed are skipped, and apt is not touched at all when nothing
# is missing.
set -euo pipefail

PACKAGES=(
  build-essential cmake pkg-config git
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
  libabsl-dev libgoogle-glog-dev prometheus-cpp-dev
  libgtest-dev googletest libgmock-dev libbenchmark-dev
  libsentencepiece-dev sentencepiece nlohmann-json3-dev libhwy-dev libomp-dev libicu-dev
  libboost-dev libssl-dev
)
case "${1:-}" in
  --tests) PACKAGES+=(prometheus python3 python3-venv clang clang-format) ;;
  "") ;;
  *) echo "usage: $0 [--tests]" >&2; exit 2 ;;
esac

missing=()
for p in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
if (( ${#missing[@]} == 0 )); then
  echo "install_deps: all ${#PACKAGES[@]} packages present"
  exit 0
fi
SUDO=""
if [[ $(id -u) -ne 0 ]]; then SUDO="sudo"; fi
echo "install_deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
