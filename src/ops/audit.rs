//! `gozon audit`: reads both schemas and reports every broken invariant of the saga.
//!
//! This is an operator's view across the two contexts, so it is the one place that reads both
//! schemas; it never writes. Invariants:
//! - each account's balance equals its top-ups and refunds minus its debits (the ledger adds up);
//! - money is conserved: top-ups = balances + what orders hold (FINISHED, REFUNDING not yet
//!   refunded, and unrefunded debits of NEW or CANCELLED orders);
//! - every debit belongs to an existing order; every FINISHED order was debited exactly once,
//!   for its amount; no order refunded twice; every REFUNDED order refunded, no FINISHED one;
//! - no CANCELLED order left debited, no order REFUNDING or NEW, no outbox row unsent, longer
//!   than a threshold.

use std::fmt;
use std::time::Duration;

use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, DbErr, Statement};

#[derive(Debug, Clone)]
pub struct AuditSettings {
    /// An order NEW for longer than this is stuck.
    pub stuck_after: Duration,
    /// An unsent outbox row older than this is stuck.
    pub outbox_stale_after: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub name: &'static str,
    /// One line per offending row (at most [`MAX_EXAMPLES`]); empty when the check passed.
    pub problems: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditReport {
    pub checks: Vec<Check>,
    pub totals: Totals,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
/// Sums in minor units, as 128-bit integers: adding up many BIGINT amounts cannot overflow.
pub struct Totals {
    pub top_ups_minor: i128,
    pub balances_minor: i128,
    pub finished_minor: i128,
    /// REFUNDING orders whose refund Payments has not made yet.
    pub refunding_minor: i128,
    /// Debits of NEW or CANCELLED orders not refunded (yet).
    pub in_flight_debits_minor: i128,
    pub orders: i64,
    pub orders_new: i64,
}

const MAX_EXAMPLES: i64 = 20;

impl AuditReport {
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|check| check.problems.is_empty())
    }

    pub fn failed_checks(&self) -> Vec<&'static str> {
        self.checks
            .iter()
            .filter(|c| !c.problems.is_empty())
            .map(|c| c.name)
            .collect()
    }
}

fn money(minor: i128) -> String {
    let sign = if minor < 0 { "-" } else { "" };
    let minor = minor.unsigned_abs();
    format!("{sign}{}.{:02}", minor / 100, minor % 100)
}

impl fmt::Display for AuditReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = &self.totals;
        writeln!(
            f,
            "orders: {} ({} NEW); top-ups {} = balances {} + FINISHED {} + REFUNDING {} + \
             debits of NEW or CANCELLED orders {}",
            t.orders,
            t.orders_new,
            money(t.top_ups_minor),
            money(t.balances_minor),
            money(t.finished_minor),
            money(t.refunding_minor),
            money(t.in_flight_debits_minor)
        )?;
        for check in &self.checks {
            let verdict = if check.problems.is_empty() {
                "ok  "
            } else {
                "FAIL"
            };
            writeln!(f, "{verdict} {}", check.name)?;
            for problem in &check.problems {
                writeln!(f, "       {problem}")?;
            }
        }
        write!(
            f,
            "{}",
            if self.passed() {
                "audit passed"
            } else {
                "audit FAILED"
            }
        )
    }
}

/// A sum, added up by PostgreSQL as NUMERIC (exact, unbounded) and read as an i128.
async fn sum(db: &DatabaseConnection, sql: &str) -> Result<i128, DbErr> {
    let row = db
        .query_one_raw(Statement::from_string(
            DbBackend::Postgres,
            format!("SELECT coalesce(({sql}), 0)::NUMERIC::TEXT"),
        ))
        .await?
        .ok_or_else(|| DbErr::Custom(format!("no row from {sql}")))?;
    let text = row.try_get_by_index::<String>(0)?;
    text.parse()
        .map_err(|_| DbErr::Custom(format!("{sql} is not a whole number: {text}")))
}

async fn scalar(db: &DatabaseConnection, sql: &str) -> Result<i64, DbErr> {
    let row = db
        .query_one_raw(Statement::from_string(DbBackend::Postgres, sql))
        .await?
        .ok_or_else(|| DbErr::Custom(format!("no row from {sql}")))?;
    row.try_get_by_index::<i64>(0)
}

