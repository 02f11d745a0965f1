#!/usr/bin/env bash
# Installs what building, testing and the demo need on Debian 12. Idempotent: a no-op (no network,
# no apt-get call) when everything is already there. Runs as root, or through sudo when available.
set -euo pipefail

APT_PACKAGES=(
  build-essential cmake ninja-build ccache pkg-config
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
  libabsl-dev libspdlog-dev libfmt-dev libgtest-dev libgmock-dev
  libcurl4-openssl-dev nlohmann-json3-dev prometheus-cpp-dev
  golang-github-gogo-googleapis-dev
  clang libclang-rt-14-dev python3 python3-grpcio python3-protobuf libbenchmark-dev
  libhiredis-dev redis-server python3-redis openssl
)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

# Node.js and npm: this image ships them (nodesource); Debian's own packages only when absent, since
# Debian's npm conflicts with the nodesource nodejs.
if ! command -v npm >/dev/null 2>&1; then missing+=(nodejs npm); fi

# kubectl renders the Kubernetes manifests (kubectl kustomize) in `make test`; Debian's
# kubernetes-client provides it when the machine has none.
if ! command -v kubectl >/dev/null 2>&1; then missing+=(kubernetes-client); fi

SUDO=""
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi

if [ ${#missing[@]} -gt 0 ]; then
  echo "deps: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# buf (grpcurl equivalent and proto linter) from npm, kept inside the repo's tools/ folder so it
# never needs a global install.
here="$(cd "$(dirname "$0")/.." && pwd)"
if [ ! -x "$here/tools/node_modules/.bin/buf" ]; then
  echo "deps: installing @bufbuild/buf from npm"
  (cd "$here/tools" && npm install --no-audit --no-fund --silent >/dev/null)
fi
# The Node.js example client's gRPC libraries.
if [ ! -d "$here/client/node/node_modules/@grpc/grpc-js" ]; then
  echo "deps: installing the Node.js client's packages from npm"
  (cd "$here/client/node" && npm install --no-audit --no-fund --silent >/dev/null)
fi
