//! End-to-end tests of walship's safety promises: a restore returns everything committed or
//! says what it could not, and nothing a client or a misconfiguration does stops
//! replication silently. One module per failure mode, each run against real processes, the
//! bundled SQLite, a local directory and the local S3 server.

#![allow(dead_code, clippy::unwrap_used, clippy::print_stdout)]

mod absent;
mod clock;
#[path = "../common/mod.rs"]
mod common;
#[path = "../http_support/mod.rs"]
mod http_support;

mod exec;
mod gaps;
mod http_clients;
mod keys;
mod log_flood;
mod ops;
mod ops_logs;
mod proxy;
mod s3_quirks;
mod secrets;
mod stall;