/// Runs `sql`, whose rows are one text column each describing a problem.
async fn problems(db: &DatabaseConnection, sql: &str) -> Result<Vec<String>, DbErr> {
    let rows = db
        .query_all_raw(Statement::from_string(
            DbBackend::Postgres,
            format!("{sql} LIMIT {MAX_EXAMPLES}"),
        ))
        .await?;
    rows.iter()
        .map(|row| row.try_get_by_index::<String>(0))
        .collect()
}

pub async fn audit(
    db: &DatabaseConnection,
    settings: &AuditSettings,
) -> Result<AuditReport, DbErr> {
    let totals = totals(db).await?;
    let mut checks = vec![
        check(
            db,
            "every balance equals its top-ups and refunds minus its debits",
            BALANCE_MATCHES_LEDGER,
        )
        .await?,
        conservation(&totals),
    ];
    for (name, sql) in DEBIT_CHECKS {
        checks.push(check(db, name, sql).await?);
    }
    let stuck = settings.stuck_after.as_secs_f64();
    let stale = settings.outbox_stale_after.as_secs_f64();
    for (name, sql, threshold) in [
        ("no order stuck in NEW", STUCK_NEW, stuck),
        (
            "no CANCELLED order left debited once its refund had time",
            UNREFUNDED,
            stuck,
        ),
        ("no order stuck in REFUNDING", STUCK_REFUNDING, stuck),
        ("no outbox message stuck unsent", STUCK_OUTBOX, stale),
    ] {
        let sql = sql.replace("{threshold}", &threshold.to_string());
        checks.push(check(db, name, &sql).await?);
    }
    Ok(AuditReport { checks, totals })
}

async fn totals(db: &DatabaseConnection) -> Result<Totals, DbErr> {
    Ok(Totals {
        top_ups_minor: sum(
            db,
            "SELECT sum(amount_minor) FROM payments.transactions WHERE kind = 'top_up'",
        )
        .await?,
        balances_minor: sum(db, "SELECT sum(balance_minor) FROM payments.accounts").await?,
        finished_minor: sum(
            db,
            "SELECT sum(amount_minor) FROM orders.orders WHERE status = 'FINISHED'",
        )
        .await?,
        refunding_minor: sum(
            db,
            "SELECT sum(o.amount_minor) FROM orders.orders o WHERE o.status = 'REFUNDING' \
             AND NOT EXISTS (SELECT 1 FROM payments.order_refunds r WHERE r.order_id = o.id)",
        )
        .await?,
        in_flight_debits_minor: sum(
            db,
            "SELECT sum(t.amount_minor) FROM payments.transactions t \
             JOIN orders.orders o ON o.id = t.order_id WHERE t.kind = 'debit' \
             AND o.status IN ('NEW', 'CANCELLED') \
             AND NOT EXISTS (SELECT 1 FROM payments.order_refunds r WHERE r.order_id = o.id)",
        )
        .await?,
        orders: scalar(db, "SELECT count(*) FROM orders.orders").await?,
        orders_new: scalar(
            db,
            "SELECT count(*) FROM orders.orders WHERE status = 'NEW'",
        )
        .await?,
    })
}

async fn check(db: &DatabaseConnection, name: &'static str, sql: &str) -> Result<Check, DbErr> {
    Ok(Check {
        name,
        problems: problems(db, sql).await?,
    })
}

const BALANCE_MATCHES_LEDGER: &str = "SELECT format('account %s: balance %s, ledger says %s', a.user_id, a.balance_minor, \
        coalesce(l.net, 0)) \
 FROM payments.accounts a LEFT JOIN ( \
     SELECT user_id, sum(CASE kind WHEN 'debit' THEN -amount_minor ELSE amount_minor END) AS net \
     FROM payments.transactions GROUP BY user_id) l ON l.user_id = a.user_id \
 WHERE a.balance_minor <> coalesce(l.net, 0) ORDER BY a.user_id";

