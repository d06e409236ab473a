#!/usr/bin/env bash
# Installs every Debian package gpup needs to build, test, benchmark and run its demo.
# Idempotent: does nothing when everything is already present. Needs root (or sudo) only
# when something is missing.
set -euo pipefail

PACKAGES=(
  build-essential cmake make pkg-config python3
  # toolchain extras: libFuzzer and sanitizer runtimes
  clang libclang-rt-14-dev
  # libraries
  libcli11-dev libspdlog-dev libfmt-dev nlohmann-json3-dev libtomlplusplus-dev libseccomp-dev
  # OpenCL: headers, the ICD loader, the embedded default device (PoCL CPU) and clinfo
  ocl-icd-opencl-dev ocl-icd-libopencl1 opencl-c-headers opencl-clhpp-headers pocl-opencl-icd clinfo
  # tests and benchmarks
  libgtest-dev libgmock-dev googletest libbenchmark-dev
  # differential tests: PyOpenCL workloads natively and as gpup guests
  python3-pyopencl
)

missing=()
for p in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
[ ${#missing[@]} -eq 0 ] && exit 0

echo "install-deps: installing ${missing[*]}"
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
