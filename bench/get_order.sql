-- pgbench: the SELECT behind GET /api/orders/order, on orders gozon-bench seeded
-- (ids md5('seed-' || n)::uuid for n in 1 .. :orders).
\set n random(1, :orders)
SELECT id, user_id, amount_minor, status, reason, created_at, updated_at
  FROM orders.orders WHERE id = md5('seed-' || :n)::uuid;
