//! The results: a table on screen and a JSON file, with Gozon's figures as fractions of what
//! PostgreSQL does with the same work.

use std::fmt;
use std::path::{Path, PathBuf};

use serde_json::json;

use crate::Args;
use crate::cpu::Group;
use crate::load::{Reads, Step};
use crate::pg::Limits;

pub struct Report {
    label: String,
    steps: Vec<Step>,
    reads: Reads,
    limits: Option<Limits>,
    /// Peak resident memory of each server process, in MiB.
    memory: Vec<(u32, f64)>,
    /// How long the deployment took to drain before pgbench ran (None: it did not, in 120 s).
    drained: Option<f64>,
}

/// Each process's peak resident set (VmHWM), in MiB.
pub fn peak_rss(pids: &[u32]) -> Vec<(u32, f64)> {
    pids.iter()
        .filter_map(|pid| {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
            let kib: f64 = status
                .lines()
                .find_map(|line| line.strip_prefix("VmHWM:"))?
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .ok()?;
            Some((*pid, kib / 1024.0))
        })
        .collect()
}

fn ms(micros: u64) -> f64 {
    micros as f64 / 1000.0
}

impl Report {
    pub fn new(
        args: &Args,
        steps: Vec<Step>,
        reads: Reads,
        limits: Option<Limits>,
        memory: Vec<(u32, f64)>,
        drained: Option<f64>,
    ) -> Report {
        Report {
            label: args.label.clone(),
            steps,
            reads,
            limits,
            memory,
            drained,
        }
    }

    /// The best step that kept up (else the last one).
    fn best(&self) -> Option<&Step> {
        self.steps
            .iter()
            .filter(|s| s.sustainable())
            .max_by(|a, b| a.settled_per_sec.total_cmp(&b.settled_per_sec))
            .or(self.steps.last())
    }

    /// The step run at `rate` (a --rates step), to set beside saga.sql at that rate.
    fn same_rate(&self, rate: f64) -> Option<&Step> {
        self.steps.iter().find(|s| (s.rate - rate).abs() < 0.5)
    }

    fn step_json(step: &Step) -> serde_json::Value {
        json!({
            "rate": step.rate, "sent": step.sent, "errors": step.errors, "settled": step.settled,
            "settled_per_sec": step.settled_per_sec, "sustainable": step.sustainable(),
            "saga_ms": {"p50": ms(step.saga.value_at_quantile(0.5)), "p99": ms(step.saga.value_at_quantile(0.99)), "p999": ms(step.saga.value_at_quantile(0.999))},
            "create_order_ms": {"p50": ms(step.http.value_at_quantile(0.5)), "p99": ms(step.http.value_at_quantile(0.99)), "p999": ms(step.http.value_at_quantile(0.999))},
            "outbox_backlog_at_stop": step.backlog_at_stop, "queued_at_stop": step.queued_at_stop,
            "outbox_backlog_after_drain": step.backlog_after,
            "cpu_ms_per_order": {
                "window_orders": step.settled_in_window,
                "gozon": step.cpu_per_order(Group::Gozon),
                "rabbitmq": step.cpu_per_order(Group::RabbitMq),
                "postgresql": step.cpu_per_order(Group::PostgreSql),
                "gozon_bench": step.cpu_per_order(Group::Bench),
            },
        })
    }

