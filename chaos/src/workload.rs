//! The workload: concurrent clients spread over every server submit tasks under their own
//! idempotency keys (and submit them again after an unknown outcome), read tasks and executor
//! allocations linearizably, and cancel tasks. Each task is a real process that appends its
//! start and end, with its fencing token, to a shared ledger.

use crate::history::{obs_of, Call, ExecutorView, History, Op, Outcome};
use colony_client::Channel;
use colony_proto::pb::admin_client::AdminClient;
use colony_proto::pb::{self, ReadConsistency};
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tonic::{Code, Status};

/// A call that has not answered in this long has an unknown outcome.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Tasks are read and cancelled mostly among the most recent ones, where the races are.
const RECENT_KEYS: usize = 64;

/// A TLS channel to one server with `auth`'s token, reconnecting as needed.
pub fn channel(addr: &str, auth: &colony_client::Auth) -> anyhow::Result<Channel> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(CONNECT_TIMEOUT);
    Ok(auth.channel(endpoint))
}

/// The task a key stands for; the same key always gives the same spec, so submitting it again
/// is idempotent.
pub fn spec(key: &str, number: u64, ledger: &Path) -> pb::TaskSpec {
    let sleep_ms = 100 + (number * 37) % 400;
    let ledger = ledger.display();
    let script = format!(
        "echo \"start $COLONY_TASK_ID $COLONY_FENCING_TOKEN $COLONY_EXECUTOR_ID\" >> {ledger}; sleep {}.{:03}; echo \"end $COLONY_TASK_ID $COLONY_FENCING_TOKEN $COLONY_EXECUTOR_ID\" >> {ledger}",
        sleep_ms / 1000,
        sleep_ms % 1000
    );
    pb::TaskSpec {
        name: key.to_owned(),
        namespace: "chaos".to_owned(),
        resources: Some(pb::Resources {
            cpu_millis: 250 + (number * 53) % 4 * 250,
            memory_bytes: (64 + (number * 29) % 8 * 64) << 20,
            ..Default::default()
        }),
        priority: (number % 100) as u32,
        timeout_ms: Some(30_000),
        max_retries: 20,
        run: Some(pb::task_spec::Run::Process(pb::ProcessRun {
            program: "/bin/sh".into(),
            args: vec!["-c".into(), script],
            env: Default::default(),
        })),
        idempotency_key: Some(key.to_owned()),
        ..Default::default()
    }
}

/// Keys submitted so far, and the task ids learned for them.
#[derive(Default)]
pub struct Pool {
    keys: Vec<(String, u64)>,
    ids: BTreeMap<String, u64>,
}

impl Pool {
    fn new_key(&mut self, prefix: &str) -> (String, u64) {
        let number = self.keys.len() as u64;
        let key = format!("{prefix}{number}");
        self.keys.push((key.clone(), number));
        (key, number)
    }

    fn learn(&mut self, key: &str, id: u64) {
        self.ids.insert(key.to_owned(), id);
    }

    fn recent_id(&self, rng: &mut StdRng) -> Option<(String, u64)> {
        let known: Vec<(&String, &u64)> = self
            .keys
            .iter()
            .rev()
            .take(RECENT_KEYS)
            .filter_map(|(k, _)| self.ids.get_key_value(k))
            .collect();
        if known.is_empty() {
            return None;
        }
        let (key, id) = known[rng.gen_range(0..known.len())];
        Some((key.clone(), *id))
    }

    fn unacknowledged(&self, rng: &mut StdRng) -> Option<(String, u64)> {
        let waiting: Vec<&(String, u64)> =
            self.keys.iter().filter(|(k, _)| !self.ids.contains_key(k)).collect();
        (!waiting.is_empty()).then(|| waiting[rng.gen_range(0..waiting.len())].clone())
    }
}

/// A server error that proves the request was not carried out: refused before it was proposed.
fn refused_before_proposing(status: &Status) -> bool {
    status.code() == Code::Unavailable
        && [
            "no leader is elected right now",
            "this server is no longer the leader",
            "is not in this server's membership view",
        ]
        .iter()
        .any(|m| status.message().contains(m))
}

