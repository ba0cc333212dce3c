#!/usr/bin/env bash
# Installs the system programs the test suite drives for real, when missing: Debian's prometheus package (a
# real Prometheus server on loopback, and promtool) and chromium (a real headless browser for the viewer test).
# Exits non-zero, naming what is missing, when it cannot install them: `make test` runs the tests that need
# them as required (NEURONSWEEP_REQUIRE_SYSTEM_TOOLS=1), so going on without them would only fail later.
set -euo pipefail

# program -> the Debian package that provides it
declare -A PACKAGE=([prometheus]=prometheus [promtool]=prometheus [chromium]=chromium)

missing_programs() {
  local program
  for program in prometheus promtool chromium; do
    command -v "$program" >/dev/null 2>&1 || echo "$program"
  done
}

mapfile -t missing < <(missing_programs)
[ ${#missing[@]} -eq 0 ] && exit 0

packages=$(for p in "${missing[@]}"; do echo "${PACKAGE[$p]}"; done | sort -u | tr '\n' ' ')
packages=${packages% }
fail() {
  echo "system-deps: cannot install ${missing[*]} ($1); install the Debian packages yourself: apt-get install $packages" >&2
  exit 1
}

if [ "$(id -u)" = 0 ]; then
  SUDO=()
elif command -v sudo >/dev/null 2>&1; then
  SUDO=(sudo)
else
  fail "not root and no sudo"
fi
command -v apt-get >/dev/null 2>&1 || fail "no apt-get on this system"

echo "system-deps: installing $packages (for ${missing[*]})" >&2
# shellcheck disable=SC2086  # $packages is a list of words
"${SUDO[@]}" apt-get update -qq || fail "apt-get update failed"
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $packages >/dev/null \
  || fail "apt-get install failed"

mapfile -t still < <(missing_programs)
if [ ${#still[@]} -ne 0 ]; then
  missing=("${still[@]}")
  fail "the packages installed but ${still[*]} is still not on PATH"
fi
