//! Cross-crate integration tests: real `colony server` processes on loopback.

mod t10_cluster;
mod t20_kill_leader;
mod t30_snapshot;
mod t40_membership;
mod t50_bad_input;
mod t60_metrics;
mod t70_dashboards;
