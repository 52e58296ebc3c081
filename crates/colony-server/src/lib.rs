//! A Colony server node: openraft over gRPC, the admin service, leader forwarding, health and
//! reflection, all on one port.

mod admin_service;
pub mod config;
mod identity;
mod network;
mod node;
mod peers;
mod proposer;
mod raft_service;
mod wire;

pub use config::ServerConfig;
pub use node::run;
