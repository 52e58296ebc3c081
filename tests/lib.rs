//! A harness for integration tests that run real `colony server` and `colony executor` processes
//! on loopback.
//!
//! Servers and executors are child processes of the test, each with its own data directory and
//! log file; the harness kills them all when dropped, so a failing test never leaves any behind.
//!
//! Clusters run as every cluster does: TLS from their own CA, ACLs bootstrapped at start. The
//! management token is the cluster's (`Cluster::token`); the helpers that take only an address
//! use the token of the cluster that server belongs to (ports are unique within a test process).

use anyhow::{bail, Context};
use colony_client::{Auth, Channel};
use colony_proto::pb::admin_client::AdminClient;
use colony_proto::pb::{self, ClusterStatusRequest};
use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tonic::transport::Endpoint;

/// The credentials for each server address this process started a cluster on.
static AUTH_BY_ADDR: Mutex<Option<HashMap<String, Auth>>> = Mutex::new(None);

/// Records the credentials for the server at `addr` (helpers that take only an address use them).
pub fn register(addr: &str, auth: &Auth) {
    let mut map = AUTH_BY_ADDR.lock().unwrap_or_else(|p| p.into_inner());
    map.get_or_insert_with(HashMap::new).insert(addr.to_owned(), auth.clone());
}

/// The management credentials of the cluster the server at `addr` belongs to.
pub fn auth_for(addr: &str) -> anyhow::Result<Auth> {
    let map = AUTH_BY_ADDR.lock().unwrap_or_else(|p| p.into_inner());
    map.as_ref()
        .and_then(|m| m.get(addr).cloned())
        .with_context(|| format!("no cluster of this test has a server at {addr}"))
}

/// The `colony` binary built alongside this test (same target directory and profile).
pub fn colony_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe.parent().and_then(Path::parent).expect("target directory");
    let bin = dir.join("colony");
    assert!(
        bin.exists(),
        "{} is missing: build it first with `cargo build --release --bin colony`",
        bin.display()
    );
    bin
}

/// A port on loopback nothing listens on right now.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("local addr").port()
}

/// Polls `check` until it returns `Ok(Some(value))`, or fails with `what` after `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    let mut last = String::from("condition never held");
    loop {
        match check().await {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => {}
            Err(e) => last = format!("{e:#}"),
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what} (last: {last})");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One `colony server` process and its data.
pub struct Server {
    pub id: u64,
    pub addr: String,
    /// Where `/metrics`, `/healthz` and `/readyz` are served.
    pub metrics_addr: String,
    pub data_dir: PathBuf,
    pub log_path: PathBuf,
    child: Option<Child>,
}

impl Server {
    /// A server on a free port (not started) with its data and log in `dir`.
    pub fn new(id: u64, data_dir: PathBuf, log_path: PathBuf) -> Server {
        Server {
            id,
            addr: format!("127.0.0.1:{}", free_port()),
            metrics_addr: format!("127.0.0.1:{}", free_port()),
            data_dir,
            log_path,
            child: None,
        }
    }

    /// Starts the process with `args` after the common ones (`--data-dir`, `--snapshot-logs`, ...).
    pub fn start(&mut self, args: &[String]) -> anyhow::Result<()> {
        assert!(self.child.is_none(), "server {} is already running", self.id);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log_path)?;
        let child = Command::new(colony_bin())
            .arg("server")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(args)
            .env("RUST_LOG", "info,openraft=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawn colony server")?;
        self.child = Some(child);
        Ok(())
    }

    /// Restarts from the data directory alone: the server remembers its id, address and cluster.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.start(&[])
    }

    /// kill -9: no chance to flush or say goodbye.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then wait for a clean exit; returns the exit status.
    pub fn terminate(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        let mut child = self.child.take().context("server not running")?;
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                bail!("server {} did not stop within 15s of SIGTERM", self.id);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub async fn client(&self) -> anyhow::Result<AdminClient<Channel>> {
        client(&self.addr).await
    }

    pub async fn status(&self) -> anyhow::Result<pb::ClusterStatusResponse> {
        status(&self.addr, Duration::from_secs(3)).await
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A gRPC client for one server, with its cluster's management token.
pub async fn client(addr: &str) -> anyhow::Result<AdminClient<Channel>> {
    client_with(addr, &auth_for(addr)?)
}

/// A gRPC client for one server with the given credentials.
pub fn client_with(addr: &str, auth: &Auth) -> anyhow::Result<AdminClient<Channel>> {
    let endpoint =
        Endpoint::from_shared(format!("http://{addr}"))?.connect_timeout(Duration::from_secs(1));
    Ok(AdminClient::new(auth.channel(endpoint)))
}

/// One server's `cluster status` answer, within `timeout`.
pub async fn status(addr: &str, timeout: Duration) -> anyhow::Result<pb::ClusterStatusResponse> {
    let mut client = client(addr).await?;
    let status =
        tokio::time::timeout(timeout, client.cluster_status(ClusterStatusRequest {})).await??;
    Ok(status.into_inner())
}

/// The first of `servers` (index, address) that answers as leader, with its status.
async fn leader_status(servers: &[(usize, String)]) -> Option<(usize, pb::ClusterStatusResponse)> {
    for (index, addr) in servers {
        if let Ok(answer) = status(addr, Duration::from_secs(1)).await {
            if answer.state == "leader" {
                return Some((*index, answer));
            }
        }
    }
    None
}

/// One `colony executor` process and its data.
pub struct Executor {
    pub name: String,
    pub data_dir: PathBuf,
    pub log_path: PathBuf,
    pub metrics_addr: String,
    args: Vec<String>,
    child: Option<Child>,
}

impl Executor {
    /// Starts (or restarts, from its data directory) the process.
    pub fn start(&mut self) -> anyhow::Result<()> {
        assert!(self.child.is_none(), "executor {} is already running", self.name);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log_path)?;
        let child = Command::new(colony_bin())
            .arg("executor")
            .args(&self.args)
            .env("RUST_LOG", "info")
            // Never to be seen by a task (t97 looks for it).
            .env("COLONY_TEST_EXECUTOR_ONLY", "executor-only")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawn colony executor")?;
        self.child = Some(child);
        Ok(())
    }

    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The servers it connects to when next started (comma-separated HOST:PORT).
    pub fn point_at(&mut self, servers: &str) {
        if let Some(at) = self.args.iter().position(|a| a == "--join") {
            self.args[at + 1] = servers.to_owned();
        }
    }

    /// Whether the process is still running (it exits when the cluster refuses it for good).
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }
}

