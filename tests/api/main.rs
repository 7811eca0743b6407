//! One integration-test binary: each test starts Gozon in-process on a random port, with its own
//! database and its own exchange and queue names, against the real PostgreSQL and RabbitMQ.

mod architecture;
mod audit;
mod auth;
mod batches;
mod broker_users;
mod brokers;
mod deployment;
mod edge;
mod events;
mod faults;
mod fuzz;
mod helpers;
mod idempotency;
mod jwks;
mod least_privilege;
mod lifecycle;
mod metrics;
mod one_statement;
mod openapi;
mod ops_kit;
mod orders;
mod outage;
mod payments;
mod poison;
mod rotation;
mod saga;
mod scale_out;
mod shutdown;
mod tracing;