/// Rows that have waited longer than `{threshold}` seconds.
const STUCK_NEW: &str = "SELECT format('order %s NEW since %s', id, created_at) FROM orders.orders \
     WHERE status = 'NEW' AND created_at < clock_timestamp() - make_interval(secs => {threshold}) \
     ORDER BY created_at";
const UNREFUNDED: &str = "SELECT format('order %s is CANCELLED (%s) since %s but debit %s of %s was not refunded', \
            o.id, o.reason, o.updated_at, t.id, t.amount_minor) \
     FROM orders.orders o JOIN payments.transactions t ON t.order_id = o.id AND t.kind = 'debit' \
     WHERE o.status = 'CANCELLED' AND o.updated_at < clock_timestamp() - make_interval(secs => {threshold}) \
     AND NOT EXISTS (SELECT 1 FROM payments.order_refunds r WHERE r.order_id = o.id) \
     ORDER BY o.updated_at";
const STUCK_REFUNDING: &str = "SELECT format('order %s REFUNDING since %s', id, updated_at) FROM orders.orders \
     WHERE status = 'REFUNDING' AND updated_at < clock_timestamp() - make_interval(secs => {threshold}) \
     ORDER BY updated_at";
const STUCK_OUTBOX: &str = "SELECT format('%s outbox message %s (%s) unsent since %s', schema, message_id, message_type, created_at) \
     FROM (SELECT 'orders' AS schema, * FROM orders.outbox UNION ALL \
           SELECT 'payments', * FROM payments.outbox) AS outbox \
     WHERE sent_at IS NULL AND created_at < clock_timestamp() - make_interval(secs => {threshold}) \
     ORDER BY created_at";

/// Each debit against the orders it pays.
const DEBIT_CHECKS: [(&str, &str); 3] = [
    (
        "every debit belongs to an order",
        "SELECT format('debit %s of %s for unknown order %s', t.id, t.amount_minor, t.order_id) \
         FROM payments.transactions t WHERE t.kind = 'debit' \
         AND NOT EXISTS (SELECT 1 FROM orders.orders o WHERE o.id = t.order_id) ORDER BY t.id",
    ),
    (
        "no order refunded twice, and every REFUNDED order refunded",
        "SELECT format('order %s is %s with %s refund(s)', o.id, o.status, count(t.id)) \
         FROM orders.orders o LEFT JOIN payments.transactions t ON t.order_id = o.id AND t.kind = 'refund' \
         GROUP BY o.id, o.status HAVING count(t.id) > 1 OR (o.status = 'REFUNDED' AND count(t.id) <> 1) \
         OR (o.status = 'FINISHED' AND count(t.id) > 0)",
    ),
    (
        "every FINISHED order was debited exactly once, for its amount",
        "SELECT format('order %s (%s) FINISHED with %s debit(s) totalling %s', o.id, o.amount_minor, \
                count(t.id), coalesce(sum(t.amount_minor), 0)) \
         FROM orders.orders o LEFT JOIN payments.transactions t \
              ON t.order_id = o.id AND t.kind = 'debit' \
         WHERE o.status = 'FINISHED' GROUP BY o.id, o.amount_minor \
         HAVING count(t.id) <> 1 OR coalesce(sum(t.amount_minor), 0) <> o.amount_minor",
    ),
];

fn conservation(totals: &Totals) -> Check {
    let held = totals
        .balances_minor
        .checked_add(totals.finished_minor)
        .and_then(|sum| sum.checked_add(totals.refunding_minor))
        .and_then(|sum| sum.checked_add(totals.in_flight_debits_minor));
    let problems = if held == Some(totals.top_ups_minor) {
        Vec::new()
    } else {
        vec![format!(
            "top-ups {} but balances {} + FINISHED {} + REFUNDING {} + in flight {} = {}",
            money(totals.top_ups_minor),
            money(totals.balances_minor),
            money(totals.finished_minor),
            money(totals.refunding_minor),
            money(totals.in_flight_debits_minor),
            held.map_or_else(|| "more than 128 bits".to_owned(), money)
        )]
    };
    Check {
        name: "money conserved: top-ups = balances + FINISHED + REFUNDING + unrefunded debits of NEW or CANCELLED orders",
        problems,
    }
}
