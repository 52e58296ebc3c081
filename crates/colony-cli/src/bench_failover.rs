//! `colony bench failover`: how long a cluster goes without an acknowledged write when its leader
//! dies (`--signal kill`, `kill -9`) or is stopped (`--signal term`). It starts its own cluster of real servers (this executable, default Raft settings)
//! in a temporary directory, keeps writers submitting through every server, stops the leader,
//! and times the window without an acknowledged write: from the signal (or, while a stopping
//! leader still answers, its last answer) to the first write sent after the old process exited
//! that a survivor acknowledges. The stopped server is restarted and caught up before the next
//! trial.

use crate::bench::machine;
use crate::dev::{self, Server};
use crate::output::{self, OutputFormat};
use crate::GlobalArgs;
use anyhow::{anyhow, bail, Context as _, Result};
use clap::{Args, ValueEnum};
use colony_client::{lazy_channel, Auth, Client, ClientConfig};
use colony_proto::pb;
use colony_proto::pb::admin_client::AdminClient;
use indicatif::{ProgressBar, ProgressFinish};
use nix::sys::signal::Signal;
use serde::Serialize;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// How long one trial may take before the cluster counts as not recovered.
const TRIAL_TIMEOUT: Duration = Duration::from_secs(30);
/// Each writer's request deadline: a request to a dead server must not hold a writer long.
const REQUEST_TIMEOUT: Duration = Duration::from_millis(500);
/// Writers submitting at once, spread over the servers.
const WRITERS: usize = 6;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StopSignal {
    /// `kill -9`: no chance to say goodbye.
    Kill,
    /// SIGTERM: the leader stops cleanly, handing leadership to a caught-up voter first.
    Term,
}

#[derive(Debug, Args)]
pub struct FailoverBenchArgs {
    /// Leaders stopped, one per trial.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=100))]
    trials: u64,
    /// How the leader is stopped.
    #[arg(long, value_enum, default_value_t = StopSignal::Kill)]
    signal: StopSignal,
    /// Servers in the benchmark's cluster.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(3..=7))]
    servers: u64,
    /// The first server's port; the others follow, metrics ports 1000 above.
    #[arg(long, default_value_t = 17601)]
    base_port: u16,
    /// A flag for every server (repeatable), e.g. `--server-arg=--heartbeat-ms=50`, to compare
    /// Raft settings; by default the servers run with their defaults.
    #[arg(long = "server-arg", allow_hyphen_values = true)]
    server_args: Vec<String>,
}

/// One write a writer saw acknowledged: when it was sent and when the answer came.
#[derive(Clone, Copy)]
struct Ack {
    sent: Instant,
    answered: Instant,
}

#[derive(Debug, Serialize)]
struct Trial {
    stopped_node: u64,
    /// How long no write was acknowledged.
    unavailable_ms: f64,
    new_leader: Option<u64>,
    /// From the signal until a survivor said it leads.
    elected_ms: Option<f64>,
}

#[derive(Debug, Serialize)]
struct Report {
    machine: crate::bench::Machine,
    signal: StopSignal,
    servers: u64,
    trials: Vec<Trial>,
    p50_ms: f64,
    p90_ms: f64,
    min_ms: f64,
    max_ms: f64,
}

