#!/usr/bin/env bash
# Certificates for a TLS (SASL_SSL) Kafka listener on 127.0.0.1, for tests and local trials.
#
#   tls-broker.sh certs DIR [--password-file F]
#
# Writes into DIR (created, mode 700):
#   ca.pem, ca.key               a throw-away CA (2 days)
#   server.pem, server.key       signed by it for IP:127.0.0.1 and DNS:localhost
#   server.p12                   the same as PKCS#12, for the broker's ssl.keystore.location
#   wronghost.pem/.key/.p12      signed by the same CA for DNS:wrong-host.invalid only: a
#                                listener using it must be refused by hostname verification
#   keystore.password            the PKCS#12 password (random, unless --password-file)
# SCRAM users are created when the broker's storage is formatted
# (kafka-storage format --add-scram 'SCRAM-SHA-512=[name=U,password=P]'), see
# tests/reliability/support.py (DedicatedBroker) and docs/reliability.md.
set -euo pipefail

die() { echo "tls-broker.sh: $*" >&2; exit 1; }
command -v openssl >/dev/null || die "openssl not found (apt-get install openssl)"

certs() {
    local dir="${1:-}"; shift || true
    [[ -n "$dir" ]] || die "usage: tls-broker.sh certs DIR [--password-file F]"
    local pwfile=""
    while [[ $# -gt 0 ]]; do
        case "$1" in
            --password-file) pwfile="$2"; shift 2 ;;
            *) die "certs: unknown option $1" ;;
        esac
    done
    mkdir -p "$dir"
    chmod 700 "$dir"
    umask 077
    if [[ -n "$pwfile" ]]; then cp "$pwfile" "$dir/keystore.password"
    else openssl rand -hex 16 >"$dir/keystore.password"; fi
    local pw; pw="$(cat "$dir/keystore.password")"
    openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=cdranon test CA" \
        -keyout "$dir/ca.key" -out "$dir/ca.pem" 2>/dev/null
    leaf "$dir" server "subjectAltName=IP:127.0.0.1,DNS:localhost" "$pw"
    leaf "$dir" wronghost "subjectAltName=DNS:wrong-host.invalid" "$pw"
    chmod 644 "$dir/ca.pem"
}

leaf() {
    local dir="$1" name="$2" san="$3" pw="$4"
    openssl req -newkey rsa:2048 -nodes -subj "/CN=$name" \
        -keyout "$dir/$name.key" -out "$dir/$name.csr" 2>/dev/null
    openssl x509 -req -in "$dir/$name.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" \
        -CAcreateserial -days 2 -extfile <(echo "$san") -out "$dir/$name.pem" 2>/dev/null
    openssl pkcs12 -export -in "$dir/$name.pem" -inkey "$dir/$name.key" -name "$name" \
        -passout "pass:$pw" -out "$dir/$name.p12"
    rm -f "$dir/$name.csr"
}

cmd="${1:-}"; shift || true
case "$cmd" in
    certs) certs "$@" ;;
    *) die "usage: tls-broker.sh certs DIR [--password-file F]" ;;
esac
