//! `colony dev`: a whole local cluster as child processes, a demo workload, and a clean stop.
//!
//! The servers and executors are this same executable run as `colony server` and `colony
//! executor`. They live in their own process
//! group (so a terminal's Ctrl-C reaches only us, and we stop them in order), are killed if their
//! `Child` handle is dropped on an error path, and ask the kernel to stop them if we die without
//! a chance to clean up.

use crate::cluster_cmd::{self, StatusJson};
use crate::output::OutputFormat;
use crate::{workflow_cmd, workflow_file, GlobalArgs};
use anyhow::{anyhow, bail, Context as _, Result};
use clap::Args;
use colony_client::{Auth, Client};
use colony_proto::pb;
use indicatif::{ProgressBar, ProgressFinish};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;
use tokio::process::{Child, Command};
use tokio::signal::unix::{signal, SignalKind};
use tokio::time::Instant;

/// How long the servers get to elect a leader and join before `colony dev` gives up.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// The demo: the seeds' research workflow, built into the binary.
const DEMO_WORKFLOW: &str = include_str!("../../../examples/research.yaml");
/// How long the servers get to stop after SIGTERM before they are killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the children and the cluster are looked at while waiting.
const POLL_INTERVAL: Duration = Duration::from_millis(200);

#[derive(Debug, Args)]
pub struct DevArgs {
    /// Where the servers keep their data and logs; default: a new directory under the system
    /// temp dir. A directory from an earlier `colony dev` restarts that cluster from its data.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Server N listens on 127.0.0.1:(base-port + N - 1).
    #[arg(long, default_value_t = 7101)]
    base_port: u16,
    /// How many servers.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=9))]
    servers: u64,
    /// How many executors (each offers 2 CPUs and 2Gi, capability `shell`).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(0..=9))]
    executors: u64,
    /// Do not start a learner.
    #[arg(long)]
    no_learner: bool,
    /// Do not start the demo agents (examples/agents: a requester and two researchers talking
    /// through their attempts' local sockets).
    #[arg(long)]
    no_demo_agents: bool,
    /// Also write the servers' metrics endpoints to this Prometheus file_sd target list
    /// (cluster/prometheus/prometheus.yml reads cluster/prometheus/targets/*.json).
    #[arg(long)]
    prometheus_targets: Option<PathBuf>,
}

/// One child process: a server or an executor.
pub(crate) struct Server {
    /// "server" or "executor", for messages.
    kind: &'static str,
    pub(crate) id: u64,
    /// The gRPC address (servers only).
    pub(crate) addr: String,
    /// `/metrics`, `/healthz` and `/readyz`: port base-port + 1000 + N - 1 for server N,
    /// base-port + 1010 + N - 1 for executor N.
    metrics_addr: String,
    data_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Server {
    /// Starts `colony server` (or `colony executor`: the caller passes the subcommand's whole
    /// arguments in `role`), with output appended to its log.
    pub(crate) fn spawn(&mut self, exe: &Path, role: &[String]) -> Result<()> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("cannot open {}", self.log.display()))?;
        let log_err: File =
            log.try_clone().with_context(|| format!("cannot open {}", self.log.display()))?;
        let mut command = Command::new(exe);
        if self.kind == "server" {
            command
                .arg("server")
                .args([
                    "--id",
                    &self.id.to_string(),
                    "--listen",
                    &self.addr,
                    "--metrics-listen",
                    &self.metrics_addr,
                ])
                .arg("--data-dir")
                .arg(&self.data_dir);
        }
        command
            .args(role)
            .args(["--parent-pid", &std::process::id().to_string()])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .process_group(0)
            .kill_on_drop(true);
        let child = command.spawn().with_context(|| {
            format!("cannot start {} {} ({})", self.kind, self.id, exe.display())
        })?;
        self.child = Some(child);
        Ok(())
    }

    /// Sends `signal` and waits (at most the stop timeout) for the process to exit.
    pub(crate) async fn stop_with(&mut self, signal: Signal) -> Result<()> {
        let Some(mut child) = self.child.take() else { return Ok(()) };
        if let Some(pid) = child.id().and_then(|pid| i32::try_from(pid).ok()) {
            // ESRCH means it is gone already, which is what we want.
            let _ = kill(Pid::from_raw(pid), signal);
        }
        match tokio::time::timeout(STOP_TIMEOUT, child.wait()).await {
            Ok(exited) => exited.map(drop).map_err(|e| anyhow!("cannot wait for {}: {e}", self.id)),
            Err(_) => {
                let _ = child.start_kill();
                child
                    .wait()
                    .await
                    .map(drop)
                    .map_err(|e| anyhow!("cannot wait for {}: {e}", self.id))
            }
        }
    }

    pub(crate) fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// An error if the server has exited (it never should while the cluster runs).
    pub(crate) fn check_running(&mut self) -> Result<()> {
        let Some(child) = self.child.as_mut() else { return Ok(()) };
        match child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => {
                self.child = None;
                Err(anyhow!(
                    "{} {} exited unexpectedly ({status}); see its log {}",
                    self.kind,
                    self.id,
                    self.log.display()
                ))
            }
            Err(e) => Err(anyhow!("cannot check on {} {}: {e}", self.kind, self.id)),
        }
    }
}