impl Drop for Executor {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A cluster of real servers (and executors) in a temporary directory.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub servers: Vec<Server>,
    pub executors: Vec<Executor>,
    pub snapshot_logs: u64,
    /// Flags every server of this cluster starts with, beyond the ones every test needs.
    pub server_args: Vec<String>,
    /// The management token `acl bootstrap` printed, and its credentials.
    pub token: String,
    pub auth: Option<Auth>,
}

impl Cluster {
    /// Runs `colony --endpoint <every server> --token <the management token> --timeout 30s ARGS`,
    /// as a user drives the cluster.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        let endpoint = self.addrs().join(",");
        std::process::Command::new(colony_bin())
            .args(["--endpoint", &endpoint, "--token", &self.token, "--timeout", "30s"])
            .args(args)
            .output()
            .expect("run colony")
    }

    /// `colony ARGS` (as [`Cluster::cli`] runs it) must succeed; its stdout.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "`colony {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Starts `n` servers: the first bootstraps, the rest join it; returns when all are voters.
    pub async fn start(n: usize, snapshot_logs: u64) -> anyhow::Result<Cluster> {
        Cluster::start_with(n, snapshot_logs, &[]).await
    }

    /// Like [`Cluster::start`], every server also started with `server_args`.
    pub async fn start_with(
        n: usize,
        snapshot_logs: u64,
        server_args: &[&str],
    ) -> anyhow::Result<Cluster> {
        let dir = tempfile::tempdir()?;
        // Tasks run as nobody: they pass through (never list) the cluster's directory to reach
        // their executors' work directories and the files `task_writable` makes.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711))?;
        let mut cluster = Cluster {
            dir,
            servers: Vec::new(),
            executors: Vec::new(),
            snapshot_logs,
            server_args: server_args.iter().map(|a| a.to_string()).collect(),
            token: String::new(),
            auth: None,
        };
        cluster.add_server(true).await?;
        cluster.bootstrap_acl().await?;
        cluster.wait_for_leader(Duration::from_secs(20)).await?;
        for _ in 1..n {
            cluster.add_server(false).await?;
        }
        cluster.wait_for_voters(n, Duration::from_secs(60)).await?;
        Ok(cluster)
    }

    /// An empty file tasks (running as nobody) may append to: `DIR/shared/NAME`.
    pub fn task_writable(&self, name: &str) -> anyhow::Result<PathBuf> {
        let shared = self.dir.path().join("shared");
        std::fs::create_dir_all(&shared)?;
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777))?;
        let path = shared.join(name);
        std::fs::write(&path, b"")?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666))?;
        Ok(path)
    }

    /// Bootstraps ACLs through the first server, trusting the CA in its data directory.
    async fn bootstrap_acl(&mut self) -> anyhow::Result<()> {
        let first = &self.servers[0];
        let ca_file = first.data_dir.join("tls").join("ca.pem");
        let ca_pem = wait_for("the CA certificate", Duration::from_secs(20), || async {
            Ok(std::fs::read_to_string(&ca_file).ok())
        })
        .await?;
        let response = colony_client::bootstrap_acl(
            std::slice::from_ref(&first.addr),
            colony_quic::Trust::Ca(ca_pem),
            Duration::from_secs(20),
        )
        .await?;
        let auth = Auth::token(&response.secret)?;
        register(&first.addr, &auth);
        self.token = response.secret;
        self.auth = Some(auth);
        Ok(())
    }

    /// The cluster's management credentials.
    pub fn auth(&self) -> anyhow::Result<&Auth> {
        self.auth.as_ref().context("ACLs are not bootstrapped yet")
    }

    /// Starts one more server (bootstrapping, or joining the first server with a server token).
    pub async fn add_server(&mut self, bootstrap: bool) -> anyhow::Result<usize> {
        let id = self.servers.len() as u64 + 1;
        let addr = format!("127.0.0.1:{}", free_port());
        let metrics_addr = format!("127.0.0.1:{}", free_port());
        let mut server = Server {
            id,
            addr: addr.clone(),
            metrics_addr: metrics_addr.clone(),
            data_dir: self.dir.path().join(format!("d{id}")),
            log_path: self.dir.path().join(format!("server{id}.log")),
            child: None,
        };
        let mut args = vec![
            "--id".to_owned(),
            id.to_string(),
            "--listen".to_owned(),
            addr,
            "--snapshot-logs".to_owned(),
            self.snapshot_logs.to_string(),
            "--metrics-listen".to_owned(),
            metrics_addr,
        ];
        args.extend(self.server_args.iter().cloned());
        if bootstrap {
            args.push("--bootstrap".to_owned());
        } else {
            let join: Vec<&str> = self.servers.iter().map(|s| s.addr.as_str()).collect();
            args.push("--join".to_owned());
            args.push(join.join(","));
            args.push("--token".to_owned());
            args.push(self.join_token_of("server").await?);
            register(&server.addr, self.auth()?);
        }
        server.start(&args)?;
        self.servers.push(server);
        Ok(self.servers.len() - 1)
    }

    pub fn addrs(&self) -> Vec<String> {
        self.servers.iter().map(|s| s.addr.clone()).collect()
    }

    /// Waits until some running server reports a leader, and returns that leader's index in `servers`.
    pub async fn wait_for_leader(&mut self, timeout: Duration) -> anyhow::Result<usize> {
        let servers: Vec<(usize, String)> = self
            .servers
            .iter_mut()
            .enumerate()
            .filter_map(|(i, s)| s.is_running().then(|| (i, s.addr.clone())))
            .collect();
        wait_for("a leader", timeout, || {
            let servers = servers.clone();
            async move { Ok(leader_status(&servers).await.map(|(index, _)| index)) }
        })
        .await
    }

    /// Waits until the leader reports `n` voters and no membership change in progress.
    pub async fn wait_for_voters(&mut self, n: usize, timeout: Duration) -> anyhow::Result<()> {
        let servers: Vec<(usize, String)> = self.addrs().into_iter().enumerate().collect();
        wait_for(&format!("{n} voters"), timeout, || {
            let servers = servers.clone();
            async move {
                let settled = leader_status(&servers).await.filter(|(_, status)| {
                    status.members.iter().filter(|m| m.role == "voter").count() == n
                        && !status.joint
                });
                Ok(settled.map(|_| ()))
            }
        })
        .await
    }

    /// Every server's and executor's log, for failure messages.
    pub fn logs(&self) -> String {
        let servers =
            self.servers.iter().map(|s| format!("--- server {} ---\n{}", s.id, tail(&s.log(), 40)));
        let executors = self
            .executors
            .iter()
            .map(|e| format!("--- executor {} ---\n{}", e.name, tail(&e.log(), 20)));
        servers.chain(executors).collect::<Vec<_>>().join("\n")
    }

    /// A client of every server, each call retried across them for up to `timeout`.
    pub fn any_server(&self, timeout: Duration) -> anyhow::Result<colony_client::Client> {
        Ok(colony_client::Client::new(&self.addrs(), timeout, self.auth()?)?)
    }

    /// A fresh executor join token, once the cluster CA exists.
    pub async fn join_token(&self) -> anyhow::Result<String> {
        self.join_token_of("executor").await
    }

    /// A fresh join token of `kind` (executor, server, learner), once the cluster CA exists.
    pub async fn join_token_of(&self, kind: &str) -> anyhow::Result<String> {
        let any_server = self.any_server(Duration::from_secs(3))?;
        wait_for("a join token", Duration::from_secs(20), || async {
            let request = pb::CreateJoinTokenRequest { ttl_ms: 3_600_000, kind: kind.to_owned() };
            let token = any_server
                .call("create a join token", |mut c| {
                    let request = request.clone();
                    async move { c.create_join_token(request).await }
                })
                .await?
                .token;
            Ok(Some(token))
        })
        .await
    }

    /// Starts an executor joined with a new token, offering `cpu` and `memory`, plus `extra` flags.
    pub async fn add_executor(
        &mut self,
        cpu: &str,
        memory: &str,
        extra: &[&str],
    ) -> anyhow::Result<usize> {
        let token = self.join_token().await?;
        let index = self.executors.len();
        let name = format!("e{}", index + 1);
        let data_dir = self.dir.path().join(&name);
        let metrics_addr = format!("127.0.0.1:{}", free_port());
        let mut args: Vec<String> = vec![
            "--join".into(),
            self.addrs().join(","),
            "--token".into(),
            token,
            "--data-dir".into(),
            data_dir.display().to_string(),
            "--cpu".into(),
            cpu.into(),
            "--memory".into(),
            memory.into(),
            "--capability".into(),
            "shell".into(),
            "--metrics-listen".into(),
            metrics_addr.clone(),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        let mut executor = Executor {
            name: name.clone(),
            log_path: self.dir.path().join(format!("{name}.log")),
            data_dir,
            metrics_addr,
            args,
            child: None,
        };
        executor.start()?;
        self.executors.push(executor);
        Ok(index)
    }

    /// The leader's view of the executors (linearizable, through any server).
    pub async fn executors(&self) -> anyhow::Result<Vec<pb::Executor>> {
        let any_server = self.any_server(Duration::from_secs(3))?;
        let request = pb::ListExecutorsRequest::default();
        Ok(any_server
            .call("list executors", |mut c| async move { c.list_executors(request).await })
            .await?
            .executors)
    }

    /// Waits until exactly `n` executors are up.
    pub async fn wait_for_executors_up(
        &self,
        n: usize,
        timeout: Duration,
    ) -> anyhow::Result<Vec<pb::Executor>> {
        wait_for(&format!("{n} executors up"), timeout, || async move {
            let executors = self.executors().await?;
            let up = executors.iter().filter(|e| e.state == "up").count();
            Ok((up == n).then_some(executors))
        })
        .await
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Submits through any server, retrying through elections (the idempotency key makes that safe).
pub async fn submit_task(cluster_addrs: &[String], spec: pb::TaskSpec) -> anyhow::Result<u64> {
    let any_server = colony_client::Client::new(
        cluster_addrs,
        Duration::from_secs(30),
        &auth_for(&cluster_addrs[0])?,
    )?;
    let reply = any_server
        .call("submit a task", |mut c| {
            let request = pb::SubmitTaskRequest { spec: Some(spec.clone()) };
            async move { c.submit_task(request).await }
        })
        .await?;
    reply.task.map(|t| t.id).ok_or_else(|| anyhow::anyhow!("no task in the answer"))
}

pub async fn get_task(cluster_addrs: &[String], id: u64) -> anyhow::Result<pb::Task> {
    let any_server = colony_client::Client::new(
        cluster_addrs,
        Duration::from_secs(3),
        &auth_for(&cluster_addrs[0])?,
    )?;
    let reply = any_server
        .call("get a task", |mut c| async move {
            c.get_task(pb::GetTaskRequest { id, consistency: None }).await
        })
        .await?;
    reply.task.ok_or_else(|| anyhow::anyhow!("no task in the answer"))
}

pub fn task_state(task: &pb::Task) -> pb::TaskState {
    pb::TaskState::try_from(task.state).unwrap_or(pb::TaskState::Unspecified)
}

pub fn task_finished(task: &pb::Task) -> bool {
    matches!(
        task_state(task),
        pb::TaskState::Succeeded
            | pb::TaskState::Failed
            | pb::TaskState::Cancelled
            | pb::TaskState::TimedOut
            | pb::TaskState::Lost
    )
}

/// Waits until the task satisfies `done`, returning it.
pub async fn wait_task(
    addrs: &[String],
    id: u64,
    what: &str,
    timeout: Duration,
    done: impl Fn(&pb::Task) -> bool,
) -> anyhow::Result<pb::Task> {
    wait_for(&format!("task {id} {what}"), timeout, || async {
        let task = get_task(addrs, id).await?;
        Ok(done(&task).then_some(task))
    })
    .await
}

/// A `/bin/sh -c SCRIPT` task needing the `shell` capability.
pub fn shell_task(
    name: &str,
    script: &str,
    cpu_millis: u64,
    memory_mib: u64,
    priority: u32,
    retries: u32,
) -> pb::TaskSpec {
    pb::TaskSpec {
        name: name.to_owned(),
        namespace: "default".to_owned(),
        capabilities: vec!["shell".to_owned()],
        resources: Some(pb::Resources {
            cpu_millis,
            memory_bytes: memory_mib << 20,
            gpus: 0,
            custom: Default::default(),
        }),
        priority,
        max_retries: retries,
        run: Some(pb::task_spec::Run::Process(pb::ProcessRun {
            program: "/bin/sh".into(),
            args: vec!["-c".into(), script.to_owned()],
            env: Default::default(),
        })),
        idempotency_key: Some(format!("{name}-{:016x}", rand::random::<u64>())),
        ..Default::default()
    }
}

/// A process-task spec, as the CLI would build it.
pub fn task_spec(name: &str, idempotency_key: Option<String>) -> pb::TaskSpec {
    pb::TaskSpec {
        name: name.to_owned(),
        namespace: "default".to_owned(),
        resources: Some(pb::Resources {
            cpu_millis: 250,
            memory_bytes: 64 << 20,
            gpus: 0,
            custom: Default::default(),
        }),
        priority: 10,
        run: Some(pb::task_spec::Run::Process(pb::ProcessRun {
            program: "/bin/echo".into(),
            args: vec!["hi".into()],
            env: Default::default(),
        })),
        idempotency_key,
        ..Default::default()
    }
}

/// Every task id a server holds in its own applied state (a stale read: no forwarding).
pub async fn local_task_ids(addr: &str) -> anyhow::Result<Vec<u64>> {
    let mut c = client(addr).await?;
    let mut ids = Vec::new();
    let mut after_id = 0;
    loop {
        let page = c
            .list_tasks(pb::ListTasksRequest {
                after_id,
                page_size: 5000,
                consistency: Some(pb::ReadConsistency { stale: true }),
                ..Default::default()
            })
            .await?
            .into_inner();
        ids.extend(page.tasks.iter().map(|t| t.id));
        if page.next_after_id == 0 {
            return Ok(ids);
        }
        after_id = page.next_after_id;
    }
}

/// Waits until the server at `addr` holds exactly `expected` in its own applied state. A task the
/// clients never had acknowledged fails at once: it would be a write nobody asked for.
pub async fn wait_for_exact_tasks(
    server: &Server,
    expected: &BTreeSet<u64>,
    timeout: Duration,
) -> anyhow::Result<()> {
    let addr = server.addr.clone();
    wait_for(
        &format!("server {} to hold exactly the {} acknowledged tasks", server.id, expected.len()),
        timeout,
        || {
            let addr = addr.clone();
            async move {
                let ids: BTreeSet<u64> = local_task_ids(&addr).await?.into_iter().collect();
                let unexpected: Vec<&u64> = ids.difference(expected).collect();
                anyhow::ensure!(
                    unexpected.is_empty(),
                    "server holds tasks that were never acknowledged: {unexpected:?}"
                );
                Ok((&ids == expected).then_some(()))
            }
        },
    )
    .await
}

/// A plain HTTP/1.0 GET: the status code and the body.
pub fn http_get(addr: &str, path: &str) -> anyhow::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response.split_once("\r\n\r\n").context("no header end in the response")?;
    let code = head.split_whitespace().nth(1).context("no status code")?.parse()?;
    Ok((code, body.to_owned()))
}

/// The value of an unlabelled sample in a Prometheus text exposition.
pub fn sample(exposition: &str, name: &str) -> Option<f64> {
    exposition
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}