async fn timed<T>(
    call: impl std::future::Future<Output = Result<tonic::Response<T>, Status>>,
) -> Result<T, Status> {
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(answer) => answer.map(tonic::Response::into_inner),
        Err(_) => Err(Status::deadline_exceeded("no answer in time")),
    }
}

fn describe(status: &Status) -> String {
    format!("{:?}: {}", status.code(), status.message())
}

/// Everything a client needs; cloned into each.
#[derive(Clone)]
pub struct Workload {
    pub history: History,
    pub pool: Arc<Mutex<Pool>>,
    pub ledger: PathBuf,
    /// Probe submissions started and not yet awaited.
    pub probes: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl Workload {
    fn pool(&self) -> std::sync::MutexGuard<'_, Pool> {
        self.pool.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub async fn submit(
        &self,
        client: u64,
        server: &str,
        channel: &Channel,
        key: String,
        number: u64,
    ) -> Op {
        let pending = self.history.invoke(client, server, Call::Submit, Some(key.clone()), None);
        let request = pb::SubmitTaskRequest { spec: Some(spec(&key, number, &self.ledger)) };
        let outcome = match timed(AdminClient::new(channel.clone()).submit_task(request)).await {
            Ok(answer) => match answer.task.as_ref().and_then(|t| obs_of(t).map(|obs| (t.id, obs)))
            {
                Some((id, obs)) => {
                    self.pool().learn(&key, id);
                    Outcome::Submitted { id, existing: answer.existing, obs }
                }
                None => Outcome::Unknown { error: "the answer carried no readable task".into() },
            },
            Err(status)
                if status.code() == Code::InvalidArgument || refused_before_proposing(&status) =>
            {
                Outcome::Fail { error: describe(&status) }
            }
            Err(status) => Outcome::Unknown { error: describe(&status) },
        };
        self.history.complete(pending, outcome)
    }

    async fn read(&self, client: u64, server: &str, channel: &Channel, key: String, id: u64) -> Op {
        let pending = self.history.invoke(client, server, Call::Read, Some(key), Some(id));
        let request =
            pb::GetTaskRequest { id, consistency: Some(ReadConsistency { stale: false }) };
        let outcome = match timed(AdminClient::new(channel.clone()).get_task(request)).await {
            Ok(answer) => match answer.task.as_ref().and_then(obs_of) {
                Some(obs) => Outcome::Read { obs: Some(obs) },
                None => Outcome::Fail { error: "the answer carried no readable task".into() },
            },
            Err(status) if status.code() == Code::NotFound => Outcome::Read { obs: None },
            // A read that failed changed nothing, whatever the reason.
            Err(status) => Outcome::Fail { error: describe(&status) },
        };
        self.history.complete(pending, outcome)
    }

    async fn cancel(
        &self,
        client: u64,
        server: &str,
        channel: &Channel,
        key: String,
        id: u64,
    ) -> Op {
        let pending = self.history.invoke(client, server, Call::Cancel, Some(key), Some(id));
        let request = pb::CancelTaskRequest { id, reason: "chaos workload".into() };
        let outcome = match timed(AdminClient::new(channel.clone()).cancel_task(request)).await {
            Ok(answer) => match answer.task.as_ref().and_then(obs_of) {
                Some(obs) => Outcome::Cancelled { obs },
                None => Outcome::Unknown { error: "the answer carried no readable task".into() },
            },
            Err(status) if status.code() == Code::FailedPrecondition => Outcome::CancelRefused,
            Err(status) if status.code() == Code::NotFound => Outcome::CancelNotFound,
            Err(status) if refused_before_proposing(&status) => {
                Outcome::Fail { error: describe(&status) }
            }
            Err(status) => Outcome::Unknown { error: describe(&status) },
        };
        self.history.complete(pending, outcome)
    }

    async fn executors(&self, client: u64, server: &str, channel: &Channel) -> Op {
        let pending = self.history.invoke(client, server, Call::Executors, None, None);
        let request =
            pb::ListExecutorsRequest { consistency: Some(ReadConsistency { stale: false }) };
        let outcome = match timed(AdminClient::new(channel.clone()).list_executors(request)).await {
            Ok(answer) => Outcome::Executors {
                executors: answer.executors.iter().map(executor_view).collect(),
            },
            Err(status) => Outcome::Fail { error: describe(&status) },
        };
        self.history.complete(pending, outcome)
    }

    /// One client: picks a call, makes it, thinks a little, until told to stop.
    pub async fn client(
        self,
        client: u64,
        server: String,
        channel: Channel,
        seed: u64,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut rng = StdRng::seed_from_u64(seed ^ client.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        while !*stop.borrow() {
            let roll: f64 = rng.gen();
            let picked = {
                let mut pool = self.pool();
                if roll < 0.15 {
                    Some((Call::Submit, pool.new_key("k"), 0))
                } else if roll < 0.20 {
                    pool.unacknowledged(&mut rng).map(|k| (Call::Submit, k, 0))
                } else if roll < 0.75 {
                    pool.recent_id(&mut rng).map(|(key, id)| (Call::Read, (key, 0), id))
                } else if roll < 0.90 {
                    pool.recent_id(&mut rng).map(|(key, id)| (Call::Cancel, (key, 0), id))
                } else {
                    Some((Call::Executors, (String::new(), 0), 0))
                }
            };
            match picked {
                Some((Call::Submit, (key, number), _)) => {
                    drop(self.submit(client, &server, &channel, key, number).await)
                }
                Some((Call::Read, (key, _), id)) => {
                    drop(self.read(client, &server, &channel, key, id).await)
                }
                Some((Call::Cancel, (key, _), id)) => {
                    drop(self.cancel(client, &server, &channel, key, id).await)
                }
                Some((Call::Executors, _, _)) => {
                    drop(self.executors(client, &server, &channel).await)
                }
                None => {}
            }
            let think = Duration::from_millis(rng.gen_range(20..60));
            tokio::select! {
                _ = tokio::time::sleep(think) => {}
                _ = stop.changed() => {}
            }
        }
    }

    /// Submits a probe task every 100 ms, to each server in turn, without waiting for earlier
    /// ones, until one is acknowledged: how long the cluster took to take writes again (a probe
    /// stuck on an unreachable leader does not hold the measurement up). None if none was within
    /// `limit`. Probes still in flight are left to finish; [`Workload::settle`] waits for them.
    pub async fn probe(&self, servers: &[(String, Channel)], limit: Duration) -> Option<Duration> {
        let started = tokio::time::Instant::now();
        let (acked_tx, mut acked_rx) = tokio::sync::mpsc::unbounded_channel();
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        let mut turn = 0usize;
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if started.elapsed() >= limit {
                        return None;
                    }
                    let (name, channel) = servers[turn % servers.len()].clone();
                    turn += 1;
                    let (key, number) = self.pool().new_key("probe-");
                    let workload = self.clone();
                    let acked_tx = acked_tx.clone();
                    let probe = tokio::spawn(async move {
                        let op = workload.submit(0, &name, &channel, key, number).await;
                        if matches!(op.outcome, Outcome::Submitted { .. }) {
                            let _ = acked_tx.send(tokio::time::Instant::now());
                        }
                    });
                    self.probes.lock().unwrap_or_else(|p| p.into_inner()).push(probe);
                }
                Some(at) = acked_rx.recv() => return Some(at.duration_since(started)),
            }
        }
    }

    /// Waits for every probe still in flight, so the history holds its outcome.
    pub async fn settle(&self) {
        let probes: Vec<_> =
            std::mem::take(&mut *self.probes.lock().unwrap_or_else(|p| p.into_inner()));
        for probe in probes {
            let _ = probe.await;
        }
    }
}

pub fn executor_view(executor: &pb::Executor) -> ExecutorView {
    let capacity = executor.capacity.clone().unwrap_or_default();
    let allocated = executor.allocated.clone().unwrap_or_default();
    ExecutorView {
        id: executor.id,
        state: executor.state.clone(),
        cpu_millis: (allocated.cpu_millis, capacity.cpu_millis),
        memory_bytes: (allocated.memory_bytes, capacity.memory_bytes),
    }
}