    pub fn save(&self, dir: &Path) -> anyhow::Result<PathBuf> {
        std::fs::create_dir_all(dir)?;
        let best = self.best();
        let document = json!({
            "label": self.label,
            "at": chrono::Utc::now().to_rfc3339(),
            "steps": self.steps.iter().map(Report::step_json).collect::<Vec<_>>(),
            "highest_sustained_settled_per_sec": best.filter(|s| s.sustainable()).map(|s| s.settled_per_sec),
            "get_order_per_sec": self.reads.get_order_per_sec,
            "get_balance_per_sec": self.reads.get_balance_per_sec,
            "pgbench": self.limits.as_ref().map(|l| json!({
                "saga_orders_per_sec": l.saga_per_sec, "get_order_per_sec": l.get_order_per_sec,
                "ran_after_drain_secs": self.drained,
                "saga_cpu_ms_per_order": l.cpu.iter().map(|c| json!({"rate": c.rate, "orders": c.orders, "postgresql": c.postgres_ms, "pgbench": c.pgbench_ms, "postgresql_for_gozon_over_saga": self.same_rate(c.rate).map(|s| s.cpu_per_order(Group::PostgreSql) / c.postgres_ms.max(1e-9))})).collect::<Vec<_>>(),
            })),
            "ratios": self.limits.as_ref().map(|l| json!({
                "settled": best.map(|s| s.settled_per_sec / l.saga_per_sec),
                "get_order": self.reads.get_order_per_sec / l.get_order_per_sec,
            })),
            "peak_rss_mib": self.memory.iter().map(|(pid, mib)| json!({"pid": pid, "mib": mib})).collect::<Vec<_>>(),
        });
        let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%S");
        let path = dir.join(format!("{stamp}-{}.json", self.label));
        std::fs::write(&path, serde_json::to_string_pretty(&document)? + "\n")?;
        Ok(path)
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "gozon-bench [{}]", self.label)?;
        writeln!(
            f,
            "{:>8} {:>7} {:>6} {:>10} {:>22} {:>22} {:>9} {:>4}",
            "rate/s",
            "sent",
            "errors",
            "settled/s",
            "saga p50/p99/p99.9 ms",
            "create p50/p99/p99.9 ms",
            "backlog",
            "ok"
        )?;
        for s in &self.steps {
            let q = |h: &hdrhistogram::Histogram<u64>| {
                format!(
                    "{:.1}/{:.1}/{:.1}",
                    ms(h.value_at_quantile(0.5)),
                    ms(h.value_at_quantile(0.99)),
                    ms(h.value_at_quantile(0.999))
                )
            };
            writeln!(
                f,
                "{:>8.0} {:>7} {:>6} {:>10.1} {:>22} {:>22} {:>9} {:>4}",
                s.rate,
                s.sent,
                s.errors,
                s.settled_per_sec,
                q(&s.saga),
                q(&s.http),
                s.backlog_at_stop + s.queued_at_stop as i64,
                if s.sustainable() { "yes" } else { "no" }
            )?;
        }
        writeln!(
            f,
            "CPU ms per settled order, middle half of each step (gozon / rabbitmq / postgresql / gozon-bench):"
        )?;
        for s in &self.steps {
            writeln!(
                f,
                "{:>8.0}/s: {:.2} / {:.2} / {:.2} / {:.2}  ({} orders; gozon/postgresql {:.2})",
                s.rate,
                s.cpu_per_order(Group::Gozon),
                s.cpu_per_order(Group::RabbitMq),
                s.cpu_per_order(Group::PostgreSql),
                s.cpu_per_order(Group::Bench),
                s.settled_in_window,
                s.cpu_per_order(Group::Gozon) / s.cpu_per_order(Group::PostgreSql).max(1e-9),
            )?;
        }
        writeln!(
            f,
            "GET order {:.0}/s, GET balance {:.0}/s",
            self.reads.get_order_per_sec, self.reads.get_balance_per_sec
        )?;
        if let Some(limits) = &self.limits {
            let settled = self.best().map_or(0.0, |s| s.settled_per_sec);
            writeln!(
                f,
                "pgbench: saga commits {:.0} orders/s, GET order SELECT {:.0}/s",
                limits.saga_per_sec, limits.get_order_per_sec
            )?;
            match self.drained {
                Some(secs) => writeln!(
                    f,
                    "pgbench ran on the drained deployment (outbox backlog 0, queues empty, {secs:.1} s after the load)"
                )?,
                None => writeln!(
                    f,
                    "pgbench ran while the deployment had NOT drained in 120 s: its figures are low"
                )?,
            }
            for cpu in &limits.cpu {
                writeln!(
                    f,
                    "bench/saga.sql at {:.0}/s: CPU ms per order postgresql {:.2}, pgbench {:.2}",
                    cpu.rate, cpu.postgres_ms, cpu.pgbench_ms
                )?;
                if let Some(step) = self.same_rate(cpu.rate) {
                    writeln!(
                        f,
                        "at {:.0}/s: postgresql for gozon / for saga.sql {:.2}",
                        cpu.rate,
                        step.cpu_per_order(Group::PostgreSql) / cpu.postgres_ms.max(1e-9)
                    )?;
                }
            }
            writeln!(
                f,
                "ratios: settled {:.2}, GET order {:.2}",
                settled / limits.saga_per_sec,
                self.reads.get_order_per_sec / limits.get_order_per_sec
            )?;
        }
        for (pid, mib) in &self.memory {
            writeln!(f, "peak RSS of {pid}: {mib:.1} MiB")?;
        }
        Ok(())
    }
}
