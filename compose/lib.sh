# shellcheck shell=bash
# Sourced by compose/demo and tests/e2e/lib.sh: the one compose wrapper (which compose runs, and each
# project's name and file) and the demo client, so the demo and its end-to-end tests drive the same
# stacks the same way. Defines variables and functions only.

compose_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
DEMO_PROJECT=sluicegate-demo
REPLICAS_PROJECT=sluicegate-replicas
# Where the demos publish sluicegate's admin API and Prometheus (compose.yaml, replicas.yaml).
ADMIN=http://127.0.0.1:9901
PROMETHEUS=http://127.0.0.1:9090

# `docker compose` (v2) when it runs, else `docker-compose` (v1.27+), else none: looked up once.
COMPOSE=()
if docker compose version >/dev/null 2>&1; then
  COMPOSE=(docker compose)
elif command -v docker-compose >/dev/null 2>&1; then
  COMPOSE=(docker-compose)
fi

# Whether a compose command was found.
compose_available() { [ "${#COMPOSE[@]}" -gt 0 ]; }

# compose_project PROJECT FILE ARGS...: compose on that project and file; fails loudly without compose.
compose_project() {
  local project=$1 file=$2
  shift 2
  if ! compose_available; then
    echo "neither 'docker compose' nor 'docker-compose' is installed" >&2
    return 127
  fi
  "${COMPOSE[@]}" -p "$project" -f "$file" "$@"
}

# The main demo: sluicegate, the Flask backends and Prometheus (compose/compose.yaml).
compose() { compose_project "$DEMO_PROJECT" "$compose_dir/compose.yaml" "$@"; }

# sluicegate running its own replicas through the Docker socket (compose/replicas.yaml).
compose_replicas() { compose_project "$REPLICAS_PROJECT" "$compose_dir/replicas.yaml" "$@"; }

# compose/democlient.py on this host: traffic through the demo, checks of its admin API and Prometheus.
client() { SG_ADMIN=$ADMIN SG_PROMETHEUS=$PROMETHEUS python3 "$compose_dir/democlient.py" "$@"; }

# in_backend CONTAINER COMMAND...: a democlient.py command inside a backend container (the backends
# are not published; the backend image has Python, and democlient.py needs nothing else).
in_backend() {
  local c=$1
  shift
  docker exec -i "$c" python3 - "$@" <"$compose_dir/democlient.py"
}
