#!/usr/bin/env bash
# Idempotent set-up for a fresh machine: the virtualenv with pinned packages, and the
# Kafka jars. Every `make` target that needs them runs this first; a second run is quick.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CDRANON_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"

need() { command -v "$1" >/dev/null 2>&1; }

# Debian packages the project needs, installed when missing and we are root.
missing=()
need java || missing+=(openjdk-17-jre-headless)
need mvn || missing+=(maven)
"$PY" -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
# The native transform path (service/_native.c) is built at install: a C compiler, the
# Python headers and libcrypto's headers.
need cc || missing+=(gcc)
[[ -f /usr/include/openssl/evp.h ]] || missing+=(libssl-dev)
"$PY" -c 'import os, sys, sysconfig
sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
    2>/dev/null || missing+=(python3-dev)
if ((${#missing[@]})); then
    if [[ $(id -u) -eq 0 ]] && need apt-get; then
        echo "bootstrap: installing ${missing[*]} with apt-get" >&2
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2
    else
        echo "bootstrap: missing ${missing[*]}; install them (Python 3.11+, Java 17+, Maven)" >&2
        exit 1
    fi
fi

# SoftHSM2, the PKCS#11 token the pkcs11 keystore is tested on (apt-get when missing).
"$ROOT/scripts/softhsm.sh" install

"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || { echo "bootstrap: Python 3.11+ is required (found $("$PY" --version))" >&2; exit 1; }

stamp="$VENV/.cdranon-installed"
want="$(cat "$ROOT/pyproject.toml" "$ROOT/constraints.txt" | sha256sum | cut -d' ' -f1)"
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
    [[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
    echo "bootstrap: installing Python packages into $VENV" >&2
    "$VENV/bin/python" -m pip install -q --upgrade pip >&2
    "$VENV/bin/python" -m pip install -q -c "$ROOT/constraints.txt" -e "$ROOT[dev,faust]" >&2
    echo "$want" >"$stamp"
fi

# Rebuild the extension when its source changed (pip builds it in place for -e).
nstamp="$VENV/.cdranon-native"
nwant="$(cat "$ROOT/setup.py" "$ROOT/service/_native.c" | sha256sum | cut -d' ' -f1)"
if [[ ! -f "$nstamp" || "$(cat "$nstamp")" != "$nwant" ]] || ! ls "$ROOT"/service/_native.*.so >/dev/null 2>&1; then
    echo "bootstrap: building the native transform path (service/_native.c)" >&2
    "$VENV/bin/python" -m pip install -q --no-deps -c "$ROOT/constraints.txt" -e "$ROOT" >&2
    "$VENV/bin/python" -c 'import service._native' \
        || { echo "bootstrap: service/_native.c did not build (see above)" >&2; exit 1; }
    echo "$nwant" >"$nstamp"
fi

"$ROOT/deploy/kafka/kafka.sh" fetch
