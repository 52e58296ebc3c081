//! `colony cluster`: the cluster's status and membership changes.

use crate::client::Client;
use crate::output::{self, OutputFormat};
use crate::GlobalArgs;
use anyhow::Result;
use clap::Subcommand;
use colony_proto::pb;
use serde::Serialize;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// The answering server's view: leader, term, indexes, members and their reachability.
    Status {
        /// Refresh in place until Ctrl-C, with queue depth and throughput (JSON: one object a line).
        #[arg(long)]
        watch: bool,
        /// How often `--watch` refreshes.
        #[arg(long, default_value = "1s", value_parser = humantime::parse_duration, requires = "watch")]
        interval: Duration,
    },
    /// Remove a server from the membership.
    RemoveNode {
        /// The server's node id (see `colony cluster status`).
        id: u64,
    },
}

/// `cluster status` as JSON: the answer with names a script can rely on.
#[derive(Debug, Serialize)]
pub struct StatusJson {
    pub cluster_id: String,
    /// The server that answered.
    pub node_id: u64,
    /// Its Raft role: leader, follower, candidate, learner, shutdown.
    pub state: String,
    pub leader_id: Option<u64>,
    pub term: u64,
    pub commit_index: u64,
    pub applied_index: u64,
    pub last_log_index: u64,
    pub snapshot_index: Option<u64>,
    pub purged_index: Option<u64>,
    pub joint: bool,
    pub members: Vec<MemberJson>,
    pub task_count: u64,
    pub tasks_by_state: BTreeMap<String, u64>,
    pub rss_bytes: u64,
    pub version: String,
}

#[derive(Debug, Serialize)]
pub struct MemberJson {
    pub id: u64,
    pub addr: String,
    pub role: String,
    pub reachable: bool,
    pub matched_index: Option<u64>,
}

impl From<pb::ClusterStatusResponse> for StatusJson {
    fn from(s: pb::ClusterStatusResponse) -> Self {
        StatusJson {
            cluster_id: s.cluster_id,
            node_id: s.node_id,
            state: s.state,
            leader_id: s.leader_id,
            term: s.term,
            commit_index: s.commit_index,
            applied_index: s.applied_index,
            last_log_index: s.last_log_index,
            snapshot_index: s.snapshot_index,
            purged_index: s.purged_index,
            joint: s.joint,
            members: s
                .members
                .into_iter()
                .map(|m| MemberJson { id: m.id, addr: m.addr, role: m.role, reachable: m.reachable, matched_index: m.matched_index })
                .collect(),
            task_count: s.task_count,
            tasks_by_state: s.tasks_by_state.into_iter().collect(),
            rss_bytes: s.rss_bytes,
            version: s.version,
        }
    }
}

pub async fn run(command: ClusterCommand, global: &GlobalArgs) -> Result<()> {
    let mut client = Client::new(&global.endpoint, global.timeout)?;
    match command {
        ClusterCommand::Status { watch: true, interval } => watch_status(&mut client, interval, global.output).await?,
        ClusterCommand::Status { watch: false, .. } => {
            let status = StatusJson::from(cluster_status(&mut client).await?);
            match global.output {
                OutputFormat::Table => print_status(&status)?,
                OutputFormat::Json => output::print_json(&status)?,
            }
        }
        ClusterCommand::RemoveNode { id } => {
            let request = pb::RemoveNodeRequest { node_id: id };
            let response = client
                .call("remove node", |mut c| async move { c.remove_node(request).await })
                .await?;
            match global.output {
                OutputFormat::Table => {
                    let voters: Vec<String> = response.voters.iter().map(u64::to_string).collect();
                    output::out(format!("removed node {id}; voters now {} (leader {})", voters.join(", "), response.leader_id))?;
                }
                OutputFormat::Json => output::print_json(&serde_json::json!({
                    "removed": id,
                    "leader_id": response.leader_id,
                    "voters": response.voters,
                }))?,
            }
        }
    }
    Ok(())
}

pub async fn cluster_status(client: &mut Client) -> Result<pb::ClusterStatusResponse> {
    client.call("cluster status", |mut c| async move { c.cluster_status(pb::ClusterStatusRequest {}).await }).await
}

/// Rates between two status answers.
#[derive(Debug, Serialize)]
struct Throughput {
    tasks_per_second: f64,
    entries_per_second: f64,
}

/// `cluster status --watch`: redraws the status with queue depth and throughput until Ctrl-C.
async fn watch_status(client: &mut Client, interval: Duration, format: OutputFormat) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    // One stream for the whole watch: it keeps a Ctrl-C that arrives while a request is in flight.
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut previous: Option<(Instant, u64, u64)> = None;
    loop {
        let answer = tokio::select! {
            answer = cluster_status(client) => answer?,
            _ = interrupt.recv() => return Ok(()),
        };
        let status = StatusJson::from(answer);
        let now = Instant::now();
        let throughput = previous.map(|(at, tasks, commit)| {
            let seconds = now.duration_since(at).as_secs_f64().max(1e-3);
            Throughput {
                tasks_per_second: status.task_count.saturating_sub(tasks) as f64 / seconds,
                entries_per_second: status.commit_index.saturating_sub(commit) as f64 / seconds,
            }
        });
        previous = Some((now, status.task_count, status.commit_index));
        match format {
            OutputFormat::Json => {
                let line = serde_json::json!({ "status": status, "throughput": throughput });
                output::out(serde_json::to_string(&line)?)?;
            }
            OutputFormat::Table => {
                // Clear the screen and home the cursor, then draw the whole view again.
                output::out("\x1b[2J\x1b[H")?;
                print_status(&status)?;
                let pending = status.tasks_by_state.get("pending").copied().unwrap_or(0);
                let rates = throughput.map_or_else(
                    || "measuring...".to_owned(),
                    |t| format!("{:.1} tasks/s submitted, {:.1} log entries/s committed", t.tasks_per_second, t.entries_per_second),
                );
                output::out("")?;
                output::out(format!("queue depth {pending}  throughput {rates}"))?;
                output::out(format!("refreshing every {}; Ctrl-C to stop", humantime::format_duration(interval)))?;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = interrupt.recv() => return Ok(()),
        }
    }
}

/// The members table, shared with `colony dev`.
pub fn print_members(members: &[MemberJson]) -> Result<()> {
    let mut table = output::table(["ID", "ADDR", "ROLE", "REACHABLE", "MATCHED"]);
    for m in members {
        table.add_row(vec![
            m.id.to_string(),
            m.addr.clone(),
            m.role.clone(),
            if m.reachable { "yes" } else { "no" }.to_owned(),
            m.matched_index.map_or_else(|| "-".to_owned(), |i| i.to_string()),
        ]);
    }
    output::print_table(table)
}

fn print_status(s: &StatusJson) -> Result<()> {
    let leader = s.leader_id.map_or_else(|| "none".to_owned(), |id| id.to_string());
    output::out(format!(
        "cluster {}  leader {leader}  term {}  commit {}  applied {}  (answered by node {}, {})",
        s.cluster_id, s.term, s.commit_index, s.applied_index, s.node_id, s.state
    ))?;
    if s.joint {
        output::out("membership change in progress (joint consensus)")?;
    }
    let by_state: Vec<String> = s.tasks_by_state.iter().filter(|(_, n)| **n > 0).map(|(state, n)| format!("{state} {n}")).collect();
    if by_state.is_empty() {
        output::out(format!("tasks {}", s.task_count))?;
    } else {
        output::out(format!("tasks {} ({})", s.task_count, by_state.join(", ")))?;
    }
    output::out("")?;
    print_members(&s.members)
}
