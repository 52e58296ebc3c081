//! Cross-crate integration tests: real `colony server` and `colony executor` processes on loopback.

mod t00_boundaries;
mod t10_cluster;
mod t15_config;
mod t20_kill_leader;
mod t30_snapshot;
mod t40_membership;
mod t50_bad_input;
mod t60_metrics;
mod t65_console;
mod t70_dashboards;
mod t80_executors;
mod t84_attempt_socket;
mod t85_executor_link;
mod t86_discovery;
mod t87_agents;
mod t88_workflows;
mod t89_messages;
mod t90_learner;
mod t93_traces;
mod t94_backup;
mod t95_security;
mod t96_python;
mod t97_containment;
mod t98_retention;
mod t99_upgrade;
