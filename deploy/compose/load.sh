#!/bin/sh
# Sample writes for the Compose stack: a few changes per second, forever.
set -eu
until psql -c 'SELECT 1' >/dev/null 2>&1; do sleep 1; done
i=0
while true; do
  i=$((i + 1))
  psql -q -c "INSERT INTO orders (customer_id, total, items) VALUES (1 + $i % 1000, ($i % 300) + 0.99, '[{\"sku\":\"SKU-$((i % 50))\",\"qty\":1}]')" \
          -c "UPDATE orders SET status = 'paid' WHERE id = (SELECT max(id) - 3 FROM orders)" \
          -c "UPDATE customers SET tier = 'pro' WHERE id = 1 + $i % 1000" >/dev/null
  sleep 0.5
done
