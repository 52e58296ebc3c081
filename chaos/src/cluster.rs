//! The cluster under test: servers and executors in their namespaces, the slow-link proxies the
//! nemeses start, and what the suite asks the servers directly (status, leader, digests).

use crate::net::{Host, Net, PROXY_GID};
use crate::procs::{Proc, Role, SERVER_PORT};
use anyhow::{bail, Context as _, Result};
use colony_client::{Auth, Channel, Client, ClientConfig};
use colony_proto::pb::admin_client::AdminClient;
use colony_proto::pb::{self, ReadConsistency};
use std::net::Ipv4Addr;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

const STATUS_TIMEOUT: Duration = Duration::from_secs(2);
const FORM_TIMEOUT: Duration = Duration::from_secs(60);
/// What each executor offers.
const EXECUTOR_CPU: &str = "4";
const EXECUTOR_MEMORY: &str = "4Gi";
/// The disk nemesis's file that fills a server's data directory.
pub const FILL_FILE: &str = "chaos-fill";

pub struct Cluster {
    pub net: Net,
    pub servers: Vec<Proc>,
    pub executors: Vec<Proc>,
    /// One channel per server, in the order of `servers`.
    pub channels: Vec<(String, Channel)>,
    proxies: Vec<std::process::Child>,
    unsafe_stale_reads: bool,
    pub run_dir: PathBuf,
    next_node_id: u64,
    /// The management token bootstrapped at start: every call the suite makes carries it.
    pub auth: Auth,
}

pub fn server_host(i: usize) -> Host {
    Host { name: format!("s{}", i + 1), ip: Ipv4Addr::new(10, 213, 0, 11 + i as u8) }
}

pub fn executor_host(i: usize) -> Host {
    Host { name: format!("e{}", i + 1), ip: Ipv4Addr::new(10, 213, 0, 31 + i as u8) }
}

/// Every server checks the state machine's invariants after each entry it applies, so a
/// corrupted state stops the run at the entry that broke it, not at the end-of-run checks.
fn restart_args(data_dir: &Path, unsafe_stale_reads: bool) -> Vec<String> {
    let data_dir = data_dir.display().to_string();
    let mut args = vec![
        "server".to_owned(),
        "--data-dir".to_owned(),
        data_dir,
        "--check-invariants".to_owned(),
    ];
    if unsafe_stale_reads {
        args.push("--unsafe-stale-reads".to_owned());
    }
    args
}

