//! Batches client commands into Raft entries: many submissions, one log append, one fsync, one
//! replication round. Up to `in_flight_max` entries are proposed concurrently so the next batch
//! gathers while the previous one commits. Entries reach Raft in the order their commands were
//! proposed (each is handed to Raft before the next batch forms), so commands proposed one after
//! another by one caller commit in that order.

use crate::metrics::Metrics;
use colony_core::{Command, CommandError, Outcome, Proposal};
use colony_store::TypeConfig;
use openraft::error::ClientWriteError;
use openraft::raft::ClientWriteResponse;
use openraft::Raft;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::{mpsc, oneshot, Semaphore};

/// Bounds on batching.
#[derive(Clone, Debug)]
pub struct ProposerConfig {
    /// Commands in one Raft entry.
    pub batch_commands_max: usize,
    /// Raft entries proposed and not yet committed.
    pub in_flight_max: usize,
    /// Commands waiting for a batch; beyond this, callers wait (backpressure).
    pub queue_commands_max: usize,
}

impl Default for ProposerConfig {
    fn default() -> Self {
        ProposerConfig { batch_commands_max: 1024, in_flight_max: 4, queue_commands_max: 16_384 }
    }
}

/// Why a command was not applied.
#[derive(Clone, Debug, thiserror::Error)]
pub enum ProposeError {
    /// The state machine refused it; nothing changed.
    #[error(transparent)]
    Rejected(CommandError),
    /// This server is not (or no longer) the leader; the command was not appended.
    #[error("this server is not the leader")]
    NotLeader,
    /// Raft failed; whether the command took effect is unknown.
    #[error("raft: {0}")]
    Raft(String),
}

struct Pending {
    command: Command,
    reply: oneshot::Sender<Result<Outcome, ProposeError>>,
}

/// The handle callers propose through.
#[derive(Clone)]
pub struct Proposer {
    tx: mpsc::Sender<Pending>,
    /// Set when a stopping leader hands over: nothing more is appended to its log.
    stopped: Arc<AtomicBool>,
    /// One permit per batch that may be in Raft at once.
    slots: Arc<Semaphore>,
    in_flight_max: u32,
}

impl Proposer {
    pub fn spawn(
        raft: Raft<TypeConfig>,
        config: ProposerConfig,
        metrics: Arc<Metrics>,
    ) -> Proposer {
        let (tx, rx) = mpsc::channel(config.queue_commands_max);
        let stopped = Arc::new(AtomicBool::new(false));
        let slots = Arc::new(Semaphore::new(config.in_flight_max));
        let in_flight_max = u32::try_from(config.in_flight_max).unwrap_or(u32::MAX);
        let batches = Batches { slots: slots.clone(), stopped: stopped.clone() };
        tokio::spawn(batch_loop(raft, rx, config, metrics, batches));
        Proposer { tx, stopped, slots, in_flight_max }
    }

    /// Refuses every later proposal, queued ones included, as `NotLeader` (callers retry on the
    /// next leader), and returns once the batches already in Raft are done: after it, this
    /// server appends nothing more to its log.
    pub async fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        let _all = self.slots.acquire_many(self.in_flight_max).await;
    }

    /// Proposes one command and waits until it is committed and applied (or fails).
    pub async fn propose(&self, command: Command) -> Result<Outcome, ProposeError> {
        if self.stopped.load(Ordering::SeqCst) {
            return Err(ProposeError::NotLeader);
        }
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Pending { command, reply })
            .await
            .map_err(|_| ProposeError::Raft("server is shutting down".into()))?;
        rx.await.map_err(|_| ProposeError::Raft("server is shutting down".into()))?
    }

    /// Proposes `commands` in this order (so they commit in this order) and waits for each
    /// one's result, given in the same order.
    pub async fn propose_all(&self, commands: Vec<Command>) -> Vec<Result<Outcome, ProposeError>> {
        let shutting_down = || ProposeError::Raft("server is shutting down".into());
        let mut answers = Vec::with_capacity(commands.len());
        for command in commands {
            if self.stopped.load(Ordering::SeqCst) {
                answers.push(Err(ProposeError::NotLeader));
                continue;
            }
            let (reply, rx) = oneshot::channel();
            match self.tx.send(Pending { command, reply }).await {
                Ok(()) => answers.push(Ok(rx)),
                Err(_) => answers.push(Err(shutting_down())),
            }
        }
        let mut results = Vec::with_capacity(answers.len());
        for answer in answers {
            results.push(match answer {
                Ok(rx) => rx.await.unwrap_or_else(|_| Err(shutting_down())),
                Err(e) => Err(e),
            });
        }
        results
    }
}

