# Sourced by the end-to-end scripts: where things are, and the two ways a script ends early.
# shellcheck shell=bash
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
demo="$root/compose/demo"
started=$SECONDS

fail() { printf '\n\033[31mE2E FAILED: %s\033[0m\n' "$*" >&2; exit 1; }

# Exits 0, saying loudly that WHAT did not run, when no Docker engine answers.
need_docker_or_skip() {
  if ! docker info >/dev/null 2>&1; then
    printf '\n*** SKIPPED: no Docker engine answers; %s did NOT run ***\n\n' "$1"
    exit 0
  fi
}
