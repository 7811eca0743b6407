//! Gozon: orders and payments for an online store, as one modular-monolith binary.
//!
//! Two bounded contexts, [`orders`] and [`payments`], each owning a PostgreSQL schema, talk only
//! through [`contracts`] carried by [`messaging`] (transactional outbox -> RabbitMQ -> inbox).
//! Below them: the shared [`kernel`] of value types, the [`web`] kit every HTTP API is built
//! with, and [`db`]. Beside them: [`ops`] (audit, metrics, logs). Above them: [`app`], the only
//! module that knows both contexts and wires them into one process.

pub mod app;
pub mod contracts;
pub mod db;
pub mod kernel;
pub mod messaging;
pub mod ops;
pub mod orders;
pub mod payments;
pub mod web;
