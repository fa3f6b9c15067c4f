#!/usr/bin/env bash
# SoftHSM2 for tests and the dev set-up: a software PKCS#11 token, from Debian's packages.
#
#   scripts/softhsm.sh install
#       Install softhsm2 (Debian package) if missing. Needs root and apt-get; runs
#       `apt-get update` once, then installs. Prints nothing when it is already there.
#
#   scripts/softhsm.sh init DIR [LABEL] [PIN] [SO_PIN]
#       Make DIR/softhsm2.conf (tokens in DIR/tokens) and, unless a token LABEL exists
#       there already, initialise one (default label cdranon). PIN and SO_PIN default to
#       $CDRANON_HSM_PIN / $CDRANON_HSM_SO_PIN; without them this fails (a PIN is config,
#       never a default baked into a script). Idempotent. Prints the export line for
#       SOFTHSM2_CONF, which every process using the token needs in its environment.
#
#   scripts/softhsm.sh module
#       Print the path of libsofthsm2.so (the PKCS#11 module for a pkcs11:// keystore URL).
set -euo pipefail

need() { command -v "$1" >/dev/null 2>&1; }

module_path() {
    local p
    for p in /usr/lib/softhsm/libsofthsm2.so /usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so \
        /usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so /usr/local/lib/softhsm/libsofthsm2.so; do
        if [[ -f "$p" ]]; then
            echo "$p"
            return 0
        fi
    done
    return 1
}

install_softhsm() {
    if need softhsm2-util && module_path >/dev/null; then
        return 0
    fi
    if [[ $(id -u) -ne 0 ]] || ! need apt-get; then
        echo "softhsm.sh: softhsm2 is missing; install Debian's softhsm2 package (needs root)" >&2
        exit 1
    fi
    echo "softhsm.sh: installing softhsm2 with apt-get" >&2
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq softhsm2 >&2
    module_path >/dev/null || { echo "softhsm.sh: libsofthsm2.so not found after install" >&2; exit 1; }
}

init_token() {
    local dir="${1:?usage: softhsm.sh init DIR [LABEL] [PIN] [SO_PIN]}"
    local label="${2:-cdranon}"
    local pin="${3:-${CDRANON_HSM_PIN:-}}"
    local so_pin="${4:-${CDRANON_HSM_SO_PIN:-}}"
    if [[ -z "$pin" || -z "$so_pin" ]]; then
        echo "softhsm.sh: give PIN and SO_PIN (arguments, or CDRANON_HSM_PIN and CDRANON_HSM_SO_PIN)" >&2
        exit 2
    fi
    install_softhsm
    mkdir -p "$dir/tokens"
    chmod 700 "$dir" "$dir/tokens"
    dir="$(cd "$dir" && pwd)"
    local conf="$dir/softhsm2.conf"
    if [[ ! -f "$conf" ]]; then
        # objectstore.backend = file: one file per object, so a destroyed KEK is a deleted
        # file (not a row left in an SQLite page).
        printf 'directories.tokendir = %s/tokens\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n' \
            "$dir" >"$conf"
    fi
    export SOFTHSM2_CONF="$conf"
    if softhsm2-util --show-slots 2>/dev/null | grep -Eq "^[[:space:]]*Label:[[:space:]]+${label}[[:space:]]*$"; then
        :
    else
        # The PINs go on the command line of a short-lived local process: acceptable for a
        # software test token; a production HSM is initialised with its vendor's tools.
        softhsm2-util --init-token --free --label "$label" --pin "$pin" --so-pin "$so_pin" >/dev/null
    fi
    echo "export SOFTHSM2_CONF=$conf"
}

case "${1:-}" in
install) install_softhsm ;;
init)
    shift
    init_token "$@"
    ;;
module) module_path || { echo "softhsm.sh: libsofthsm2.so not found; run: $0 install" >&2; exit 1; } ;;
*)
    echo "usage: $0 install | init DIR [LABEL] [PIN] [SO_PIN] | module" >&2
    exit 2
    ;;
esac