pub async fn run(args: FailoverBenchArgs, global: &GlobalArgs) -> Result<()> {
    let dir = tempfile::Builder::new().prefix("colony-failover-").tempdir()?;
    let exe = std::env::current_exe().context("cannot find this executable")?;
    let mut servers = dev::plan(dir.path(), args.base_port, args.servers)?;
    let spinner = ProgressBar::new_spinner().with_finish(ProgressFinish::AndClear);
    spinner.enable_steady_tick(Duration::from_millis(100));
    let deadline = Instant::now() + Duration::from_secs(60);
    let token_file = dir.path().join("token");
    let auth =
        dev::form_cluster(&mut servers, &exe, &args.server_args, &token_file, deadline, &spinner)
            .await?;
    let endpoints: Vec<String> = servers.iter().map(|s| s.addr.clone()).collect();
    let wanted = servers.len();
    dev::wait_until(&mut servers, &endpoints, &auth, deadline, &spinner, |s| {
        let voters = s.members.iter().filter(|m| m.role == "voter").count();
        (voters != wanted).then(|| format!("{voters} of {wanted} servers are voters"))
    })
    .await?;

    let acks: Arc<Mutex<Vec<Ack>>> = Arc::default();
    let mut writers = tokio::task::JoinSet::new();
    for index in 0..WRITERS {
        let addr = endpoints[index % endpoints.len()].clone();
        let channel = lazy_channel(&addr, &ClientConfig::new(REQUEST_TIMEOUT), &auth)?;
        writers.spawn(write(AdminClient::new(channel), index, acks.clone()));
    }
    let mut trials = Vec::new();
    let result = async {
        for trial in 1..=args.trials {
            spinner.set_message(format!("trial {trial} of {}", args.trials));
            let trial = one_trial(&mut servers, &exe, &args, &endpoints, &auth, &acks).await?;
            trials.push(trial);
        }
        anyhow::Ok(())
    }
    .await;
    writers.abort_all();
    drop(spinner);
    // The figures stand whether or not the cluster stops cleanly; a server that does not is
    // reported, after them.
    let stopped = dev::stop(&mut servers).await;
    result?;

    let mut sorted: Vec<f64> = trials.iter().map(|t| t.unavailable_ms).collect();
    sorted.sort_by(f64::total_cmp);
    let at = |q: f64| sorted[((sorted.len() - 1) as f64 * q).round() as usize];
    let report = Report {
        machine: machine(),
        signal: args.signal,
        servers: args.servers,
        p50_ms: at(0.5),
        p90_ms: at(0.9),
        min_ms: sorted[0],
        max_ms: sorted[sorted.len() - 1],
        trials,
    };
    let printed = match global.output {
        OutputFormat::Json => output::print_json(&report),
        OutputFormat::Table => {
            let mut table = output::table([
                "TRIAL",
                "STOPPED",
                "NEW LEADER",
                "ELECTED AFTER (ms)",
                "NO WRITES FOR (ms)",
            ]);
            for (i, t) in report.trials.iter().enumerate() {
                let leader = t.new_leader.map_or("-".to_owned(), |l| l.to_string());
                let elected = t.elected_ms.map_or("-".to_owned(), |ms| format!("{ms:.0}"));
                let ms = format!("{:.0}", t.unavailable_ms);
                let row =
                    vec![(i + 1).to_string(), t.stopped_node.to_string(), leader, elected, ms];
                table.add_row(row);
            }
            output::print_table(table)?;
            output::print_fields(&[
                (
                    "machine",
                    format!("{} ({} cores)", report.machine.cpu_model, report.machine.cores),
                ),
                ("leader stopped with", format!("{:?}", report.signal).to_lowercase()),
                (
                    "no acknowledged write",
                    format!(
                        "p50 {:.0} ms  p90 {:.0} ms  min {:.0} ms  max {:.0} ms over {} trials",
                        report.p50_ms,
                        report.p90_ms,
                        report.min_ms,
                        report.max_ms,
                        report.trials.len()
                    ),
                ),
            ])
        }
    };
    printed?;
    stopped.context("stopping the benchmark's cluster")
}

