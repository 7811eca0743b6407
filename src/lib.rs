//! Gozon: orders and payments for an online store, as one modular-monolith binary.
//!
//! Two bounded contexts, [`orders`] and [`payments`], each owning a PostgreSQL schema, talk only
//! through [`contracts`] carried by [`messaging`] (transactional outbox -> RabbitMQ -> inbox).

pub mod app;
pub mod audit;
pub mod cli;
pub mod config;
pub mod contracts;
pub mod db;
pub mod http;
pub mod idempotency;
pub mod messaging;
pub mod metrics;
pub mod money;
pub mod orders;
pub mod payments;
pub mod telemetry;
pub mod user_id;
