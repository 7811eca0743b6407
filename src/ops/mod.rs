//! Operating Gozon: logs, Prometheus metrics, and the cross-schema audit.

pub mod audit;
pub mod metrics;
pub mod telemetry;
