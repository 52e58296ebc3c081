//! The executor agent: establishes its identity (joining with a token the first time), serves
//! its metrics, and runs the link to the leader until asked to stop.

use crate::cgroup::{self, Containment};
use crate::config::ExecutorConfig;
use crate::identity::Credentials;
use crate::identity::{self, IdentityError};
use crate::join::{self, JoinError};
use crate::journal::Journal;
use crate::link::{Launcher, Link, LinkError, Profile};
use crate::local::LocalApi;
use crate::metrics::Metrics;
use crate::runner;
use crate::sandbox::{default_work_root, RunAs, Sandbox, RUN_AS_DEFAULT};
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

/// The longest a call through an attempt's local endpoint may take: a request waits up to 60 s
/// for its answer.
const LOCAL_CALL_TIMEOUT: Duration = Duration::from_secs(75);
/// Time the endpoint gets at exit to deliver its close frames.
const ENDPOINT_CLOSE_MAX: Duration = Duration::from_secs(1);

/// Why the agent stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("no servers to connect to")]
    NoServers,
    #[error("no identity in {0}: pass --token to join")]
    NoIdentity(PathBuf),
    #[error("{0}")]
    Sandbox(String),
    #[error("cannot create the data directory {path}")]
    DataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open the journal of started attempts in {path}")]
    Journal {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot use the identity")]
    Identity(#[from] IdentityError),
    #[error("cannot join the cluster")]
    Join(#[from] JoinError),
    #[error("cannot open a QUIC endpoint")]
    Endpoint(#[source] std::io::Error),
    #[error("the identity's certificates do not form a TLS configuration")]
    Tls(#[source] colony_quic::PkiError),
    #[error("cannot make a client for the attempts' local endpoints")]
    LocalClient(#[source] colony_client::ClientError),
    #[error("cannot serve metrics on {addr}")]
    MetricsListen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot set up metrics")]
    Metrics(#[from] prometheus::Error),
    #[error("the link to the cluster failed")]
    Link(#[from] LinkError),
}

/// Runs the executor until `shutdown` resolves, then stops gracefully: no new assignments,
/// running attempts killed, outstanding reports flushed for up to 2 s, connection closed.
pub async fn run(config: ExecutorConfig, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    Ok(run_agent(config, shutdown).await?)
}

async fn run_agent(
    config: ExecutorConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    if config.servers.is_empty() {
        return Err(AgentError::NoServers);
    }
    let data_dir = config.data_dir.clone();
    // The data directory holds the executor's key and the tasks' working directories: only its
    // owner may read it.
    colony_process::private_dir(&data_dir)
        .map_err(|source| AgentError::DataDir { path: data_dir.clone(), source })?;
    let stored = identity::load(&data_dir)?;
    if stored.is_none() && config.token.is_none() {
        return Err(AgentError::NoIdentity(data_dir));
    }
    let metrics = Arc::new(Metrics::new(&config.capacity)?);
    // Before joining: an executor that cannot contain tasks as required never takes a place.
    let sandbox = sandbox(&config, &data_dir, &metrics)?;
    let http = match config.metrics_listen {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| AgentError::MetricsListen { addr, source })?;
            tracing::info!(addr = %listener.local_addr().unwrap_or(addr), "serving metrics");
            metrics.add_process_collector()?;
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let shutdown = async {
                // A dropped sender stops the endpoint as well.
                let _ = stopped.await;
            };
            let served = colony_process::serve_http(listener, metrics.clone(), shutdown);
            let task = tokio::spawn(async move {
                if let Err(e) = served.await {
                    tracing::error!(error = %e, "metrics endpoint stopped");
                }
            });
            Some((stop, task))
        }
        None => None,
    };
    let endpoint = colony_quic::client_endpoint().map_err(AgentError::Endpoint)?;
    let mut shutdown = pin!(shutdown);
    let creds = match (stored, config.token.as_deref()) {
        (Some(creds), token) => {
            if token.is_some() {
                tracing::info!(executor_id = %creds.executor_id, "identity found; the join token is not needed and is ignored");
            }
            creds
        }
        (None, Some(token)) => {
            tracing::info!(dir = %data_dir.display(), "no identity yet; joining the cluster");
            let joined = tokio::select! {
                joined = join::join(&endpoint, &config.servers, token, &config.name, None) => joined?,
                () = &mut shutdown => return Ok(()),
            };
            identity::store(&data_dir, &joined)?;
            joined
        }
        (None, None) => return Err(AgentError::NoIdentity(data_dir)),
    };
    let client = colony_quic::mutual_client_config(&creds.ca_pem, &creds.cert_pem, &creds.key_pem)
        .map_err(AgentError::Tls)?;
    // Directories of attempts a previous run of this executor left behind: they were cut short,
    // so they are kept like failed ones.
    match runner::retire_leftovers(&sandbox.work_root) {
        Ok(0) => {}
        Ok(count) => tracing::info!(
            count,
            "kept the working directories of attempts interrupted by the last stop"
        ),
        Err(e) => tracing::warn!(error = %e, "could not tidy the working directories"),
    }
    let local = local_api(&config.servers, &creds)?;
    let journal = Journal::open(&data_dir)
        .map_err(|source| AgentError::Journal { path: data_dir.clone(), source })?;
    tracing::info!(executor_id = %creds.executor_id, name = %config.name, capacity = %config.capacity, "executor starting");
    let link = Link {
        servers: config.servers,
        profile: Profile {
            executor_id: creds.executor_id,
            name: config.name,
            capacity: config.capacity,
            labels: config.labels,
            capabilities: config.capabilities,
        },
        launcher: Launcher::Run { sandbox: Arc::new(sandbox), local: Some(local) },
        metrics,
        journal: Some(journal),
        ports: crate::health::Ports::new(config.ports),
        advertise_host: config.advertise_host,
    };
    let result = link.run(&endpoint, &client, shutdown).await;
    if let Some((stop, task)) = http {
        // The endpoint stops accepting and ends once its open requests are answered.
        let _ = stop.send(());
        let _ = task.await;
    }
    endpoint.close(colony_quic::CloseCode::Ok.into(), b"executor stopped");
    let _ = tokio::time::timeout(ENDPOINT_CLOSE_MAX, endpoint.wait_idle()).await;
    result?;
    Ok(())
}

/// The client attempts' local endpoints call the servers with: the executor's own certificate,
/// and long enough per call for a receive's or a request's wait.
fn local_api(servers: &[String], creds: &Credentials) -> Result<LocalApi, AgentError> {
    let identity = colony_quic::CertifiedKey {
        cert_pem: creds.cert_pem.clone(),
        key_pem: creds.key_pem.clone(),
    };
    let auth = colony_client::Auth::certificate(&creds.ca_pem, &identity, colony_quic::SERVER_NAME)
        .map_err(|e| AgentError::LocalClient(e.into()))?;
    let mut config = colony_client::ClientConfig::new(LOCAL_CALL_TIMEOUT);
    config.attempt_timeout_max = LOCAL_CALL_TIMEOUT;
    let client = colony_client::Client::with_config(servers, config, &auth)
        .map_err(AgentError::LocalClient)?;
    Ok(LocalApi::new(client))
}

/// What attempts run as, where, and within which limits; kills what a previous run of this
/// executor left running, before the executor says it is ready.
fn sandbox(
    config: &ExecutorConfig,
    data_dir: &Path,
    metrics: &Metrics,
) -> Result<Sandbox, AgentError> {
    let root = nix::unistd::geteuid().is_root();
    let run_as = match (config.run_as.as_deref(), root) {
        (Some(name), _) => Some(RunAs::lookup(name).map_err(AgentError::Sandbox)?),
        (None, true) => Some(RunAs::lookup(RUN_AS_DEFAULT).map_err(AgentError::Sandbox)?),
        (None, false) => None,
    };
    if let Some(user) = &run_as {
        if user.uid == 0 {
            tracing::warn!(
                "tasks run as root (--run-as {}): they can read the executor's key",
                user.name
            );
        }
        if !root && user.uid != nix::unistd::geteuid().as_raw() {
            return Err(AgentError::Sandbox(format!(
                "--run-as {} needs the executor to run as root",
                user.name
            )));
        }
    }
    let containment = Containment::probe(&cgroup::instance_name(&config.name, data_dir));
    // What the last run of this executor left running is killed before it says it is ready.
    let leftovers = containment.kill_leftovers();
    if leftovers > 0 {
        tracing::info!(
            groups = leftovers,
            "killed the processes of attempts the last run of this executor left"
        );
    }
    let missing: Vec<&str> = match config.cgroups {
        true => containment.missing().to_vec(),
        false => {
            tracing::warn!("--unsafe-no-limits: attempts run without control groups; their limits are not enforced and a kill reaches only their process group");
            cgroup::CONTROLLERS.to_vec()
        }
    };
    let enforced: Vec<(&str, bool)> =
        cgroup::CONTROLLERS.iter().map(|c| (*c, !missing.contains(c))).collect();
    metrics.set_limits_enforced(&enforced)?;
    if config.cgroups && !missing.is_empty() {
        let unenforced: Vec<&str> = missing
            .iter()
            .map(|c| match *c {
                "memory" => "memory limits",
                "cpu" => "CPU quotas",
                _ => "process limits",
            })
            .collect();
        let what = format!(
            "this host offers no usable cgroup {} controller ({}): attempts' {} would not be enforced",
            missing.join(", "),
            containment.version(),
            unenforced.join(" and "),
        );
        if config.require_limits {
            return Err(AgentError::Sandbox(format!(
                "{what}; run as root on a host with cgroups, or pass --require-limits=false to run without them"
            )));
        }
        tracing::warn!("{what} (--require-limits=false)");
    }
    let containment = (missing.len() < cgroup::CONTROLLERS.len()).then_some(containment);
    if let Some(containment) = &containment {
        tracing::info!(cgroups = containment.version(), "attempts run in their own control groups");
    }
    let work_root = config.work_dir.clone().unwrap_or_else(|| default_work_root(data_dir));
    if work_root.starts_with(data_dir) {
        return Err(AgentError::Sandbox(format!(
            "the work directory {} is inside the data directory, where tasks must not reach",
            work_root.display()
        )));
    }
    let mut sandbox =
        Sandbox::new(work_root, run_as, containment, config.task_pids_max, config.capacity.gpus);
    sandbox.start_seconds = Some(metrics.attempt_start_seconds.clone());
    sandbox.prepare_root().map_err(AgentError::Sandbox)?;
    Ok(sandbox)
}

#[cfg(test)]
mod tests {
    use super::*;
    use colony_core::Resources;

    fn config(data_dir: PathBuf, token: Option<String>) -> ExecutorConfig {
        ExecutorConfig {
            servers: vec!["127.0.0.1:1".to_owned()],
            token,
            data_dir,
            name: "test".to_owned(),
            capacity: Resources::default(),
            labels: Default::default(),
            capabilities: Default::default(),
            metrics_listen: None,
            work_dir: None,
            run_as: None,
            require_limits: false,
            cgroups: true,
            task_pids_max: crate::TASK_PIDS_MAX_DEFAULT,
            ports: crate::PORT_RANGE_DEFAULT,
            advertise_host: None,
        }
    }

    #[tokio::test]
    async fn first_start_without_a_token_is_a_clear_error() {
        let dir = tempfile::tempdir().expect("temp dir");
        let error = run(config(dir.path().to_owned(), None), std::future::pending())
            .await
            .expect_err("no identity");
        assert_eq!(
            error.to_string(),
            format!("no identity in {}: pass --token to join", dir.path().display())
        );
    }

    #[tokio::test]
    async fn a_malformed_token_is_refused_before_dialing() {
        let dir = tempfile::tempdir().expect("temp dir");
        let error =
            run(config(dir.path().to_owned(), Some("nonsense".to_owned())), std::future::pending())
                .await
                .expect_err("bad token");
        assert!(
            format!("{error:#}").starts_with("cannot join the cluster: invalid join token"),
            "{error:#}"
        );
    }

    #[tokio::test]
    async fn stored_identity_skips_joining_and_shutdown_is_prompt() {
        let dir = tempfile::tempdir().expect("temp dir");
        let ca = colony_quic::ClusterCa::generate("test").expect("ca");
        let (key_pem, csr_pem) = colony_quic::new_key_and_csr().expect("key");
        let cert_pem = ca.sign_executor_csr(&csr_pem, 5).expect("cert");
        let creds = crate::identity::Credentials {
            executor_id: colony_core::ExecutorId(5),
            key_pem,
            cert_pem,
            ca_pem: ca.cert_pem().to_owned(),
        };
        identity::store(dir.path(), &creds).expect("store");
        // A token that would not parse proves it is ignored; nobody listens on the server port.
        let started = std::time::Instant::now();
        let stop = tokio::time::sleep(Duration::from_millis(300));
        run(config(dir.path().to_owned(), Some("ignored".to_owned())), stop)
            .await
            .expect("clean stop");
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
