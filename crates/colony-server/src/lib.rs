//! A Colony server node: openraft over gRPC, the admin service, leader forwarding, health and
//! reflection, all on one port.

// `tonic::Status` is the error type every gRPC handler returns; boxing it in the helpers that
// build it would only add allocations on the request path.
#![allow(clippy::result_large_err)]

mod admin_service;
pub mod config;
mod identity;
mod metrics;
mod network;
mod node;
mod peers;
mod proposer;
mod raft_service;
mod wire;

pub use config::ServerConfig;
pub use node::run;
