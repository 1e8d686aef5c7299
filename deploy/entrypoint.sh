#!/usr/bin/env bash
# Container entrypoint: `sqft serve` on all interfaces (SQFT_HOST, default 0.0.0.0), which needs
# SQFT_API_KEY. Without a key it stops at once with what to pass, instead of serving an open API on
# the container's network; the key check of `sqft serve` itself stays on as well.
#
#   (no arguments) | serve [flags]         sqft serve [flags]
#   --some-flag ...                        sqft serve --some-flag ...
#   train | sparsify | merge | extract ... sqft <command> ... (the CLI, no key needed)
#   anything else (e.g. bash)              run as given
set -euo pipefail

SQFT_BIN=${SQFT_BIN:-sqft}
export SQFT_HOST=${SQFT_HOST:-0.0.0.0}

if [ "$#" -eq 0 ] || [ "${1#-}" != "$1" ]; then
    set -- serve "$@"
fi

case "$1" in
    serve | train | sparsify | merge | extract) ;;
    *) exec "$@" ;;
esac

key=${SQFT_API_KEY:-}
if [ "$1" = serve ] && [ -z "${key//[[:space:]]/}" ]; then
    host=$SQFT_HOST
    # A --host flag wins over SQFT_HOST, as in `sqft serve`.
    prev=
    for arg in "$@"; do
        case "$arg" in
            --host=*) host=${arg#--host=} ;;
            *) [ "$prev" = --host ] && host=$arg ;;
        esac
        prev=$arg
    done
    case "$host" in
        127.* | ::1 | "[::1]" | localhost) ;;
        *)
            cat >&2 <<EOF
error: SQFT_API_KEY is not set, and sqft-service would listen on $host without authentication.
Pass a key to the container, e.g.
  docker run -e SQFT_API_KEY=\$(python3 -c 'import secrets; print(secrets.token_urlsafe(32))') ...
  docker run --env-file sqft.env ...        (a file with the line SQFT_API_KEY=<key>)
Clients then send "Authorization: Bearer <key>". See README.md, Deploy.
EOF
            exit 2
            ;;
    esac
fi

exec "$SQFT_BIN" "$@"
