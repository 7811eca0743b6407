-- pgbench: the commits one Gozon order makes, in Gozon's own schemas, as the saga makes them:
-- create_order (order + outbox + notify), the orders relay marking it sent, Payments' debit
-- (inbox + claim + conditional debit with its ledger row + outcome + outbox), the payments relay,
-- and Orders settling it (inbox + status + notify). A relay claims a batch at a time: here one
-- order in ten pays for a claim. One pgbench "transaction" is one whole order, so tps = orders/s.
-- Seeded by gozon-bench: accounts pgb-1 .. pgb-:accounts with ample funds.
\set u random(1, :accounts)
\set amount random(100, 5000)
\set o random(1, 1000000000000000)
\set claim random(1, 10)

BEGIN;
SELECT count(*) FROM orders.orders WHERE user_id = 'pgb-' || :u AND status = 'NEW';
INSERT INTO orders.orders (id, user_id, amount_minor, status, correlation_id)
  VALUES (md5('o' || :o || '-' || :client_id)::uuid, 'pgb-' || :u, :amount, 'NEW', 'pgbench')
  RETURNING id, user_id, amount_minor, status, reason, created_at, updated_at;
INSERT INTO orders.outbox (message_id, message_type, correlation_id, body)
  VALUES (md5('r' || :o || '-' || :client_id)::uuid, 'payment.requested.v1', 'pgbench',
          '{"type": "payment.requested.v1", "payload": {"amount": "1.00"}}');
SELECT pg_notify('gozon_order_changed', 'pgbench');
COMMIT;

BEGIN;
\if :claim = 1
SELECT seq, message_id, message_type, correlation_id, body FROM orders.outbox
  WHERE sent_at IS NULL ORDER BY seq LIMIT 100 FOR UPDATE SKIP LOCKED;
\endif
UPDATE orders.outbox SET sent_at = clock_timestamp()
  WHERE message_id = md5('r' || :o || '-' || :client_id)::uuid;
COMMIT;

BEGIN;
INSERT INTO payments.inbox (consumer, message_id)
  VALUES ('payments.payment-requests', md5('r' || :o || '-' || :client_id)::uuid) ON CONFLICT DO NOTHING;
INSERT INTO payments.order_payments (order_id, user_id, amount_minor, outcome)
  VALUES (md5('o' || :o || '-' || :client_id)::uuid, 'pgb-' || :u, :amount, 'pending')
  ON CONFLICT (order_id) DO NOTHING;
WITH debited AS (
  UPDATE payments.accounts SET balance_minor = balance_minor - :amount, updated_at = clock_timestamp()
  WHERE user_id = 'pgb-' || :u AND balance_minor >= :amount RETURNING user_id, balance_minor)
INSERT INTO payments.transactions (user_id, kind, amount_minor, order_id, balance_after_minor)
  SELECT user_id, 'debit', :amount, md5('o' || :o || '-' || :client_id)::uuid, balance_minor FROM debited
  RETURNING balance_after_minor;
UPDATE payments.order_payments SET outcome = 'debited', updated_at = clock_timestamp()
  WHERE order_id = md5('o' || :o || '-' || :client_id)::uuid;
INSERT INTO payments.outbox (message_id, message_type, correlation_id, body)
  VALUES (md5('s' || :o || '-' || :client_id)::uuid, 'payment.succeeded.v1', 'pgbench',
          '{"type": "payment.succeeded.v1", "payload": {"amount": "1.00"}}');
COMMIT;

BEGIN;
\if :claim = 1
SELECT seq, message_id, message_type, correlation_id, body FROM payments.outbox
  WHERE sent_at IS NULL ORDER BY seq LIMIT 100 FOR UPDATE SKIP LOCKED;
\endif
UPDATE payments.outbox SET sent_at = clock_timestamp()
  WHERE message_id = md5('s' || :o || '-' || :client_id)::uuid;
COMMIT;

BEGIN;
INSERT INTO orders.inbox (consumer, message_id)
  VALUES ('orders.payment-results', md5('s' || :o || '-' || :client_id)::uuid) ON CONFLICT DO NOTHING;
UPDATE orders.orders SET status = 'FINISHED', reason = NULL, updated_at = clock_timestamp()
  WHERE id = md5('o' || :o || '-' || :client_id)::uuid AND status = 'NEW'
    AND user_id = 'pgb-' || :u AND amount_minor = :amount
  RETURNING id, user_id, amount_minor, status, reason, created_at, updated_at;
SELECT pg_notify('gozon_order_changed', 'pgbench');
COMMIT;
