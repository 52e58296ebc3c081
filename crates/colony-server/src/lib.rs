//! A Colony server node: openraft over gRPC, the admin service, leader forwarding, health and
//! reflection on one TCP port; the executor gateway (QUIC) on the same port number over UDP; and,
//! on the leader, the scheduler and the executor failure detector.
//!
//! Module graph (no cycles): `start` builds a `node::Node` and starts `admin`, `gateway`
//! and `leader`, which use it; `node` knows only `proposer`, `metrics`, `peers` and `sessions`.

// `tonic::Status` is the error type every gRPC handler returns; boxing it in the helpers that
// build it would only add allocations on the request path.
#![allow(clippy::result_large_err)]

mod admin;
pub mod audit;
pub mod config;
mod console;
mod gateway;
mod handover;
mod heartbeat;
mod identity;
mod join;
mod leader;
mod metrics;
mod network;
mod node;
mod peers;
mod proposer;
mod raft_service;
mod restore;
mod sessions;
mod start;
mod tls;
mod traces;
mod wire;

pub use config::ServerConfig;
pub use start::run;
