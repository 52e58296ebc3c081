//! `colony chaos run`: builds the hosts, starts the cluster and the workload, plays the seed's
//! fault schedule, heals, lets the work finish, reads every server's final state, runs the
//! checkers and writes the report. `colony chaos proxy` is the slow-link proxy the suite starts
//! inside namespaces.

use crate::checks::{self, LinearVerdict, ServerFinal, StatusSample};
use crate::cluster::Cluster;
use crate::history::{History, Op};
use crate::nemesis::{self, Nemesis, Planned};
use crate::report::{self, FaultRecord, Report};
use crate::workload::{Pool, Workload};
use anyhow::{bail, Context as _, Result};
use colony_client::Channel;
use colony_client::{Client, ClientConfig};
use colony_proto::pb::admin_client::AdminClient;
use colony_proto::pb::{self, ReadConsistency};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// The longest one page of a task listing may take, retries included.
const LIST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, clap::Subcommand)]
pub enum ChaosCommand {
    /// Run a cluster in network namespaces under faults and check what it promised
    ///
    /// chaos/run --servers 3 --executors 3 --duration 120s --seed 42 --nemesis all
    /// A seed replays the same fault schedule; the report says where history, logs and data are.
    #[command(verbatim_doc_comment)]
    Run(ChaosArgs),
    /// The slow-link proxy (started by `chaos run` inside a namespace)
    #[command(hide = true)]
    Proxy(ProxyArgs),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum NegativeControl {
    /// Servers answer every read from their own state (`--unsafe-stale-reads`); the
    /// linearizability checker must catch it.
    StaleReads,
}

#[derive(Debug, clap::Args)]
pub struct ChaosArgs {
    /// Servers (an odd number).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(3..=7))]
    pub servers: u8,
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(1..=9))]
    pub executors: u8,
    /// How long faults are injected (the checks after take a minute more).
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Fixes the fault schedule; a random one is chosen (and printed) when absent.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Faults: all, partition, kill, or names, comma-separated (see --help of each in the README).
    #[arg(long, default_value = "all")]
    pub nemesis: String,
    /// Mean length of one fault (each lasts between half and one and a half times this).
    #[arg(long, default_value = "6s", value_parser = humantime::parse_duration)]
    pub fault_time: Duration,
    /// Concurrent workload clients, spread over the servers.
    #[arg(long, default_value_t = 6, value_parser = clap::value_parser!(u64).range(1..=64))]
    pub clients: u64,
    /// Search budget of the linearizability checker for one task's history.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub key_budget: Duration,
    /// Break the servers on purpose, to show the checkers catch it.
    #[arg(long, value_enum)]
    pub negative_control: Option<NegativeControl>,
    /// Where to keep the run (default: /tmp/colony-chaos/<time>-seed-<seed>).
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct ProxyArgs {
    /// tcp:LISTEN=UPSTREAM or udp:LISTEN=UPSTREAM (repeatable).
    #[arg(long = "link", required = true)]
    links: Vec<String>,
    #[arg(long, default_value = "0ms", value_parser = humantime::parse_duration)]
    delay: Duration,
    #[arg(long, default_value = "0ms", value_parser = humantime::parse_duration)]
    jitter: Duration,
    /// Probability that a datagram is sent twice.
    #[arg(long, default_value_t = 0.0)]
    duplicate: f64,
    /// Release datagrams by their own deadlines, so jitter reorders them.
    #[arg(long)]
    reorder: bool,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop when this process exits.
    #[arg(long)]
    parent_pid: Option<i32>,
}

/// Runs a chaos command; `Ok(false)` when the run found violations.
pub async fn run(command: ChaosCommand, json: bool) -> Result<bool> {
    match command {
        ChaosCommand::Run(args) => run_suite(args, json).await,
        ChaosCommand::Proxy(args) => {
            if let Some(parent) = args.parent_pid {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                    .context("cannot ask to be stopped with the parent")?;
                if nix::unistd::getppid().as_raw() != parent {
                    bail!("the parent process {parent} has already exited");
                }
            }
            if !(0.0..=1.0).contains(&args.duplicate) {
                bail!("--duplicate must be between 0 and 1");
            }
            let links = args
                .links
                .iter()
                .map(|l| crate::proxy::parse_link(l))
                .collect::<Result<Vec<_>>>()?;
            let faults = crate::proxy::Faults {
                delay: args.delay,
                jitter: args.jitter,
                duplicate: args.duplicate,
                reorder: args.reorder,
            };
            crate::proxy::run(crate::proxy::ProxyConfig { links, faults, seed: args.seed }).await?;
            Ok(true)
        }
    }
}

