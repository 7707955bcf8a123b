#!/usr/bin/env bash
# Two Node processes exchanging pubsub events through `wraith serve`, all on loopback.
# Needs: python3 with wraith installed (pip install -e .), and `npm install` in bindings/node.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
py="${WRAITH_PYTHON:-python3}"
tmp="$(mktemp -d)"
serve_pid=""
cleanup() { [ -n "$serve_pid" ] && kill "$serve_pid" 2>/dev/null || true; rm -rf "$tmp"; }
trap cleanup EXIT

"$py" -m wraith_core keygen "$tmp/host" >/dev/null
"$py" -m wraith_core keygen "$tmp/client" >/dev/null
cp "$tmp/client.pub" "$tmp/authorized_keys"

"$py" -m wraith_core serve --key "$tmp/host" --authorized-keys "$tmp/authorized_keys" \
  --listen 127.0.0.1:0 >"$tmp/serve.out" 2>"$tmp/serve.log" &
serve_pid=$!
for _ in $(seq 100); do grep -q listening "$tmp/serve.out" && break; sleep 0.1; done
addr="$(sed -n 's/.*listening tcp \(.*\)$/\1/p' "$tmp/serve.out")"
echo "wraith serve on $addr"

flags=(--server "$addr" --identity "$tmp/client" --host-key "$tmp/host.pub")
node "$here/subscriber.mjs" "${flags[@]}" --name alice --count 5 &
sub_pid=$!
node "$here/publisher.mjs" "${flags[@]}" --name bob --count 5
wait "$sub_pid"