/// SIGINT (Ctrl-C), SIGTERM and SIGHUP all mean "stop the cluster".
struct StopSignals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
    hangup: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn new() -> Result<StopSignals> {
        let listen = |kind| signal(kind).context("cannot listen for signals");
        Ok(StopSignals {
            interrupt: listen(SignalKind::interrupt())?,
            terminate: listen(SignalKind::terminate())?,
            hangup: listen(SignalKind::hangup())?,
        })
    }

    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.interrupt.recv() => "Ctrl-C",
            _ = self.terminate.recv() => "SIGTERM",
            _ = self.hangup.recv() => "SIGHUP",
        }
    }
}

pub async fn run(args: DevArgs, global: &GlobalArgs) -> Result<()> {
    let mut signals = StopSignals::new()?;
    let dir = prepare_dir(args.dir.as_deref())?;
    let mut servers = plan(&dir, args.base_port, args.servers)?;
    let restart = restarting(&servers)?;
    let mut executors = plan_executors(&dir, args.base_port, args.executors)?;
    if !args.no_learner {
        let metrics_port = args.base_port.checked_add(1020).ok_or_else(|| {
            anyhow!("--base-port {} leaves no room for the learner's metrics port", args.base_port)
        })?;
        executors.push(Server {
            kind: "learner",
            id: 1,
            addr: String::new(),
            metrics_addr: format!("127.0.0.1:{metrics_port}"),
            data_dir: dir.join("learner"),
            log: dir.join("learner.log"),
            child: None,
        });
    }
    for process in servers.iter().chain(&executors) {
        if !process.addr.is_empty() {
            check_port_free(&process.addr)?;
        }
        check_port_free(&process.metrics_addr)?;
    }
    if let Some(path) = &args.prometheus_targets {
        write_prometheus_targets(path, &servers, &executors)?;
    }
    let outcome = tokio::select! {
        biased;
        name = signals.recv() => {
            eprintln!("\n{name}: stopping the cluster");
            Ok(())
        }
        result = serve(&mut servers, &mut executors, &dir, restart, !args.no_demo_agents, global) => result,
    };
    let stopped_executors = stop(&mut executors).await;
    let stopped = stop(&mut servers).await.and(stopped_executors);
    // The first failure is the one to report; a failure to stop is reported only on its own.
    outcome.and(stopped)
}

/// Writes the servers' metrics endpoints as a Prometheus file_sd list, atomically (Prometheus
/// watches the file and must never read half of it).
fn write_prometheus_targets(path: &Path, servers: &[Server], executors: &[Server]) -> Result<()> {
    let targets =
        |processes: &[Server]| processes.iter().map(|s| s.metrics_addr.clone()).collect::<Vec<_>>();
    let of_kind = |kind: &str| {
        executors
            .iter()
            .filter(|e| e.kind == kind)
            .map(|s| s.metrics_addr.clone())
            .collect::<Vec<_>>()
    };
    let list = serde_json::json!([
        { "targets": targets(servers), "labels": { "job": "colony-server", "cluster": "dev" } },
        { "targets": of_kind("executor"), "labels": { "job": "colony-executor", "cluster": "dev" } },
        { "targets": of_kind("learner"), "labels": { "job": "colony-learner", "cluster": "dev" } },
    ]);
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    let tmp = path.with_extension("json.tmp");
    let text = serde_json::to_string_pretty(&list).context("cannot encode the target list")?;
    std::fs::write(&tmp, text).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}

