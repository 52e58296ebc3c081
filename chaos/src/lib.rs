//! The chaos suite: a real cluster (every server and executor its own process in its own network
//! namespace) under real faults (nftables partitions and loss, kill -9, SIGSTOP, a delaying
//! proxy, membership changes, skewed clocks, full disks), with every client call recorded and
//! checked afterwards: nothing acknowledged lost, no over-commit, no duplicate completion, one
//! leader per term, replicas converged, and the history linearizable (Wing-Gong-Lowe search).
//! Needs root; says so and stops when it is not.

pub mod check;
pub mod checks;
pub mod cluster;
pub mod history;
pub mod messages;
pub mod nemesis;
pub mod net;
pub mod procs;
pub mod proxy;
pub mod report;
pub mod run;
pub mod workflows;
pub mod workload;

pub use run::{run, ChaosCommand};