async fn run_suite(args: ChaosArgs, json: bool) -> Result<bool> {
    let seed = args.seed.unwrap_or_else(rand::random);
    let set = Nemesis::parse_set(&args.nemesis)?;
    let set = if args.negative_control.is_some() {
        vec![Nemesis::PartitionOne, Nemesis::PartitionLeader]
    } else {
        set
    };
    crate::net::preflight().await?;
    let unix = colony_process::unix_ms() / 1000;
    let dir = args
        .dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("/tmp/colony-chaos/{unix}-seed-{seed}")));
    if std::fs::read_dir(&dir).is_ok_and(|mut entries| entries.next().is_some()) {
        bail!("{} is not empty; give a new --dir so this run's history, logs and data are not mixed with another's", dir.display());
    }
    std::fs::create_dir_all(dir.join("logs"))
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let dir = dir.canonicalize()?;
    eprintln!(
        "chaos: seed {seed}, {} servers, {} executors, {} of faults ({}), keeping everything in {}",
        args.servers,
        args.executors,
        humantime::format_duration(args.duration),
        if set.len() == Nemesis::ALL.len() {
            "all".to_owned()
        } else {
            set.iter().map(|n| n.name()).collect::<Vec<_>>().join(",")
        },
        dir.display()
    );
    crate::net::Net::claim().await?;
    let started = Instant::now();
    let mut cluster = match Cluster::start(
        &dir,
        args.servers.into(),
        args.executors.into(),
        args.negative_control.is_some(),
    )
    .await
    {
        Ok(cluster) => cluster,
        Err(e) => {
            crate::net::Net::release().await;
            return Err(e.context(format!(
                "the cluster did not start (logs in {})",
                dir.join("logs").display()
            )));
        }
    };
    eprintln!("chaos: cluster up in {:.1} s", started.elapsed().as_secs_f64());
    let outcome = tokio::select! {
        outcome = play(&args, seed, &set, &dir, &mut cluster) => outcome,
        signal = colony_process::shutdown_signal() => Err(anyhow::anyhow!("{signal} received; the run was stopped and its hosts removed ({})", dir.display())),
    };
    cluster.shutdown().await;
    let (report, valid) = outcome?;
    let path = dir.join("report.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&report)?)
        .with_context(|| format!("cannot write {}", path.display()))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        report::print(&report);
    }
    Ok(valid)
}

