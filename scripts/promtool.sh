#!/usr/bin/env bash
# promtool and the Prometheus server, from Debian's `prometheus` package.
#
#   scripts/promtool.sh install        install the package if promtool or prometheus is
#                                      missing (needs root and apt-get; runs `apt-get update`
#                                      once, then installs); prints nothing when present
#   scripts/promtool.sh path           print the absolute paths of promtool and prometheus
#   scripts/promtool.sh ARGS...        install if missing, then run `promtool ARGS...`
#                                      (e.g. check rules deploy/prometheus/alerts.yml)
#
# The Debian package also enables a prometheus.service; in a container without systemd
# nothing starts, and on a host with systemd the install does not touch our test servers,
# which run on their own free ports with their own data directories.
set -euo pipefail

need() { command -v "$1" >/dev/null 2>&1; }

install_prometheus() {
    if need promtool && need prometheus; then
        return 0
    fi
    if [[ $(id -u) -ne 0 ]] || ! need apt-get; then
        echo "promtool.sh: promtool/prometheus missing; install Debian's prometheus package (needs root)" >&2
        exit 1
    fi
    echo "promtool.sh: installing prometheus (promtool) with apt-get" >&2
    apt-get update -qq >&2
    # policy-rc.d-free containers: the postinst tries to start the service; that may fail
    # harmlessly, and the binaries are what we need.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >&2
    need promtool && need prometheus \
        || { echo "promtool.sh: promtool or prometheus not on PATH after install" >&2; exit 1; }
}

case "${1:-}" in
    install)
        install_prometheus
        ;;
    path)
        install_prometheus
        command -v promtool
        command -v prometheus
        ;;
    "")
        echo "usage: promtool.sh install | path | PROMTOOL-ARGS..." >&2
        exit 2
        ;;
    *)
        install_prometheus
        exec promtool "$@"
        ;;
esac