/// An entry's commands stop growing at this many encoded bytes (one larger command still goes,
/// alone). With at most `RAFT_PAYLOAD_ENTRIES_MAX` entries per AppendEntries, a message stays
/// well under the peers' message limit in bytes, not only in count.
pub const ENTRY_BYTES_MAX: usize = 1 << 20;

/// The bincode size of a command, counted without allocating.
fn encoded_size(command: &Command) -> usize {
    let mut counter = bincode::enc::write::SizeWriter::default();
    match bincode::serde::encode_into_writer(command, &mut counter, bincode::config::standard()) {
        Ok(()) => counter.bytes_written,
        // Cannot happen for these types; counted as a full entry, it goes alone.
        Err(_) => ENTRY_BYTES_MAX,
    }
}

/// What the batch loop shares with `Proposer::stop`.
struct Batches {
    slots: Arc<Semaphore>,
    stopped: Arc<AtomicBool>,
}

async fn batch_loop(
    raft: Raft<TypeConfig>,
    mut rx: mpsc::Receiver<Pending>,
    config: ProposerConfig,
    metrics: Arc<Metrics>,
    Batches { slots, stopped }: Batches,
) {
    // A command that did not fit the last entry starts the next one.
    let mut carried: Option<(Pending, usize)> = None;
    loop {
        let (first, first_bytes) = match carried.take() {
            Some(carried) => carried,
            None => match rx.recv().await {
                Some(pending) => {
                    let bytes = encoded_size(&pending.command);
                    (pending, bytes)
                }
                None => return,
            },
        };
        // Waiting for a slot lets more commands queue up behind `first`: under load, batches grow.
        let Ok(permit) = slots.clone().acquire_owned().await else { return };
        let mut batch = vec![first];
        let mut bytes = first_bytes;
        while batch.len() < config.batch_commands_max {
            match rx.try_recv() {
                Ok(pending) => {
                    let size = encoded_size(&pending.command);
                    if bytes + size > ENTRY_BYTES_MAX {
                        carried = Some((pending, size));
                        break;
                    }
                    bytes += size;
                    batch.push(pending);
                }
                Err(_) => break,
            }
        }
        if stopped.load(Ordering::SeqCst) {
            for pending in batch {
                let _ = pending.reply.send(Err(ProposeError::NotLeader));
            }
            continue;
        }
        let now_unix_ms = colony_process::unix_ms();
        let (commands, replies): (Vec<Command>, Vec<_>) =
            batch.into_iter().map(|p| (p.command, p.reply)).unzip();
        metrics.raft_proposal_commands.observe(commands.len() as f64);
        let started = Instant::now();
        // Handed to Raft here, before the next batch forms: entries keep the proposal order.
        let sent = raft.client_write_ff(Proposal { now_unix_ms, commands }).await;
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let written = match sent {
                Ok(answer) => match answer.await {
                    Ok(Ok(response)) => Ok(response),
                    Ok(Err(ClientWriteError::ForwardToLeader(_))) => Err(ProposeError::NotLeader),
                    Ok(Err(other)) => Err(ProposeError::Raft(other.to_string())),
                    Err(_) => Err(ProposeError::Raft("raft stopped before answering".into())),
                },
                Err(fatal) => Err(ProposeError::Raft(fatal.to_string())),
            };
            metrics.raft_proposal_seconds.observe(started.elapsed().as_secs_f64());
            answer_batch(written, replies, &metrics);
            drop(permit);
        });
    }
}

/// Gives each command of a batch its result, or the batch's failure.
fn answer_batch(
    written: Result<ClientWriteResponse<TypeConfig>, ProposeError>,
    replies: Vec<oneshot::Sender<Result<Outcome, ProposeError>>>,
    metrics: &Metrics,
) {
    let count = replies.len();
    if written.is_err() {
        metrics.raft_proposals_failed.inc();
    }
    match written {
        Ok(response) => {
            let results = response.data.results;
            assert_eq!(
                results.len(),
                count,
                "state machine returned {} results for {count} commands",
                results.len()
            );
            for (reply, result) in replies.into_iter().zip(results) {
                let _ = reply.send(result.map_err(ProposeError::Rejected));
            }
        }
        Err(error) => {
            for reply in replies {
                let _ = reply.send(Err(error.clone()));
            }
        }
    }
}