/// Everything between a started cluster and its shutdown.
async fn play(
    args: &ChaosArgs,
    seed: u64,
    set: &[Nemesis],
    dir: &std::path::Path,
    cluster: &mut Cluster,
) -> Result<(Report, bool)> {
    let clock = Instant::now();
    let history = History::create(&dir.join("history.jsonl"), clock)?;
    let ledger = dir.join("ledger");
    std::fs::write(&ledger, b"").context("cannot create the ledger")?;
    // Tasks run as an unprivileged user (nobody, under a root executor): they may pass through
    // the run's directory to append to the ledger, and nothing else of it.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711))?;
    std::fs::set_permissions(&ledger, std::fs::Permissions::from_mode(0o666))?;
    let workload = Workload {
        history: history.clone(),
        pool: Arc::new(Mutex::new(Pool::default())),
        ledger: ledger.clone(),
        probes: Default::default(),
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut clients = Vec::new();
    for client in 1..=args.clients {
        let (name, channel) =
            cluster.channels[(client as usize - 1) % cluster.channels.len()].clone();
        clients.push(tokio::spawn(workload.clone().client(
            client,
            name,
            channel,
            seed,
            stop_rx.clone(),
        )));
    }
    let values = dir.join("workflow-ledger");
    std::fs::write(&values, b"").context("cannot create the workflow ledger")?;
    std::fs::set_permissions(&values, std::fs::Permissions::from_mode(0o666))?;
    let workflow_client = tokio::spawn(crate::workflows::client(
        cluster.channels.clone(),
        ledger.clone(),
        values.clone(),
        stop_rx.clone(),
    ));
    let message_publisher =
        tokio::spawn(crate::messages::publisher(cluster.channels.clone(), stop_rx.clone()));
    let message_consumer =
        tokio::spawn(crate::messages::consumer(cluster.channels.clone(), stop_rx.clone()));
    let samples = Arc::new(Mutex::new(Vec::<StatusSample>::new()));
    let sampler = tokio::spawn(sample_statuses(
        cluster.channels.clone(),
        samples.clone(),
        clock,
        stop_rx.clone(),
    ));

    let rounds =
        (args.duration.as_secs_f64() / (args.fault_time.as_secs_f64() + 2.0) / set.len() as f64)
            .ceil() as usize
            + 1;
    let plan: Vec<Planned> = nemesis::schedule(set, seed, args.fault_time, rounds);
    let mut faults = Vec::new();
    let mut unexpected_exits = Vec::new();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let faults_started = Instant::now();
    for planned in &plan {
        if faults_started.elapsed() >= args.duration {
            break;
        }
        let start_ms = clock.elapsed().as_millis() as u64;
        let applied = nemesis::apply(cluster, planned).await;
        let (detail, error) = match applied {
            Ok(detail) => (detail, None),
            Err(e) => (String::new(), Some(format!("{e:#}"))),
        };
        eprintln!(
            "chaos: {:>6.1} s  {:<20} {}{}",
            start_ms as f64 / 1000.0,
            planned.nemesis.name(),
            detail,
            error.as_deref().map(|e| format!(" (failed: {e})")).unwrap_or_default()
        );
        tokio::time::sleep(planned.fault_for).await;
        let exited = cluster
            .heal()
            .await
            .context("healing failed; the hosts are left as they are for inspection")?;
        let healed_ms = clock.elapsed().as_millis() as u64;
        unexpected_exits
            .extend(exited.iter().map(|e| format!("{e} during {}", planned.nemesis.name())));
        let recovery = workload.probe(&cluster.channels, Duration::from_secs(60)).await;
        faults.push(FaultRecord {
            nemesis: planned.nemesis.name(),
            detail,
            error,
            start_ms,
            healed_ms,
            recovery_ms: recovery.map(|d| d.as_millis() as u64),
            exited,
        });
        tokio::time::sleep(planned.quiet_after).await;
    }
    let _ = stop_tx.send(true);
    for client in clients {
        let _ = client.await;
    }
    let workflows_submitted = workflow_client.await.unwrap_or_default();
    let messages_published = message_publisher.await.unwrap_or_default();
    let messages_consumed = message_consumer.await.unwrap_or_default();
    workload.settle().await;
    eprintln!(
        "chaos: faults over after {:.1} s; waiting for the submitted work to finish",
        faults_started.elapsed().as_secs_f64()
    );
    let any_server =
        Client::from_channels(cluster.channels.clone(), ClientConfig::new(LIST_TIMEOUT))?;
    let unfinished = wait_for_work(&any_server, Duration::from_secs(120)).await;
    let finals = collect_finals(cluster, Duration::from_secs(60)).await;
    let values_text =
        std::fs::read_to_string(&values).context("cannot read the workflow ledger")?;
    let workflows = crate::workflows::check(&any_server, &workflows_submitted, &values_text).await;
    let messages =
        crate::messages::check(&cluster.channels, &messages_published, messages_consumed).await;
    let _ = sampler.await;
    let (ops, write_error) = history.finish();
    if let Some(e) = write_error {
        bail!("the history could not be written: {e}");
    }
    let ledger_text = std::fs::read_to_string(&ledger).context("cannot read the ledger")?;
    let samples = samples.lock().unwrap_or_else(|p| p.into_inner()).clone();
    eprintln!("chaos: checking {} operations", ops.len());
    let report = check(
        args,
        seed,
        set,
        dir,
        &ops,
        &ledger_text,
        &samples,
        finals,
        faults,
        unexpected_exits,
        unfinished,
        workflows,
        messages,
    );
    let valid = report.valid;
    Ok((report, valid))
}

#[allow(clippy::too_many_arguments)]
fn check(
    args: &ChaosArgs,
    seed: u64,
    set: &[Nemesis],
    dir: &std::path::Path,
    ops: &[Op],
    ledger_text: &str,
    samples: &[StatusSample],
    finals: Result<Vec<ServerFinal>>,
    faults: Vec<FaultRecord>,
    unexpected_exits: Vec<String>,
    unfinished: Option<u64>,
    workflows: crate::workflows::WorkflowReport,
    messages: crate::messages::MessageReport,
) -> Report {
    let (ledger, ledger_unreadable) = checks::parse_ledger(ledger_text);
    let (finals, finals_error) = match finals {
        Ok(f) => (f, None),
        Err(e) => (Vec::new(), Some(format!("{e:#}"))),
    };
    let (lost, phantom) = checks::acknowledged_present(ops, &finals);
    let over_commits = checks::capacity(ops, &finals);
    let (duplicates, stale_completions) = checks::completions(&ledger, ops, &finals);
    let (two_leaders, terms_backwards, terms_seen) = checks::leaders(samples);
    let divergence = checks::converged(&finals);
    let linearizability = checks::linearizable(ops, args.key_budget);
    let mut recoveries: Vec<u64> = faults.iter().filter_map(|f| f.recovery_ms).collect();
    recoveries.sort_unstable();
    let not_recovered = faults.iter().filter(|f| f.recovery_ms.is_none()).count() as u64;
    let operations = report::count_operations(ops);
    let mut report = Report {
        seed,
        servers: args.servers,
        executors: args.executors,
        duration_s: args.duration.as_secs(),
        nemeses: set.iter().map(|n| n.name()).collect(),
        negative_control: args.negative_control,
        faults_by_kind: report::faults_by_kind(&faults),
        faults,
        operations,
        reads_saw: checks::observed(ops),
        lost_acknowledged: lost,
        phantom_tasks: phantom,
        over_commits,
        duplicate_completions: duplicates,
        stale_completions,
        leaders_per_term: two_leaders,
        terms_backwards,
        terms_seen,
        divergence,
        linearizability,
        recovery_ms_p50: report::percentile(&recoveries, 0.5),
        recovery_ms_max: recoveries.last().copied().unwrap_or(0),
        not_recovered,
        unexpected_exits,
        unfinished_tasks: unfinished,
        ledger_lines: ledger.len() as u64,
        ledger_unreadable,
        final_state_error: finals_error,
        servers_read: finals.iter().map(|f| f.name.clone()).collect(),
        paths: report::Paths::new(dir),
        negative_control_caught: None,
        workflows,
        messages,
        valid: false,
    };
    report.valid = report.violations().is_empty();
    if args.negative_control.is_some() {
        report.negative_control_caught =
            Some(matches!(report.linearizability.verdict, LinearVerdict::Invalid));
    }
    report
}

async fn sample_statuses(
    channels: Vec<(String, Channel)>,
    samples: Arc<Mutex<Vec<StatusSample>>>,
    clock: Instant,
    mut stop: watch::Receiver<bool>,
) {
    // Samples until the final states are read, a little after the workload stops.
    let mut stopped_at: Option<Instant> = None;
    loop {
        if *stop.borrow() && stopped_at.is_none() {
            stopped_at = Some(Instant::now());
        }
        if stopped_at.is_some_and(|t| t.elapsed() > Duration::from_secs(5)) {
            return;
        }
        let answers =
            futures::future::join_all(channels.iter().map(|(name, channel)| async move {
                (name.clone(), crate::cluster::status(channel).await)
            }))
            .await;
        let time_ns = clock.elapsed().as_nanos() as u64;
        {
            let mut samples = samples.lock().unwrap_or_else(|p| p.into_inner());
            for (server, status) in answers {
                if let Some(s) = status {
                    samples.push(StatusSample {
                        time_ns,
                        server,
                        node_id: s.node_id,
                        term: s.term,
                        state: s.state,
                        leader_id: s.leader_id,
                    });
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = stop.changed() => {}
        }
    }
}

/// Every task, page by page; a linearizable listing may take its pages from different servers.
async fn list_all(client: &Client, stale: bool) -> Result<Vec<pb::Task>> {
    let mut tasks = Vec::new();
    let mut after_id = 0;
    loop {
        let request = pb::ListTasksRequest {
            after_id,
            page_size: 5000,
            consistency: Some(ReadConsistency { stale }),
            ..Default::default()
        };
        let page =
            client.call("list tasks", |mut c| async move { c.list_tasks(request).await }).await?;
        tasks.extend(page.tasks);
        if page.next_after_id == 0 {
            return Ok(tasks);
        }
        after_id = page.next_after_id;
    }
}

/// Waits until no task is left unfinished; returns how many still were at the limit.
async fn wait_for_work(any_server: &Client, limit: Duration) -> Option<u64> {
    let started = Instant::now();
    let mut left = None;
    while started.elapsed() < limit {
        if let Ok(tasks) = list_all(any_server, false).await {
            let unfinished = tasks
                .iter()
                .filter(|t| crate::history::status_of(t.state).is_some_and(|s| !s.is_finished()))
                .count() as u64;
            if unfinished == 0 {
                return None;
            }
            left = Some(unfinished);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    left.or(Some(u64::MAX))
}

async fn digest(channel: &Channel) -> Option<pb::StateDigestResponse> {
    let mut client = AdminClient::new(channel.clone());
    tokio::time::timeout(Duration::from_secs(5), client.state_digest(pb::StateDigestRequest {}))
        .await
        .ok()?
        .ok()
        .map(tonic::Response::into_inner)
}

/// Waits for every server to reach the same applied index and digest (or the limit), then reads
/// each one's own state.
async fn collect_finals(cluster: &Cluster, limit: Duration) -> Result<Vec<ServerFinal>> {
    let started = Instant::now();
    let mut digests;
    loop {
        digests = futures::future::join_all(cluster.channels.iter().map(|(_, c)| digest(c))).await;
        let agreed = digests.iter().all(|d| d.is_some())
            && digests
                .iter()
                .flatten()
                .map(|d| (d.applied_index, d.sha256.clone()))
                .collect::<std::collections::BTreeSet<_>>()
                .len()
                == 1;
        if agreed || started.elapsed() > limit {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let mut finals = Vec::new();
    for ((name, channel), digest) in cluster.channels.iter().zip(digests) {
        let digest = digest.with_context(|| format!("{name} did not report its state digest"))?;
        // A stale read of this server's own state, so only this server may answer.
        let this_server = Client::from_channels(
            vec![(name.clone(), channel.clone())],
            ClientConfig::new(LIST_TIMEOUT),
        )?;
        let tasks = list_all(&this_server, true)
            .await
            .with_context(|| format!("cannot read {name}'s tasks"))?;
        let request =
            pb::ListExecutorsRequest { consistency: Some(ReadConsistency { stale: true }) };
        let executors = AdminClient::new(channel.clone())
            .list_executors(request)
            .await
            .with_context(|| format!("cannot read {name}'s executors"))?
            .into_inner();
        finals.push(ServerFinal {
            name: name.clone(),
            tasks: tasks
                .iter()
                .map(|t| {
                    let spec = t.spec.clone().unwrap_or_default();
                    let allocated = t.allocated.clone().unwrap_or_default();
                    (
                        t.id,
                        checks::FinalTask {
                            workflow: spec.namespace == crate::workflows::NAMESPACE,
                            key: spec.idempotency_key,
                            status: crate::history::status_of(t.state),
                            token: t.fencing_token,
                            executor: t.executor_id,
                            cpu_millis: allocated.cpu_millis,
                            memory_bytes: allocated.memory_bytes,
                        },
                    )
                })
                .collect(),
            executors: executors.executors.iter().map(crate::workload::executor_view).collect(),
            applied_index: digest.applied_index,
            digest: digest.sha256,
        });
    }
    Ok(finals)
}