async fn wait_until<T, F, Fut>(what: &str, limit: Duration, mut probe: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(value) = probe().await {
            return Ok(value);
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub async fn status(channel: &Channel) -> Option<pb::ClusterStatusResponse> {
    let mut client = AdminClient::new(channel.clone());
    tokio::time::timeout(STATUS_TIMEOUT, client.cluster_status(pb::ClusterStatusRequest {}))
        .await
        .ok()?
        .ok()
        .map(tonic::Response::into_inner)
}

impl Cluster {
    /// Builds the hosts, then starts the servers one by one (the first bootstraps, the others
    /// join it), then the executors with a fresh join token.
    pub async fn start(
        run_dir: &Path,
        servers: usize,
        executors: usize,
        unsafe_stale_reads: bool,
    ) -> Result<Cluster> {
        let server_hosts: Vec<Host> = (0..servers).map(server_host).collect();
        let executor_hosts: Vec<Host> = (0..executors).map(executor_host).collect();
        let all: Vec<Host> = server_hosts.iter().chain(&executor_hosts).cloned().collect();
        let net = Net::create(&all).await?;
        let first = format!("{}:{SERVER_PORT}", server_hosts[0].ip);
        let mut hosts = server_hosts.into_iter();
        let first_host = hosts.next().context("a cluster needs a server")?;
        // The first server bootstraps; ACLs are bootstrapped through it, trusting the CA its data
        // directory holds, before anything else talks to the cluster.
        let mut proc = Proc::new(first_host, Role::Server, 1, run_dir, Vec::new());
        let mut args = vec!["server".to_owned(), "--id".to_owned(), "1".to_owned()];
        args.extend(["--listen".to_owned(), proc.addr(), "--bootstrap".to_owned()]);
        args.extend(restart_args(&proc.data_dir, unsafe_stale_reads).into_iter().skip(1));
        proc.set_args(args);
        proc.mount_data().await?;
        proc.start()?;
        let ca_file = proc.data_dir.join("tls").join("ca.pem");
        let ca_pem = wait_until("the first server's CA certificate", FORM_TIMEOUT, || async {
            std::fs::read_to_string(&ca_file).ok()
        })
        .await?;
        let bootstrapped = colony_client::bootstrap_acl(
            std::slice::from_ref(&first),
            colony_quic::Trust::Ca(ca_pem),
            FORM_TIMEOUT,
        )
        .await
        .context("cannot bootstrap ACLs")?;
        let mut cluster = Cluster {
            net,
            servers: Vec::new(),
            executors: Vec::new(),
            channels: Vec::new(),
            proxies: Vec::new(),
            unsafe_stale_reads,
            run_dir: run_dir.to_owned(),
            next_node_id: servers as u64 + 1,
            auth: Auth::token(&bootstrapped.secret)?,
        };
        let mut started_first = Some(proc);
        for i in 0..servers {
            let id = i as u64 + 1;
            let mut proc = if let Some(first) = started_first.take() {
                first
            } else {
                let host = hosts.next().context("a host per server")?;
                let mut proc = Proc::new(host, Role::Server, id, run_dir, Vec::new());
                let token = cluster.join_token("server").await?;
                let mut args = vec!["server".to_owned(), "--id".to_owned(), id.to_string()];
                args.extend(["--listen".to_owned(), proc.addr(), "--join".to_owned()]);
                args.extend([first.clone(), "--token".to_owned(), token]);
                args.extend(restart_args(&proc.data_dir, unsafe_stale_reads).into_iter().skip(1));
                proc.set_args(args);
                proc.mount_data().await?;
                proc.start()?;
                proc
            };
            let channel = crate::workload::channel(&proc.addr(), &cluster.auth)?;
            cluster.channels.push((proc.host.name.clone(), channel.clone()));
            proc.set_args(restart_args(&proc.data_dir, unsafe_stale_reads));
            cluster.servers.push(proc);
            let voters = i + 1;
            wait_until(
                &format!("server {id} to join (a leader and {voters} members)"),
                FORM_TIMEOUT,
                || {
                    let channel = channel.clone();
                    async move {
                        status(&channel)
                            .await
                            .filter(|s| s.leader_id.is_some() && s.members.len() >= voters)
                            .map(|_| ())
                    }
                },
            )
            .await?;
        }
        let token = cluster.join_token("executor").await?;
        let joins: Vec<String> = cluster.servers.iter().map(Proc::addr).collect();
        for host in executor_hosts {
            let name = host.name.clone();
            let mut proc = Proc::new(host, Role::Executor, 0, run_dir, Vec::new());
            let data_dir = proc.data_dir.display().to_string();
            proc.set_args(
                [
                    "executor",
                    "--join",
                    &joins.join(","),
                    "--token",
                    &token,
                    "--data-dir",
                    &data_dir,
                    "--name",
                    &name,
                    "--cpu",
                    EXECUTOR_CPU,
                    "--memory",
                    EXECUTOR_MEMORY,
                ]
                .map(str::to_owned)
                .to_vec(),
            );
            proc.mount_data().await?;
            proc.start()?;
            proc.set_args(
                ["executor", "--join", &joins.join(","), "--data-dir", &data_dir, "--name", &name]
                    .map(str::to_owned)
                    .to_vec(),
            );
            cluster.executors.push(proc);
        }
        let wanted = executors;
        let channel = cluster.channels[0].1.clone();
        wait_until(&format!("{wanted} executors to be up"), FORM_TIMEOUT, || {
            let channel = channel.clone();
            async move {
                let request = pb::ListExecutorsRequest {
                    consistency: Some(ReadConsistency { stale: false }),
                };
                let answer = tokio::time::timeout(
                    STATUS_TIMEOUT,
                    AdminClient::new(channel).list_executors(request),
                )
                .await
                .ok()?
                .ok()?;
                (answer.into_inner().executors.iter().filter(|e| e.state == "up").count() >= wanted)
                    .then_some(())
            }
        })
        .await?;
        Ok(cluster)
    }

    /// A join token of `kind` from any server, once the cluster CA exists (until then the
    /// servers refuse).
    pub async fn join_token(&self, kind: &str) -> Result<String> {
        let any_server =
            Client::from_channels(self.channels.clone(), ClientConfig::new(STATUS_TIMEOUT))?;
        wait_until("a join token", FORM_TIMEOUT, || {
            let any_server = any_server.clone();
            async move {
                let request =
                    pb::CreateJoinTokenRequest { ttl_ms: 3_600_000, kind: kind.to_owned() };
                any_server
                    .call("create a join token", |mut c| {
                        let request = request.clone();
                        async move { c.create_join_token(request).await }
                    })
                    .await
                    .ok()
                    .map(|r| r.token)
            }
        })
        .await
    }

    /// The index in `servers` of the server that a majority of the running servers' answers
    /// name as leader in the highest term seen, if any.
    pub async fn leader(&self) -> Option<usize> {
        let answers = futures::future::join_all(
            self.servers
                .iter()
                .zip(&self.channels)
                .filter(|(p, _)| p.running() && !p.paused)
                .map(|(_, (_, c))| status(c)),
        )
        .await;
        let best =
            answers.iter().flatten().filter(|s| s.state == "leader").max_by_key(|s| s.term)?;
        self.servers.iter().position(|p| p.node_id == best.node_id)
    }

    pub fn server_names(&self) -> Vec<String> {
        self.servers.iter().map(|p| p.host.name.clone()).collect()
    }

    pub fn executor_names(&self) -> Vec<String> {
        self.executors.iter().map(|p| p.host.name.clone()).collect()
    }

    /// Starts the proxy for a set of links inside one host, as the group the redirect rules skip.
    pub fn start_proxy(
        &mut self,
        host: &str,
        links: &[String],
        faults: &[String],
        seed: u64,
    ) -> Result<()> {
        let ns = format!("colony-chaos-{host}");
        let exe = std::env::current_exe().context("cannot find the colony binary")?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.run_dir.join("logs").join(format!("proxy-{host}.log")))?;
        let mut command = std::process::Command::new("ip");
        command.args(["netns", "exec", &ns]).arg(exe).args([
            "chaos",
            "proxy",
            "--seed",
            &seed.to_string(),
        ]);
        for link in links {
            command.arg("--link").arg(link);
        }
        command.args(faults).arg("--parent-pid").arg(std::process::id().to_string());
        command
            .gid(PROXY_GID)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        self.proxies
            .push(command.spawn().with_context(|| format!("cannot start the proxy in {host}"))?);
        Ok(())
    }

    pub fn stop_proxies(&mut self) {
        for mut proxy in self.proxies.drain(..) {
            let _ = proxy.kill();
            let _ = proxy.wait();
        }
    }

    pub fn next_node_id(&mut self) -> u64 {
        let id = self.next_node_id;
        self.next_node_id += 1;
        id
    }

    /// Undoes every fault: rules, proxies, pauses, skewed clocks, full disks, stopped processes.
    /// Returns the processes that had exited on their own since the last look.
    pub async fn heal(&mut self) -> Result<Vec<String>> {
        self.net.heal().await?;
        self.stop_proxies();
        let mut exited = Vec::new();
        for proc in self.servers.iter_mut().chain(self.executors.iter_mut()) {
            proc.resume()?;
            let fill = proc.data_dir.join(FILL_FILE);
            if fill.exists() {
                std::fs::remove_file(&fill)
                    .with_context(|| format!("cannot remove {}", fill.display()))?;
            }
            if let Some(how) = proc.exited() {
                exited.push(format!("{} ({how})", proc.host.name));
            }
            if proc.clock_skew.is_some() {
                proc.stop().await;
                proc.clock_skew = None;
            }
            if !proc.running() {
                proc.start()?;
            }
        }
        Ok(exited)
    }

    /// Stops everything and removes the hosts (the data and logs stay).
    pub async fn shutdown(&mut self) {
        self.stop_proxies();
        for proc in self.servers.iter_mut().chain(self.executors.iter_mut()) {
            proc.stop().await;
            if let Err(e) = proc.unmount_data().await {
                tracing::warn!("{}'s data directory: {e:#}", proc.host.name);
            }
        }
        self.net.destroy().await;
    }

    /// Arguments to start a server again on a wiped data directory under a new id, joining
    /// through the others.
    pub fn rejoin_args(&self, index: usize, id: u64, token: &str) -> Vec<String> {
        let proc = &self.servers[index];
        let others: Vec<String> = self
            .servers
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != index)
            .map(|(_, p)| p.addr())
            .collect();
        let mut args = vec![
            "server".to_owned(),
            "--id".to_owned(),
            id.to_string(),
            "--listen".to_owned(),
            proc.addr(),
            "--join".to_owned(),
            others.join(","),
            "--token".to_owned(),
            token.to_owned(),
        ];
        args.extend(restart_args(&proc.data_dir, self.unsafe_stale_reads).into_iter().skip(1));
        args
    }

    pub fn restart_args(&self, index: usize) -> Vec<String> {
        restart_args(&self.servers[index].data_dir, self.unsafe_stale_reads)
    }
}
