#!/usr/bin/env bash
# Debian packages the tests drive for real: PostgreSQL (the event store's second
# backend) and Chromium (the Prefect UI approval test). Installs only what is
# missing; without root or apt it says what is missing and the tests that need it
# skip with that reason.
set -uo pipefail
need=()
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "system-deps: installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null \
    || echo "system-deps: could not install ${need[*]}" >&2
else
  echo "system-deps: missing ${need[*]} (install them with apt as root)" >&2
fi
exit 0
