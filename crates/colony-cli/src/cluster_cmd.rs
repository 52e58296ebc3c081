//! `colony cluster`: the cluster's status and membership changes.

use crate::output::{self, OutputFormat};
use crate::GlobalArgs;
use anyhow::Result;
use clap::Subcommand;
use colony_client::Client;
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
    /// Join tokens for executors, servers and the learner.
    #[command(subcommand)]
    Token(TokenCommand),
    /// The cluster CA's certificate (public; PEM), for clients in other languages.
    Ca,
    /// The executors: state, capacity, allocation, heartbeat age.
    Executors {
        /// Answer from the receiving server's own state (no heartbeat ages), which may lag the leader.
        #[arg(long)]
        stale: bool,
    },
    /// Stop placing work on an executor; its tasks finish, or are stopped and rescheduled at the deadline.
    Drain {
        /// The executor's id (see `colony cluster executors`).
        executor: u64,
        /// How long running tasks may take to finish (e.g. 5m).
        #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
        deadline: Duration,
    },
    /// End a drain: the executor takes new work again.
    Undrain {
        /// The executor's id (see `colony cluster executors`).
        executor: u64,
    },
    /// Backups: save one from the leader, inspect one. Restore with `colony server --bootstrap
    /// --restore FILE`.
    #[command(subcommand)]
    Snapshot(crate::snapshot_cmd::SnapshotCommand),
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a join token; prints it. Only its hash is stored in the cluster.
    Create {
        /// What it admits: executor, server or learner.
        #[arg(long, default_value = "executor")]
        kind: String,
        /// How long the token admits (e.g. 1h; at most 7 days).
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
    },
}

/// An executor as scripts read it.
#[derive(Debug, Serialize)]
pub struct ExecutorJson {
    pub id: u64,
    pub name: String,
    pub state: String,
    pub capacity: ResourcesJson,
    pub allocated: ResourcesJson,
    pub labels: BTreeMap<String, String>,
    pub capabilities: Vec<String>,
    pub tasks: Vec<u64>,
    pub drain_deadline_unix_ms: Option<u64>,
    pub reason: Option<String>,
    pub heartbeat_age_ms: Option<u64>,
}

#[derive(Debug, Serialize)]
pub struct ResourcesJson {
    pub cpu_millis: u64,
    pub memory_bytes: u64,
    pub gpus: u32,
    pub custom: BTreeMap<String, u64>,
}

impl From<Option<pb::Resources>> for ResourcesJson {
    fn from(r: Option<pb::Resources>) -> Self {
        let r = r.unwrap_or_default();
        ResourcesJson {
            cpu_millis: r.cpu_millis,
            memory_bytes: r.memory_bytes,
            gpus: r.gpus,
            custom: r.custom.into_iter().collect(),
        }
    }
}

impl From<pb::Executor> for ExecutorJson {
    fn from(e: pb::Executor) -> Self {
        let mut capabilities = e.capabilities;
        capabilities.sort();
        ExecutorJson {
            id: e.id,
            name: e.name,
            state: e.state,
            capacity: e.capacity.into(),
            allocated: e.allocated.into(),
            labels: e.labels.into_iter().collect(),
            capabilities,
            tasks: e.tasks,
            drain_deadline_unix_ms: e.drain_deadline_unix_ms,
            reason: e.reason,
            heartbeat_age_ms: e.heartbeat_age_ms,
        }
    }
}

/// A new join token of `kind` (executor, server, learner) that lives for `ttl`.
pub async fn create_join_token(
    client: &Client,
    ttl: Duration,
    kind: &str,
) -> Result<pb::CreateJoinTokenResponse> {
    let request = pb::CreateJoinTokenRequest {
        ttl_ms: u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX),
        kind: kind.to_owned(),
    };
    Ok(client
        .call("create join token", |mut c| {
            let request = request.clone();
            async move { c.create_join_token(request).await }
        })
        .await?)
}

pub async fn list_executors(client: &Client, stale: bool) -> Result<Vec<ExecutorJson>> {
    let request = pb::ListExecutorsRequest {
        consistency: stale.then_some(pb::ReadConsistency { stale: true }),
    };
    let response = client
        .call("list executors", |mut c| async move { c.list_executors(request).await })
        .await?;
    Ok(response.executors.into_iter().map(ExecutorJson::from).collect())
}

pub fn print_executors(executors: &[ExecutorJson]) -> Result<()> {
    use colony_core::resources::{format_cpu_millis, format_memory_bytes};
    let mut table = output::table([
        "ID",
        "NAME",
        "STATE",
        "CPU",
        "MEMORY",
        "GPUS",
        "TASKS",
        "HEARTBEAT",
        "LABELS",
    ]);
    for e in executors {
        let labels: Vec<String> = e.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        table.add_row(vec![
            e.id.to_string(),
            e.name.clone(),
            e.state.clone(),
            format!(
                "{}/{}",
                format_cpu_millis(e.allocated.cpu_millis),
                format_cpu_millis(e.capacity.cpu_millis)
            ),
            format!(
                "{}/{}",
                format_memory_bytes(e.allocated.memory_bytes),
                format_memory_bytes(e.capacity.memory_bytes)
            ),
            format!("{}/{}", e.allocated.gpus, e.capacity.gpus),
            e.tasks.len().to_string(),
            e.heartbeat_age_ms
                .map_or_else(|| "-".to_owned(), |ms| format!("{:.1}s ago", ms as f64 / 1000.0)),
            if labels.is_empty() { "-".to_owned() } else { labels.join(",") },
        ]);
    }
    output::print_table(table)
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
    pub executors_by_state: BTreeMap<String, u64>,
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
                .map(|m| MemberJson {
                    id: m.id,
                    addr: m.addr,
                    role: m.role,
                    reachable: m.reachable,
                    matched_index: m.matched_index,
                })
                .collect(),
            task_count: s.task_count,
            tasks_by_state: s.tasks_by_state.into_iter().collect(),
            rss_bytes: s.rss_bytes,
            version: s.version,
            executors_by_state: s.executors_by_state.into_iter().collect(),
        }
    }
}

