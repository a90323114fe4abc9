#!/bin/sh
# Starts vllm-router over the compose replicas. Compose names the containers of a scaled service
# <project>-<service>-<index>, which its DNS resolves one by one, so each replica is a worker of
# its own (the router keeps a prefix tree per worker) and a restarted replica keeps its name.
# SLIME_GATEWAY_WORKERS (space-separated URLs) overrides the list; SLIME_GATEWAY_HOST, _PORT and
# _METRICS_PORT move the listeners; extra arguments go to the router. bench/routing.py and the
# deployment tests start the gateway through this script too.
set -eu
replicas="${SLIME_REPLICAS:-2}"
service="${SLIME_REPLICA_HOST_PREFIX:-slime-serve-slime-replica-}"
workers="${SLIME_GATEWAY_WORKERS:-}"
if [ -z "$workers" ]; then
  i=1
  while [ "$i" -le "$replicas" ]; do
    workers="$workers http://${service}${i}:8000"
    i=$((i + 1))
  done
fi
# shellcheck disable=SC2086  # one argument per worker URL
exec vllm-router --host "${SLIME_GATEWAY_HOST:-0.0.0.0}" --port "${SLIME_GATEWAY_PORT:-8000}" \
  --prometheus-host "${SLIME_GATEWAY_HOST:-0.0.0.0}" --prometheus-port "${SLIME_GATEWAY_METRICS_PORT:-29000}" \
  --policy "${SLIME_GATEWAY_POLICY:-cache_aware}" \
  --health-check-endpoint /ready \
  --worker-urls $workers "$@"
