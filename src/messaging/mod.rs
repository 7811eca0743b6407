//! Plumbing shared by both contexts: the message envelope, the transactional outbox and its
//! relay, the idempotent inbox, and AMQP connections that heal themselves.

pub mod amqp;
pub mod consumer;
pub mod dlq;
pub mod envelope;
pub mod inbox;
pub mod outbox;
pub mod signing;