/// The directory for this run: the given one (created if needed) or a fresh temporary one.
fn prepare_dir(dir: Option<&Path>) -> Result<PathBuf> {
    let dir = match dir {
        Some(dir) => {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            dir.to_path_buf()
        }
        None => {
            let dir =
                std::env::temp_dir().join(format!("colony-dev-{:08x}", rand::random::<u32>()));
            std::fs::create_dir(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            dir
        }
    };
    // Absolute, so that the printed paths work from any directory.
    std::fs::canonicalize(&dir).with_context(|| format!("cannot resolve {}", dir.display()))
}

pub(crate) fn plan(dir: &Path, base_port: u16, count: u64) -> Result<Vec<Server>> {
    (1..=count)
        .map(|id| {
            let port = u16::try_from(u64::from(base_port) + id - 1).map_err(|_| {
                anyhow!("--base-port {base_port} leaves no room for {count} servers")
            })?;
            let metrics_port = port.checked_add(1000).ok_or_else(|| {
                anyhow!("--base-port {base_port} leaves no room for metrics ports")
            })?;
            Ok(Server {
                kind: "server",
                id,
                addr: format!("127.0.0.1:{port}"),
                metrics_addr: format!("127.0.0.1:{metrics_port}"),
                data_dir: dir.join(format!("server{id}")),
                log: dir.join(format!("server{id}.log")),
                child: None,
            })
        })
        .collect()
}

/// Executor N's metrics on base-port + 1010 + N - 1; its data and log beside the servers'.
fn plan_executors(dir: &Path, base_port: u16, count: u64) -> Result<Vec<Server>> {
    (1..=count)
        .map(|id| {
            let metrics_port = u16::try_from(u64::from(base_port) + 1009 + id).map_err(|_| {
                anyhow!("--base-port {base_port} leaves no room for executor metrics ports")
            })?;
            Ok(Server {
                kind: "executor",
                id,
                addr: String::new(),
                metrics_addr: format!("127.0.0.1:{metrics_port}"),
                data_dir: dir.join(format!("executor{id}")),
                log: dir.join(format!("executor{id}.log")),
                child: None,
            })
        })
        .collect()
}

/// Whether every server already has data from an earlier run (then they restart from it) or none
/// has (a new cluster); a mix cannot be started safely.
fn restarting(servers: &[Server]) -> Result<bool> {
    let has_data = |s: &Server| {
        std::fs::read_dir(&s.data_dir).map(|mut entries| entries.next().is_some()).unwrap_or(false)
    };
    let with_data = servers.iter().filter(|s| has_data(s)).count();
    if with_data == 0 {
        Ok(false)
    } else if with_data == servers.len() {
        Ok(true)
    } else {
        bail!("some servers' data directories under this --dir have data and some do not; use a new --dir")
    }
}

fn check_port_free(addr: &str) -> Result<()> {
    std::net::TcpListener::bind(addr)
        .map(drop)
        .map_err(|e| anyhow!("cannot use {addr}: {e} (another cluster running? try --base-port)"))
}

/// The management token `colony dev` bootstraps, kept in its directory (0600).
const TOKEN_FILE: &str = "token";

/// Starts the servers, waits for them, runs the demo and then watches the children until one
/// exits. Returns only on an error; a stop signal ends it from outside.
async fn serve(
    servers: &mut [Server],
    executors: &mut [Server],
    dir: &Path,
    restart: bool,
    demo_agents: bool,
    global: &GlobalArgs,
) -> Result<()> {
    let exe =
        std::env::current_exe().context("cannot find this executable to start servers with")?;
    let endpoints: Vec<String> = servers.iter().map(|s| s.addr.clone()).collect();
    // Cleared however this ends (ready, error, or a stop signal dropping this future).
    let spinner = ProgressBar::new_spinner().with_finish(ProgressFinish::AndClear);
    spinner.enable_steady_tick(Duration::from_millis(100));
    let deadline = Instant::now() + READY_TIMEOUT;
    let token_file = dir.join(TOKEN_FILE);
    let auth = if restart {
        spinner.set_message(format!("restarting {} servers from {}", servers.len(), dir.display()));
        for server in servers.iter_mut() {
            server.spawn(&exe, &[])?;
        }
        let token = std::fs::read_to_string(&token_file).with_context(|| {
            format!("cannot read the management token {}", token_file.display())
        })?;
        Auth::token(token.trim()).context("the management token file")?
    } else {
        form_cluster(servers, &exe, &[], &token_file, deadline, &spinner).await?
    };
    let wanted = servers.len();
    let status = wait_until(servers, &endpoints, &auth, deadline, &spinner, |s| {
        let voters = s.members.iter().filter(|m| m.role == "voter").count();
        (s.members.len() != wanted || voters != wanted)
            .then(|| format!("{voters} of {wanted} servers are voters"))
    })
    .await?;
    let client = Client::new(&endpoints, global.timeout, &auth)?;
    let executor_count = executors.iter().filter(|e| e.kind == "executor").count();
    if !executors.is_empty() {
        start_executors(&client, executors, &exe, &endpoints, &spinner).await?;
        let wanted = executor_count;
        wait_until(servers, &endpoints, &auth, deadline, &spinner, |s| {
            let up = s.executors_by_state.get("up").copied().unwrap_or(0) as usize;
            (up < wanted).then(|| format!("{up} of {wanted} executors are up"))
        })
        .await?;
    }
    drop(spinner);
    print_welcome(&status, servers, executors, dir, &token_file)?;

    let id = submit_demo(&client).await?;
    if executor_count == 0 {
        println!("No executors (--executors 0): the demo workflow {id} stays waiting.");
    } else {
        println!(
            "Demo workflow {id}, examples/research.yaml (research, then a deep analysis per topic, then a report) on {executor_count} executors:"
        );
        let (workflow, tasks) = tokio::select! {
            done = workflow_cmd::wait(&client, id, Some(READY_TIMEOUT), true) => done?,
            failed = watch_children(servers, executors) => return failed,
        };
        workflow_cmd::print(&workflow, &tasks, OutputFormat::Table)?;
        let report = tasks.iter().find(|t| t.step == "report").map(|t| t.id);
        match report {
            Some(task) if workflow.state == pb::WorkflowState::Succeeded as i32 => {
                println!();
                println!("The report (colony task output {task} report):");
                println!();
                workflow_cmd::task_output(
                    &client,
                    task,
                    Some("report".to_owned()),
                    OutputFormat::Table,
                )
                .await?;
            }
            _ => println!(
                "The workflow ended {}: {}",
                workflow_cmd::state_name(workflow.state),
                workflow.reason
            ),
        }
    }
    if demo_agents && executor_count > 0 {
        println!();
        run_demo_agents(&client, dir).await?;
    }
    println!();
    println!("Press Ctrl-C to stop the cluster.");
    watch_children(servers, executors).await
}

/// The example agents, compiled in: what `colony dev` runs from its directory.
const DEMO_AGENT_FILES: [(&str, &str); 4] = [
    ("colony_local.py", include_str!("../../../examples/agents/colony_local.py")),
    ("responder.py", include_str!("../../../examples/agents/responder.py")),
    ("requester.py", include_str!("../../../examples/agents/requester.py")),
    ("admin.proto", include_str!("../../../proto/colony/v1/admin.proto")),
];

/// Runs examples/agents in namespace `demo`: two researchers answering requests and a requester
/// asking them, every call through their attempts' local sockets. Needs grpcio where every user
/// reads it (`COLONY_PYTHONPATH`, set by cluster/setup.sh); without it, says so and runs none.
async fn run_demo_agents(client: &Client, dir: &Path) -> Result<()> {
    let pythonpath =
        std::env::var("COLONY_PYTHONPATH").unwrap_or_else(|_| "/opt/colony/python".to_owned());
    let probe = std::process::Command::new("python3")
        .args(["-c", "import grpc, grpc_tools"])
        .env("PYTHONPATH", &pythonpath)
        .output();
    if !probe.is_ok_and(|o| o.status.success()) {
        println!(
            "Demo agents NOT started: grpcio and grpcio-tools are not in {pythonpath} (cluster/dev.sh installs them; --no-demo-agents hides this)."
        );
        return Ok(());
    }
    let agents_dir = dir.join("agents");
    std::fs::create_dir_all(&agents_dir)
        .with_context(|| format!("cannot create {}", agents_dir.display()))?;
    // The agents run as nobody: they read their scripts from here.
    for path in [dir, agents_dir.as_path()] {
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .with_context(|| format!("cannot open {} to the agents' user", path.display()))?;
    }
    for (name, text) in DEMO_AGENT_FILES {
        let path = agents_dir.join(name);
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    let env = |extra: &[(&str, &str)]| {
        let mut env: std::collections::HashMap<String, String> = [
            ("PYTHONPATH".to_owned(), pythonpath.clone()),
            ("COLONY_PROTO".to_owned(), agents_dir.join("admin.proto").display().to_string()),
        ]
        .into_iter()
        .collect();
        env.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
        env
    };
    let script = |name: &str| agents_dir.join(name).display().to_string();
    for (name, replicas, program, env) in [
        ("researcher", 2, script("responder.py"), env(&[])),
        ("requester", 1, script("requester.py"), env(&[("PAUSE_S", "5")])),
    ] {
        let spec = pb::AgentSpec {
            name: name.to_owned(),
            namespace: "demo".to_owned(),
            task: Some(pb::TaskSpec {
                resources: Some(pb::Resources {
                    cpu_millis: 100,
                    memory_bytes: 256 << 20,
                    ..Default::default()
                }),
                run: Some(pb::task_spec::Run::Process(pb::ProcessRun {
                    program: "python3".to_owned(),
                    args: vec![program],
                    env,
                })),
                ..Default::default()
            }),
            replicas,
            restart: "always".to_owned(),
            ..Default::default()
        };
        let request = pb::RunAgentRequest { spec: Some(spec) };
        client
            .call("run a demo agent", |mut c| {
                let request = request.clone();
                async move { c.run_agent(request).await }
            })
            .await?;
    }
    println!("Demo agents (examples/agents, namespace demo): 2 researchers answer a requester, every call through their sockets:");
    println!("  colony agent list --namespace demo");
    println!("  colony agent endpoints researcher --namespace demo");
    println!("  colony msg subscribe topics/answers --namespace demo --consumer me");
    Ok(())
}

/// Starts a new cluster: server 1 bootstraps, ACLs are bootstrapped through it (the management
/// token is written to `token_file`, 0600), and the others join with a server token. Returns the
/// management credentials once every server has been started (not yet once they are voters).
pub(crate) async fn form_cluster(
    servers: &mut [Server],
    exe: &Path,
    server_args: &[String],
    token_file: &Path,
    deadline: Instant,
    spinner: &ProgressBar,
) -> Result<Auth> {
    // The first server bootstraps; ACLs are bootstrapped through it, and the others join
    // with a server token once it leads.
    let first = servers[0].addr.clone();
    spinner.set_message(format!("starting server 1 on {first}"));
    let bootstrap: Vec<String> =
        std::iter::once("--bootstrap".to_owned()).chain(server_args.iter().cloned()).collect();
    servers[0].spawn(exe, &bootstrap)?;
    let ca_file = servers[0].data_dir.join("tls").join("ca.pem");
    while !ca_file.exists() {
        servers[0].check_running()?;
        if Instant::now() >= deadline {
            bail!(
                "server 1 wrote no CA certificate ({}); see {}",
                ca_file.display(),
                servers[0].log.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    spinner.set_message("bootstrapping ACLs");
    let ca_pem = std::fs::read_to_string(&ca_file)
        .with_context(|| format!("cannot read {}", ca_file.display()))?;
    let bootstrapped = colony_client::bootstrap_acl(
        std::slice::from_ref(&first),
        colony_quic::Trust::Ca(ca_pem),
        READY_TIMEOUT,
    )
    .await
    .context("cannot bootstrap ACLs")?;
    colony_process::write_private(token_file, format!("{}\n", bootstrapped.secret).as_bytes())?;
    let auth = Auth::token(&bootstrapped.secret)?;
    if servers.len() > 1 {
        let client = Client::new(std::slice::from_ref(&first), READY_TIMEOUT, &auth)?;
        let server_token =
            cluster_cmd::create_join_token(&client, Duration::from_secs(600), "server")
                .await?
                .token;
        for server in servers.iter_mut().skip(1) {
            spinner.set_message(format!("starting server {} on {}", server.id, server.addr));
            let mut join = vec![
                "--join".to_owned(),
                first.clone(),
                "--token".to_owned(),
                server_token.clone(),
            ];
            join.extend(server_args.iter().cloned());
            server.spawn(exe, &join)?;
        }
    }
    Ok(auth)
}

/// Returns (with the error) as soon as any child exits; it never should while the cluster runs.
async fn watch_children(servers: &mut [Server], executors: &mut [Server]) -> Result<()> {
    let mut ticker = tokio::time::interval(POLL_INTERVAL);
    loop {
        ticker.tick().await;
        for process in servers.iter_mut().chain(executors.iter_mut()) {
            process.check_running()?;
        }
    }
}

/// Starts the executors: new ones join with a fresh token, earlier ones restart from their data.
async fn start_executors(
    client: &Client,
    executors: &mut [Server],
    exe: &Path,
    endpoints: &[String],
    spinner: &ProgressBar,
) -> Result<()> {
    let mut token = None;
    for executor in executors.iter_mut() {
        if executor.kind == "learner" {
            let mut args: Vec<String> =
                vec!["learner".into(), "--join".into(), endpoints.join(",")];
            // The learner enrolls once, then keeps its certificate.
            if !colony_learn::learner::enrolled(&executor.data_dir) {
                let response =
                    cluster_cmd::create_join_token(client, Duration::from_secs(600), "learner")
                        .await?;
                args.extend(["--token".into(), response.token]);
            }
            args.extend([
                "--metrics-listen".into(),
                executor.metrics_addr.clone(),
                "--data-dir".into(),
                executor.data_dir.display().to_string(),
            ]);
            spinner.set_message("starting the learner");
            executor.spawn(exe, &args)?;
            continue;
        }
        let mut args: Vec<String> = vec!["executor".into(), "--join".into(), endpoints.join(",")];
        args.extend([
            "--name".into(),
            format!("e{}", executor.id),
            "--metrics-listen".into(),
            executor.metrics_addr.clone(),
        ]);
        args.extend([
            "--cpu".into(),
            "2".into(),
            "--memory".into(),
            "2Gi".into(),
            "--capability".into(),
            "shell".into(),
        ]);
        args.extend([
            "--label".into(),
            format!("zone={}", if executor.id % 2 == 1 { "a" } else { "b" }),
        ]);
        // The executors share this host: each leases its agents' ports from its own range.
        let low = 20_000 + (executor.id - 1) * 1_000;
        args.extend(["--ports".into(), format!("{low}-{}", low + 999)]);
        args.push("--data-dir".into());
        args.push(executor.data_dir.display().to_string());
        if !executor.data_dir.join("identity.json").exists() {
            if token.is_none() {
                spinner.set_message("creating a join token");
                token = Some(
                    cluster_cmd::create_join_token(client, Duration::from_secs(600), "executor")
                        .await?
                        .token,
                );
            }
            args.extend(["--token".into(), token.clone().unwrap_or_default()]);
        }
        spinner.set_message(format!("starting executor {}", executor.id));
        executor.spawn(exe, &args)?;
    }
    Ok(())
}

/// Polls ClusterStatus through `endpoints` until a leader is known and `pending` (what is still
/// missing, if anything) says nothing is; fails if a child exits or the deadline passes.
pub(crate) async fn wait_until(
    servers: &mut [Server],
    endpoints: &[String],
    auth: &Auth,
    deadline: Instant,
    spinner: &ProgressBar,
    pending: impl Fn(&StatusJson) -> Option<String>,
) -> Result<StatusJson> {
    let client = Client::new(endpoints, POLL_INTERVAL * 5, auth)?;
    let mut last = String::from("no answer yet");
    loop {
        for server in servers.iter_mut() {
            server.check_running()?;
        }
        if Instant::now() >= deadline {
            let logs: Vec<String> = servers.iter().map(|s| s.log.display().to_string()).collect();
            bail!(
                "the cluster was not ready within {} ({last}); see the logs: {}",
                humantime::format_duration(READY_TIMEOUT),
                logs.join(" ")
            );
        }
        match cluster_cmd::cluster_status(&client).await {
            Ok(status) => {
                let status = StatusJson::from(status);
                let missing = match status.leader_id {
                    None => Some("waiting for a leader".to_owned()),
                    Some(_) => pending(&status),
                };
                match missing {
                    None => return Ok(status),
                    Some(missing) => last = missing,
                }
            }
            Err(e) => last = format!("{e:#}"),
        }
        spinner.set_message(last.clone());
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

fn print_welcome(
    status: &StatusJson,
    servers: &[Server],
    executors: &[Server],
    dir: &Path,
    token_file: &Path,
) -> Result<()> {
    let endpoints: Vec<&str> = servers.iter().map(|s| s.addr.as_str()).collect();
    let leader = status.leader_id.map_or_else(|| "none".to_owned(), |id| id.to_string());
    println!(
        "Colony dev cluster {} is up: {} servers, leader {leader}.",
        status.cluster_id,
        servers.len()
    );
    println!();
    cluster_cmd::print_members(&status.members)?;
    println!();
    let metrics: Vec<String> = servers
        .iter()
        .chain(executors)
        .map(|s| format!("http://{}/metrics", s.metrics_addr))
        .collect();
    println!("Metrics: {}", metrics.join("  "));
    // Every server serves the console; the first is as good as any.
    if let Some(first) = servers.first() {
        println!(
            "Console: http://{}/ui  (sign in with the management token below)",
            first.metrics_addr
        );
    }
    println!();
    println!(
        "Reach it from another shell (TLS from the cluster CA; the management token is in {}):",
        token_file.display()
    );
    println!(
        "  export COLONY_ENDPOINT={} COLONY_TOKEN=$(cat {})",
        endpoints.join(","),
        token_file.display()
    );
    println!("  colony cluster status");
    println!("  colony cluster executors");
    println!("  colony task submit --name hello -- /bin/echo hello");
    println!("  colony task wait ID");
    println!("  colony task list");
    println!("  colony workflow list                # the demo: examples/research.yaml");
    println!(
        "  colony workflow submit examples/research.yaml --param topic=\"vector clocks\" --wait"
    );
    println!(
        "  colony model list                   # the learner publishes once it beats the baseline"
    );
    println!("  colony acl token create --role submitter --namespace default --ttl 30d");
    println!("  colony audit tail --data-dir {}/server1", dir.display());
    println!("  colony bench submit --duration 5s");
    println!();
    println!("Data: {}/server{{1..{}}}", dir.display(), servers.len());
    let executor_count = executors.iter().filter(|e| e.kind == "executor").count();
    println!(
        "Logs: {}/server{{1..{}}}.log, {}/executor{{1..{executor_count}}}.log, {}/learner.log",
        dir.display(),
        servers.len(),
        dir.display(),
        dir.display()
    );
    println!("Restart this cluster later with: colony dev --dir {}", dir.display());
    println!();
    Ok(())
}

/// The research workflow of `examples/research.yaml`, in namespace `demo`. A restarted
/// `colony dev --dir` finds the one it submitted before instead of adding another.
async fn submit_demo(client: &Client) -> Result<u64> {
    let request = pb::ListWorkflowsRequest::default();
    let existing = client
        .call("list workflows", |mut c| async move { c.list_workflows(request).await })
        .await?
        .workflows
        .into_iter()
        .find(|w| w.spec.as_ref().is_some_and(|s| s.name == "research" && s.namespace == "demo"));
    if let Some(workflow) = existing {
        return Ok(workflow.id);
    }
    let spec = workflow_file::parse(
        DEMO_WORKFLOW,
        &["topic=raft failover".to_owned()],
        Some("demo"),
        colony_process::unix_ms(),
    )
    .context("examples/research.yaml")?;
    let request = pb::SubmitWorkflowRequest { spec: Some(spec) };
    let response = client
        .call("submit the demo workflow", |mut c| {
            let request = request.clone();
            async move { c.submit_workflow(request).await }
        })
        .await?;
    response.workflow.map(|w| w.id).ok_or_else(|| anyhow!("the server's answer has no workflow"))
}

/// SIGTERM to every running server, then wait; whoever is still running after the grace period
/// is killed.
pub(crate) async fn stop(servers: &mut [Server]) -> Result<()> {
    for server in servers.iter_mut() {
        if let Some(pid) =
            server.child.as_ref().and_then(Child::id).and_then(|pid| i32::try_from(pid).ok())
        {
            // ESRCH means it is gone already, which is what we want.
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
    }
    let deadline = Instant::now() + STOP_TIMEOUT;
    let mut killed = Vec::new();
    let mut stopped = 0;
    for server in servers.iter_mut() {
        let Some(mut child) = server.child.take() else { continue };
        let exit: std::io::Result<ExitStatus> =
            match tokio::time::timeout_at(deadline, child.wait()).await {
                Ok(exit) => exit,
                Err(_) => {
                    killed.push(format!("{} {}", server.kind, server.id));
                    // Kill errors mean it has exited meanwhile; wait() reaps it either way.
                    let _ = child.start_kill();
                    child.wait().await
                }
            };
        match exit {
            Ok(status) if status.success() => stopped += 1,
            Ok(status) => eprintln!(
                "{} {} stopped with {status}; see its log {}",
                server.kind,
                server.id,
                server.log.display()
            ),
            Err(e) => eprintln!("cannot wait for {} {}: {e}", server.kind, server.id),
        }
    }
    if !killed.is_empty() {
        bail!(
            "{} did not stop within {} of SIGTERM and were killed",
            killed.join(", "),
            humantime::format_duration(STOP_TIMEOUT)
        );
    }
    if stopped > 0 {
        eprintln!("stopped {stopped} processes");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn servers_get_consecutive_ports_and_own_dirs() {
        let servers = match plan(Path::new("/tmp/x"), 7101, 3) {
            Ok(servers) => servers,
            Err(e) => panic!("{e:#}"),
        };
        let addrs: Vec<&str> = servers.iter().map(|s| s.addr.as_str()).collect();
        assert_eq!(addrs, ["127.0.0.1:7101", "127.0.0.1:7102", "127.0.0.1:7103"]);
        assert_eq!(servers[2].data_dir, Path::new("/tmp/x/server3"));
        assert_eq!(servers[2].log, Path::new("/tmp/x/server3.log"));
        assert!(plan(Path::new("/tmp/x"), 65535, 2).is_err());
    }

    #[test]
    fn a_dir_is_new_or_a_whole_earlier_cluster() {
        let dir =
            std::env::temp_dir().join(format!("colony-dev-test-{:08x}", rand::random::<u32>()));
        let servers = match plan(&dir, 7101, 2) {
            Ok(servers) => servers,
            Err(e) => panic!("{e:#}"),
        };
        assert!(matches!(restarting(&servers), Ok(false)));
        for (i, server) in servers.iter().enumerate() {
            assert!(std::fs::create_dir_all(&server.data_dir).is_ok());
            assert!(std::fs::write(server.data_dir.join("node.json"), "{}").is_ok());
            let expected = i + 1 == servers.len();
            assert_eq!(restarting(&servers).ok(), if expected { Some(true) } else { None });
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
