#!/bin/sh
# Subscribes the sample receiver to new orders (once the notifier's API answers).
set -eu
api="http://notifier:8089/v1/subscriptions"
until curl -sf -H "Authorization: Bearer $WALRELAY_API_TOKEN" "$api" >/dev/null; do sleep 2; done
if ! curl -sf -H "Authorization: Bearer $WALRELAY_API_TOKEN" "$api" | grep -q receiver; then
  curl -sf -H "Authorization: Bearer $WALRELAY_API_TOKEN" -H 'content-type: application/json' \
    -d '{"url":"http://receiver:8080/walrelay","schema":"public","table":"orders","ops":["c","u"]}' "$api"
fi
