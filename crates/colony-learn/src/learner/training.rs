//! The training thread: owns the device (a CUDA context stays on the thread that made it) and
//! runs [`decide`] on one job at a time.

use std::time::{Duration, Instant};

use anyhow::{anyhow, Context as _};
use tokio::sync::{mpsc, oneshot};

use crate::decide::{decide, DecideError, Decision, TrainConfig};
use crate::device::{Device, SelectedBackend};
use crate::example::Example;
use colony_model::Predictor;

/// What the training thread answers: the decision and how long training and evaluation took.
type Trained = Result<(Decision, Duration), DecideError>;

struct Job {
    examples: Vec<Example>,
    current: Option<Predictor>,
    reply: oneshot::Sender<Trained>,
}

/// The training thread's inbox, and the device it resolved.
#[derive(Clone)]
pub(super) struct TrainingThread {
    jobs: mpsc::Sender<Job>,
    pub(super) device: String,
}

impl TrainingThread {
    /// Starts the thread, which resolves `device` once and keeps it; fails when the operator
    /// named a GPU that cannot be opened.
    pub(super) async fn start(device: Device, config: TrainConfig) -> anyhow::Result<Self> {
        // One job at a time: a round waits for its decision before the next can start.
        let (jobs, mut inbox) = mpsc::channel::<Job>(1);
        let (ready, resolved) = oneshot::channel();
        std::thread::Builder::new()
            .name("colony-learn-train".to_owned())
            .spawn(move || {
                let backend = match device.resolve() {
                    Ok(backend) => backend,
                    Err(error) => {
                        // The receiver is waiting for exactly this answer.
                        let _ = ready.send(Err(error));
                        return;
                    }
                };
                if ready.send(Ok(backend.describe())).is_err() {
                    return;
                }
                while let Some(job) = inbox.blocking_recv() {
                    let started = Instant::now();
                    let current = job.current.as_ref();
                    let decision = match &backend {
                        SelectedBackend::Cpu(cpu) => decide(cpu, &job.examples, current, &config),
                        SelectedBackend::Cuda(cuda) => {
                            decide(cuda.as_ref(), &job.examples, current, &config)
                        }
                    };
                    // A round aborted at shutdown no longer waits for its answer; nothing is lost.
                    let _ = job.reply.send(decision.map(|decision| (decision, started.elapsed())));
                }
            })
            .context("starting the training thread")?;
        let device_description = resolved
            .await
            .context("the training thread stopped before resolving the device")?
            .with_context(|| format!("opening training device {device}"))?;
        Ok(Self { jobs, device: device_description })
    }

    pub(super) async fn train(
        &self,
        examples: Vec<Example>,
        current: Option<Predictor>,
    ) -> anyhow::Result<(Decision, Duration)> {
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(Job { examples, current, reply })
            .await
            .map_err(|_| anyhow!("the training thread has stopped"))?;
        let (decision, elapsed) =
            answer.await.map_err(|_| anyhow!("the training thread dropped the job"))??;
        Ok((decision, elapsed))
    }
}
