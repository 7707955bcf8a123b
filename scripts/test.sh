#!/usr/bin/env bash
# Install everything the test suite needs on a fresh Debian machine (root), then run it all.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive PIP_BREAK_SYSTEM_PACKAGES=1 PIP_ROOT_USER_ACTION=ignore

pkgs=$(grep -v '^\s*#' scripts/apt-packages.txt | tr '\n' ' ')
missing=""
for p in $pkgs; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

python3 -m pip install -q -e '.[all,test]'
if [ -d bindings/python ] && [ -f bindings/python/pyproject.toml ]; then
  python3 -m pip install -q -e bindings/python
fi

python3 -m pytest -q -p no:cacheprovider "$@"
if [ -f bindings/node/package.json ]; then
  (cd bindings/node && npm install --no-audit --no-fund --loglevel=error && npm test)
fi
