//! CPU time by process group, read from /proc: the server processes (their pids), RabbitMQ
//! (the Erlang VM and its helpers), PostgreSQL (postmaster and backends), this benchmark, and
//! pgbench. Host processes only: a process in another PID namespace (a container's) is not
//! counted, whatever its name.

use std::collections::HashMap;
use std::time::Instant;

/// The groups CPU time is reported by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Group {
    Gozon,
    RabbitMq,
    PostgreSql,
    Bench,
    Pgbench,
}

/// Each process's CPU time (user + system, seconds) at one moment.
#[derive(Debug, Clone)]
pub struct Sample {
    at: Instant,
    processes: HashMap<u32, (Group, f64)>,
}

/// Seconds of CPU each group used between two samples.
#[derive(Debug, Clone, Default)]
pub struct Usage {
    pub seconds: f64,
    pub by_group: HashMap<Group, f64>,
}

fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|out| String::from_utf8_lossy(&out.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// utime + stime of `pid` in ticks, and its command name.
fn stat(pid: u32) -> Option<(String, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // comm is in parentheses and may hold spaces: the fields after it start past the last ')'.
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text[open + 1..close].to_owned();
    let fields: Vec<&str> = text[close + 2..].split_whitespace().collect();
    // After comm: state(0) ppid(1) ... utime(11) stime(12).
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((comm, utime + stime))
}

fn pid_namespace(pid: &str) -> Option<std::path::PathBuf> {
    std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok()
}

/// The group of a process by its command name, if it is one of the servers.
fn group_of(comm: &str) -> Option<Group> {
    match comm {
        "beam.smp" | "erl_child_setup" | "epmd" | "inet_gethost" => Some(Group::RabbitMq),
        "pgbench" => Some(Group::Pgbench),
        name if name.starts_with("postgres") => Some(Group::PostgreSql),
        _ => None,
    }
}

/// Takes CPU samples; `servers` are the Gozon processes.
pub struct Meter {
    servers: Vec<u32>,
    own: u32,
    namespace: Option<std::path::PathBuf>,
    ticks: f64,
}

impl Meter {
    pub fn new(servers: &[u32]) -> Meter {
        Meter {
            servers: servers.to_vec(),
            own: std::process::id(),
            namespace: pid_namespace("self"),
            ticks: clock_ticks(),
        }
    }

    pub fn sample(&self) -> Sample {
        let mut processes = HashMap::new();
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return Sample {
                at: Instant::now(),
                processes,
            };
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(pid) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            let Some((comm, ticks)) = stat(pid) else {
                continue;
            };
            let group = if self.servers.contains(&pid) {
                Some(Group::Gozon)
            } else if pid == self.own {
                Some(Group::Bench)
            } else {
                group_of(&comm)
            };
            let Some(group) = group else { continue };
            if group != Group::Gozon && pid_namespace(&pid.to_string()) != self.namespace {
                continue;
            }
            processes.insert(pid, (group, ticks as f64 / self.ticks));
        }
        Sample {
            at: Instant::now(),
            processes,
        }
    }
}

impl Sample {
    /// What each group used since `earlier` (a process that appeared meanwhile counts whole;
    /// one that ended meanwhile is not counted).
    pub fn since(&self, earlier: &Sample) -> Usage {
        let mut by_group: HashMap<Group, f64> = HashMap::new();
        for (pid, (group, now)) in &self.processes {
            let before = earlier.processes.get(pid).map_or(0.0, |(_, cpu)| *cpu);
            *by_group.entry(*group).or_default() += (now - before).max(0.0);
        }
        Usage {
            seconds: self.at.duration_since(earlier.at).as_secs_f64(),
            by_group,
        }
    }
}

impl Usage {
    /// Milliseconds of CPU per unit of `work` (orders), for `group`.
    pub fn ms_per(&self, group: Group, work: f64) -> f64 {
        if work <= 0.0 {
            return 0.0;
        }
        self.by_group.get(&group).copied().unwrap_or(0.0) * 1000.0 / work
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_measured() {
        let meter = Meter::new(&[]);
        let before = meter.sample();
        let mut x = 0u64;
        for i in 0..30_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        let usage = meter.sample().since(&before);
        assert!(usage.by_group.get(&Group::Bench).copied().unwrap_or(0.0) > 0.0);
    }
}
