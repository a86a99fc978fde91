//! Real servers for beamline-router's tests.
//!
//! beamline-router is tested against the real thing (DESIGN.md §10): PostgreSQL and
//! NATS with JetStream, never mocks. This crate gives tests what they need for that:
//!
//! - [`database_url`] and [`nats_url`]: the shared services of the machine
//!   (`DATABASE_URL`, `NATS_URL`, with the local defaults). `scripts/test` exports
//!   both, starting throwaway servers when the machine has none.
//! - [`TestDatabase`]: a fresh, uniquely named, empty database on a PostgreSQL
//!   server, dropped (`DROP DATABASE … WITH (FORCE)`) when the value is dropped.
//! - [`NatsServer`]: a `nats-server -js` of the test's own on a free port, with its own
//!   store directory, that the test can [stop](NatsServer::stop),
//!   [pause](NatsServer::pause) and [restart](NatsServer::restart) to inject faults;
//!   or one [started from a configuration](NatsServer::start_with_config) (users,
//!   permissions, TLS).
//! - [`NatsCluster`]: several such servers routed into one cluster.
//! - [`PgCluster`]: a throwaway PostgreSQL cluster (initdb in a temporary directory)
//!   on a free port, which the test can stop and restart in the same way.
//! - [`NatsOperator`]: NATS decentralised auth (operator, account, user JWTs signed
//!   with NKeys) and `.creds` files, for `credentials_file` tests.
//! - [`TestCa`]: a throwaway certificate authority issuing server and client
//!   certificates (for TLS and mTLS tests).
//! - [`OtlpReceiver`]: an OTLP/gRPC trace receiver (what an OpenTelemetry Collector
//!   receives), built from the official protocol definitions, that keeps the spans.
//! - [`free_port`]: a TCP port on 127.0.0.1 that was free a moment ago.
//! - [`bench`]: what the benches of several crates share (the benchmark registry
//!   dataset in PostgreSQL, percentiles, the binary's allocator tuning).
//!
//! Everything cleans up after itself: dropping a value stops its server and removes
//! its directory, also while a test unwinds from a panic. Server processes are
//! moreover tied to the test process with `PR_SET_PDEATHSIG` on Linux, so a test
//! binary that aborts or is killed does not leave `nats-server` or `postgres`
//! processes behind (their temporary directories do remain in that case).
//!
//! The helpers panic, with a message saying what failed and what to do about it,
//! when a server cannot be started or reached: in a test that is the right outcome.
//! Starting and stopping servers blocks the calling thread (for up to a few seconds),
//! which is acceptable in tests, including inside `#[tokio::test]`.
//!
//! ```no_run
//! use beamline_test_support::{NatsServer, PgCluster, TestDatabase};
//!
//! # async fn example() {
//! // A fresh database on the machine's PostgreSQL (DATABASE_URL).
//! let db = TestDatabase::create().await;
//! let pool = db.pool().await;
//! sqlx::query("create table t (id int)").execute(&pool).await.unwrap();
//!
//! // A NATS server this test owns, to take away and bring back.
//! let mut nats = NatsServer::start();
//! let _url = nats.url();
//! nats.stop();
//! nats.restart();
//!
//! // A PostgreSQL cluster this test owns, with a database on it.
//! let cluster = PgCluster::start();
//! let db_on_cluster = TestDatabase::create_on(&cluster.url()).await;
//! # drop((db_on_cluster, cluster));
//! # }
//! ```

#![warn(missing_docs)]

pub mod bench;
mod database;
mod nats;
mod nats_jwt;
mod otlp;
mod postgres;
mod process;
mod tls;

use std::net::{Ipv4Addr, TcpListener};

pub use database::TestDatabase;
pub use nats::{NatsCluster, NatsServer};
pub use nats_jwt::NatsOperator;
pub use otlp::{OtlpReceiver, ReceivedSpan};
pub use postgres::PgCluster;
pub use tls::{Issued, TestCa};

/// The PostgreSQL URL used when `DATABASE_URL` is not set.
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// The NATS URL used when `NATS_URL` is not set.
pub const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:4222";

/// A TCP port on 127.0.0.1 that was free when this function returned.
///
/// The port is found by binding `127.0.0.1:0` and reading the port the kernel chose;
/// the listener is closed again before returning, so another process may take the
/// port before the caller binds it. [`NatsServer::start`] and [`PgCluster::start`]
/// retry with a new port when that happens.
///
/// # Panics
///
/// If no socket can be bound on 127.0.0.1.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap_or_else(|e| panic!("free_port: cannot bind a TCP socket on 127.0.0.1:0: {e}"));
    listener
        .local_addr()
        .unwrap_or_else(|e| panic!("free_port: cannot read the address of a bound socket: {e}"))
        .port()
}

/// The URL of the PostgreSQL server tests use: `DATABASE_URL`, or
/// [`DEFAULT_DATABASE_URL`] (`postgres://postgres@127.0.0.1:5432/postgres`).
pub fn database_url() -> String {
    env_or("DATABASE_URL", DEFAULT_DATABASE_URL)
}

/// The URL of the NATS server tests use: `NATS_URL`, or [`DEFAULT_NATS_URL`]
/// (`nats://127.0.0.1:4222`).
pub fn nats_url() -> String {
    env_or("NATS_URL", DEFAULT_NATS_URL)
}

fn env_or(name: &str, default: &str) -> String {
    match std::env::var(name) {
        Ok(value) if !value.trim().is_empty() => value,
        _ => default.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_port_is_bindable() {
        let port = free_port();
        assert_ne!(port, 0);
        TcpListener::bind((Ipv4Addr::LOCALHOST, port)).expect("the port should still be free");
    }
}