pub async fn run(command: ClusterCommand, global: &GlobalArgs) -> Result<()> {
    // Inspecting a backup needs no server and no token.
    let command = match command {
        ClusterCommand::Snapshot(command) => {
            return crate::snapshot_cmd::run(command, global).await
        }
        command => command,
    };
    let client = global.client()?;
    match command {
        ClusterCommand::Snapshot(_) => {}
        ClusterCommand::Status { watch: true, interval } => {
            watch_status(&client, interval, global.output).await?
        }
        ClusterCommand::Status { watch: false, .. } => {
            let status = StatusJson::from(cluster_status(&client).await?);
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
                    output::out(format!(
                        "removed node {id}; voters now {} (leader {})",
                        voters.join(", "),
                        response.leader_id
                    ))?;
                }
                OutputFormat::Json => output::print_json(&serde_json::json!({
                    "removed": id,
                    "leader_id": response.leader_id,
                    "voters": response.voters,
                }))?,
            }
        }
        ClusterCommand::Ca => {
            let response = client
                .call(
                    "cluster CA",
                    |mut c| async move { c.cluster_ca(pb::ClusterCaRequest {}).await },
                )
                .await?;
            match global.output {
                OutputFormat::Table => {
                    output::out(response.cert_pem.trim_end())?;
                    eprintln!("sha256 {}", response.sha256);
                }
                OutputFormat::Json => output::print_json(&serde_json::json!({
                    "cert_pem": response.cert_pem,
                    "sha256": response.sha256,
                }))?,
            }
        }
        ClusterCommand::Undrain { executor } => {
            let request = pb::UndrainExecutorRequest { id: executor };
            let response = client
                .call("undrain executor", |mut c| async move { c.undrain_executor(request).await })
                .await?;
            let executor = ExecutorJson::from(response.executor.unwrap_or_default());
            match global.output {
                OutputFormat::Table => {
                    output::out(format!("executor {} is {}", executor.id, executor.state))?
                }
                OutputFormat::Json => output::print_json(&executor)?,
            }
        }
        ClusterCommand::Token(TokenCommand::Create { kind, ttl }) => {
            let response = create_join_token(&client, ttl, &kind).await?;
            match global.output {
                OutputFormat::Table => {
                    output::out(&response.token)?;
                    eprintln!(
                        "a {kind} join token; expires in {}; pass it to `colony {kind} --token`",
                        humantime::format_duration(ttl)
                    );
                }
                OutputFormat::Json => output::print_json(
                    &serde_json::json!({ "token": response.token, "expires_unix_ms": response.expires_unix_ms }),
                )?,
            }
        }
        ClusterCommand::Executors { stale } => {
            let executors = list_executors(&client, stale).await?;
            match global.output {
                OutputFormat::Table => print_executors(&executors)?,
                OutputFormat::Json => output::print_json(&executors)?,
            }
        }
        ClusterCommand::Drain { executor, deadline } => {
            let deadline_ms = u64::try_from(deadline.as_millis()).unwrap_or(u64::MAX);
            let request = pb::DrainExecutorRequest { id: executor, deadline_ms };
            let response = client
                .call("drain executor", |mut c| async move { c.drain_executor(request).await })
                .await?;
            let executor = response
                .executor
                .map(ExecutorJson::from)
                .ok_or_else(|| anyhow::anyhow!("the server's answer has no executor"))?;
            match global.output {
                OutputFormat::Table => output::out(format!(
                    "executor {} ({}) is draining: {} task(s) may run up to {} more",
                    executor.id,
                    executor.name,
                    executor.tasks.len(),
                    humantime::format_duration(deadline)
                ))?,
                OutputFormat::Json => output::print_json(&executor)?,
            }
        }
    }
    Ok(())
}

pub async fn cluster_status(client: &Client) -> Result<pb::ClusterStatusResponse> {
    Ok(client
        .call("cluster status", |mut c| async move {
            c.cluster_status(pb::ClusterStatusRequest {}).await
        })
        .await?)
}

/// Rates between two status answers.
#[derive(Debug, Serialize)]
struct Throughput {
    tasks_per_second: f64,
    entries_per_second: f64,
}

/// `cluster status --watch`: redraws the status with queue depth and throughput until Ctrl-C.
async fn watch_status(client: &Client, interval: Duration, format: OutputFormat) -> Result<()> {
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
                    |t| {
                        format!(
                            "{:.1} tasks/s submitted, {:.1} log entries/s committed",
                            t.tasks_per_second, t.entries_per_second
                        )
                    },
                );
                output::out("")?;
                output::out(format!("queue depth {pending}  throughput {rates}"))?;
                output::out(format!(
                    "refreshing every {}; Ctrl-C to stop",
                    humantime::format_duration(interval)
                ))?;
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
    let by_state: Vec<String> = s
        .tasks_by_state
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(state, n)| format!("{state} {n}"))
        .collect();
    if by_state.is_empty() {
        output::out(format!("tasks {}", s.task_count))?;
    } else {
        output::out(format!("tasks {} ({})", s.task_count, by_state.join(", ")))?;
    }
    let executors: Vec<String> =
        s.executors_by_state.iter().map(|(state, n)| format!("{state} {n}")).collect();
    if !executors.is_empty() {
        output::out(format!("executors {}", executors.join(", ")))?;
    }
    output::out("")?;
    print_members(&s.members)
}
