//! A Colony server node: openraft over gRPC, the admin service, leader forwarding, health and
//! reflection, all on one port.

pub mod config;

pub use config::ServerConfig;
mod node;

pub use node::run;