/// Submits one small task after another through one server, recording each acknowledgement.
async fn write(
    mut client: AdminClient<colony_client::Channel>,
    index: usize,
    acks: Arc<Mutex<Vec<Ack>>>,
) {
    let spec = pb::TaskSpec {
        // Nothing runs them: the benchmark has no executors.
        labels: [("zone".to_owned(), "nowhere".to_owned())].into(),
        ..crate::bench::small_task("failover-probe")
    };
    for n in 0u64.. {
        let mut spec = spec.clone();
        spec.idempotency_key = Some(format!("failover-{index}-{n}"));
        let sent = Instant::now();
        let call = client.submit_task(pb::SubmitTaskRequest { spec: Some(spec) });
        match tokio::time::timeout(REQUEST_TIMEOUT, call).await {
            Ok(Ok(_)) => {
                let ack = Ack { sent, answered: Instant::now() };
                acks.lock().unwrap_or_else(|p| p.into_inner()).push(ack);
            }
            // Refused or unanswered while there is no leader: try again at once, a little
            // later if the server answered at once (it is down or has no leader).
            _ => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}

async fn one_trial(
    servers: &mut [Server],
    exe: &std::path::Path,
    args: &FailoverBenchArgs,
    endpoints: &[String],
    auth: &Auth,
    acks: &Arc<Mutex<Vec<Ack>>>,
) -> Result<Trial> {
    let client = Client::new(endpoints, Duration::from_secs(5), auth)?;
    let leader = crate::cluster_cmd::cluster_status(&client)
        .await?
        .leader_id
        .ok_or_else(|| anyhow!("no leader before the trial"))?;
    let index = servers
        .iter()
        .position(|s| s.id == leader)
        .ok_or_else(|| anyhow!("the leader {leader} is not one of the benchmark's servers"))?;
    let signal = match args.signal {
        StopSignal::Kill => Signal::SIGKILL,
        StopSignal::Term => Signal::SIGTERM,
    };
    let survivors: Vec<String> =
        endpoints.iter().filter(|e| **e != servers[index].addr).cloned().collect();
    let elected = tokio::spawn(first_leader(survivors.clone(), auth.clone(), leader));
    // The window without acknowledged writes starts at the signal, or, while a stopping leader
    // still answers, at its last answer; it ends with the first write sent after the old process
    // exited that a survivor acknowledges.
    let stopped_at = Instant::now();
    servers[index].stop_with(signal).await?;
    let exited_at = Instant::now();
    let first = loop {
        let first = acks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|a| a.sent >= exited_at)
            .map(|a| a.answered)
            .min();
        if let Some(first) = first {
            break first;
        }
        if stopped_at.elapsed() > TRIAL_TIMEOUT {
            bail!("no write was acknowledged within {TRIAL_TIMEOUT:?} of stopping the leader");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let last_answer = acks
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .map(|a| a.answered)
        .filter(|&answered| answered <= exited_at)
        .max();
    let start = last_answer.map_or(stopped_at, |last| last.max(stopped_at));
    let unavailable_ms = first.duration_since(start).as_secs_f64() * 1000.0;
    let (new_leader, elected_at) = elected.await?.unzip();
    let elected_ms = elected_at.map(|at| at.duration_since(stopped_at).as_secs_f64() * 1000.0);
    // Back to full strength before the next trial: restarted, and caught up with the leader.
    servers[index].spawn(exe, &args.server_args)?;
    let restarted = servers[index].addr.clone();
    let caught_up = Instant::now() + TRIAL_TIMEOUT;
    loop {
        let mine = Client::new(std::slice::from_ref(&restarted), Duration::from_secs(1), auth)?;
        let theirs = crate::cluster_cmd::cluster_status(&client).await.ok();
        let own = crate::cluster_cmd::cluster_status(&mine).await.ok();
        let done = match (theirs, own) {
            (Some(leader), Some(own)) => {
                own.node_id == servers[index].id
                    && own.leader_id.is_some()
                    && own.applied_index >= leader.commit_index
            }
            _ => false,
        };
        if done {
            break;
        }
        if Instant::now() > caught_up {
            bail!(
                "server {} did not catch up within {TRIAL_TIMEOUT:?} of its restart",
                servers[index].id
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    acks.lock().unwrap_or_else(|p| p.into_inner()).clear();
    Ok(Trial { stopped_node: leader, unavailable_ms, new_leader, elected_ms })
}

/// The first survivor to say it leads (another than `old`), and when: asked every 5 ms.
async fn first_leader(survivors: Vec<String>, auth: Auth, old: u64) -> Option<(u64, Instant)> {
    let config = ClientConfig::new(Duration::from_millis(200));
    let clients: Vec<AdminClient<colony_client::Channel>> = survivors
        .iter()
        .filter_map(|addr| lazy_channel(addr, &config, &auth).ok().map(AdminClient::new))
        .collect();
    let give_up = Instant::now() + TRIAL_TIMEOUT;
    while Instant::now() < give_up {
        for client in &clients {
            let mut client = client.clone();
            let asked = client.cluster_status(pb::ClusterStatusRequest {});
            if let Ok(Ok(status)) = tokio::time::timeout(Duration::from_millis(200), asked).await {
                let status = status.into_inner();
                if status.state == "leader" && status.node_id != old {
                    return Some((status.node_id, Instant::now()));
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Harness {
        #[command(flatten)]
        args: FailoverBenchArgs,
    }

    fn parse(argv: &[&str]) -> Result<FailoverBenchArgs, clap::Error> {
        Harness::try_parse_from(std::iter::once("failover").chain(argv.iter().copied()))
            .map(|h| h.args)
    }

    #[test]
    fn arguments_are_bounded() {
        let args = parse(&["--signal", "term", "--server-arg=--heartbeat-ms=50"]);
        assert!(args.is_ok_and(|a| a.signal == StopSignal::Term
            && a.trials == 10
            && a.server_args == ["--heartbeat-ms=50"]));
        for bad in
            [["--trials", "0"], ["--trials", "101"], ["--servers", "2"], ["--signal", "stop"]]
        {
            assert!(parse(&bad).is_err(), "{bad:?} was accepted");
        }
    }
}
