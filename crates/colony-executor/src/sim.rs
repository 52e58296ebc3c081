//! Simulated executors for the scheduling benchmark: they join, connect and report like real
//! ones (the same link code), but run nothing: each assignment is noted, held for a fixed time
//! and reported successful. Many share one QUIC endpoint, so a thousand fit in one process.

use crate::attempt::{AttemptResult, KillSignal, Outcome};
use crate::identity::Credentials;
use crate::link::{Launcher, Link, Profile};
use crate::metrics::Metrics;
use anyhow::Context;
use colony_core::{Resources, TaskId, TaskSpec};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Rounds over the server list a simulated executor tries before its join fails.
const JOIN_ROUNDS_MAX: u32 = 20;
/// Time a join's endpoint gets to close its connection cleanly.
const ENDPOINT_CLOSE_MAX: Duration = Duration::from_millis(500);

/// What a simulated executor tells the benchmark.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SimEvent {
    /// An assignment arrived (each attempt once; a repeated `Assign` is not an event).
    Assigned { task_id: TaskId, name: String, at: Instant },
    /// An attempt's hold ended; its success report is sent next.
    Finished { task_id: TaskId, name: String, at: Instant },
}

/// Joins the cluster with `token` as `name` and returns the credentials to run with.
pub async fn join(servers: &[String], token: &str, name: &str) -> anyhow::Result<Credentials> {
    let endpoint = colony_quic::client_endpoint().context("cannot open a QUIC endpoint")?;
    let joined = crate::join::join(&endpoint, servers, token, name, Some(JOIN_ROUNDS_MAX)).await;
    endpoint.close(colony_quic::CloseCode::Ok.into(), b"joined");
    let _ = tokio::time::timeout(ENDPOINT_CLOSE_MAX, endpoint.wait_idle()).await;
    joined.with_context(|| format!("simulated executor {name} cannot join"))
}

/// What a simulated attempt does: how long it holds its resources and the peak memory it
/// reports, decided from the task and the executor's capacity.
pub type Behaviour = Arc<dyn Fn(&TaskSpec, &Resources) -> SimRun + Send + Sync>;

#[derive(Clone, Copy, Debug)]
pub struct SimRun {
    pub hold: Duration,
    pub peak_memory_bytes: Option<u64>,
    /// The size of each output a workflow step declares, written as that many bytes.
    pub output_bytes: usize,
}

/// Every attempt holds `hold`, reports no memory, and writes each declared output as
/// `output_bytes` bytes.
pub fn fixed(hold: Duration, output_bytes: usize) -> Behaviour {
    Arc::new(move |_, _| SimRun { hold, peak_memory_bytes: None, output_bytes })
}

/// A simulated executor.
pub struct SimExecutor;

impl SimExecutor {
    /// Connects with mutual TLS (following redirects), says Hello, heartbeats, and answers every
    /// new assignment with `Started` at once and `Finished(SUCCEEDED)` when `behaviour` says. Runs until
    /// the task running it is dropped, or returns an error if the cluster disowns it.
    pub async fn run(
        endpoint: quinn::Endpoint,
        servers: Vec<String>,
        creds: Credentials,
        capacity: Resources,
        labels: BTreeMap<String, String>,
        behaviour: Behaviour,
        events: mpsc::UnboundedSender<SimEvent>,
    ) -> anyhow::Result<()> {
        let client =
            colony_quic::mutual_client_config(&creds.ca_pem, &creds.cert_pem, &creds.key_pem)
                .with_context(|| {
                    format!(
                        "simulated executor {}: the credentials do not form a TLS configuration",
                        creds.executor_id
                    )
                })?;
        let metrics = Arc::new(Metrics::new(&capacity)?);
        let link = Link {
            servers,
            profile: Profile {
                executor_id: creds.executor_id,
                name: format!("sim-{}", creds.executor_id),
                capacity: capacity.clone(),
                labels,
                capabilities: Default::default(),
            },
            launcher: Launcher::Simulate { behaviour, capacity, events },
            metrics,
            journal: None,
            ports: crate::health::Ports::new(crate::health::PORT_RANGE_DEFAULT),
            advertise_host: None,
        };
        link.run(&endpoint, &client, std::future::pending())
            .await
            .with_context(|| format!("simulated executor {}", creds.executor_id))?;
        Ok(())
    }
}

/// A simulated attempt: announce it, hold it, succeed with its declared outputs (unless killed
/// first).
pub(crate) async fn hold(
    task_id: TaskId,
    name: &str,
    run: SimRun,
    declared: &BTreeSet<String>,
    events: &mpsc::UnboundedSender<SimEvent>,
    kill: KillSignal,
) -> AttemptResult {
    // A benchmark that stopped listening still wants its executors to behave.
    let _ = events.send(SimEvent::Assigned { task_id, name: name.to_owned(), at: Instant::now() });
    let outputs =
        declared.iter().map(|name| (name.clone(), vec![b'x'; run.output_bytes])).collect();
    tokio::select! {
        () = tokio::time::sleep(run.hold) => {
            let _ = events.send(SimEvent::Finished { task_id, name: name.to_owned(), at: Instant::now() });
            AttemptResult { peak_memory_bytes: run.peak_memory_bytes, outputs, ..AttemptResult::succeeded() }
        }
        _ = kill => AttemptResult::ended(Outcome::Killed, "killed on request".to_owned()),
    }
}
