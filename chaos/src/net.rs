//! The suite's test hosts: one network namespace per process, each with a veth pair onto one
//! bridge, addresses in 10.213.0.0/24 (used nowhere else), and the nftables rules that make the
//! faults: partitions, packet loss, and the redirects that send a link through the slow proxy.
//! Every rule lives inside a host's namespace, so nothing outside the suite's namespaces sees it.

use anyhow::{bail, Context as _, Result};
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::time::Duration;
use tokio::process::Command;

/// Namespaces are named `colony-chaos-<host>`; a crashed run's leftovers are found by this prefix.
const NS_PREFIX: &str = "colony-chaos-";
const BRIDGE: &str = "colchaos0";
/// The controller's address on the bridge (in the root namespace): clients and checks use it.
pub const CONTROLLER_IP: Ipv4Addr = Ipv4Addr::new(10, 213, 0, 1);
const PREFIX_LEN: u8 = 24;
/// Written while a run owns the namespaces, so a second run refuses instead of tearing them down.
const PID_FILE: &str = "/run/colony-chaos.pid";
/// The source name of the suite's tmpfs mounts, so a crashed run's mounts can be found.
pub const MOUNT_SOURCE: &str = "colony-chaos";
/// The group the slow-link proxy runs as; the redirect rules skip its sockets.
pub const PROXY_GID: u32 = 4213;
const COMMAND_TIMEOUT: Duration = Duration::from_secs(20);

/// One test host: a namespace with one address.
#[derive(Clone, Debug)]
pub struct Host {
    /// `s1`, `e2`: what the report and logs call it.
    pub name: String,
    pub ip: Ipv4Addr,
}

impl Host {
    pub fn namespace(&self) -> String {
        format!("{NS_PREFIX}{}", self.name)
    }
}

/// Runs a command to completion; a non-zero exit is an error carrying its stderr.
pub async fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<String> {
    use tokio::io::AsyncWriteExt as _;
    let mut command = Command::new(program);
    command
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    command.stdin(if stdin.is_some() {
        std::process::Stdio::piped()
    } else {
        std::process::Stdio::null()
    });
    let mut child = command.spawn().with_context(|| format!("cannot run {program}"))?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())
            .await
            .with_context(|| format!("cannot write to {program}"))?;
    }
    let output =
        tokio::time::timeout(COMMAND_TIMEOUT, child.wait_with_output()).await.with_context(
            || format!("{program} {} did not finish in {COMMAND_TIMEOUT:?}", args.join(" ")),
        )??;
    if !output.status.success() {
        bail!(
            "{program} {} failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Checks, before anything is started, that this process can build the test hosts, and says
/// exactly what is missing when it cannot.
pub async fn preflight() -> Result<()> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("cannot read /proc/self/status")?;
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("?");
    if euid != "0" {
        bail!("the chaos suite needs root (it creates network namespaces and nftables rules); running as uid {euid}");
    }
    for tool in ["ip", "nft", "conntrack", "faketime", "mount", "fallocate"] {
        if run("sh", &["-c", &format!("command -v {tool}")], None).await.is_err() {
            bail!("`{tool}` is not installed (chaos/run installs nftables, conntrack and faketime with apt-get)");
        }
    }
    let probe = format!("{NS_PREFIX}probe");
    let _ = run("ip", &["netns", "del", &probe], None).await;
    run("ip", &["netns", "add", &probe], None)
        .await
        .context("cannot create a network namespace")?;
    let nft =
        run("ip", &["netns", "exec", &probe, "nft", "add", "table", "inet", "probe"], None).await;
    run("ip", &["netns", "del", &probe], None).await?;
    nft.context("cannot create nftables rules inside a namespace")?;
    Ok(())
}

/// The bridge and the hosts on it. Dropping it does not clean up; call [`Net::destroy`].
pub struct Net {
    hosts: BTreeMap<String, Host>,
}

impl Net {
    /// Removes what a crashed earlier run left behind, unless that run is still alive.
    pub async fn claim() -> Result<()> {
        if let Ok(text) = std::fs::read_to_string(PID_FILE) {
            if let Ok(pid) = text.trim().parse::<i32>() {
                let alive = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok();
                if alive && pid != std::process::id() as i32 {
                    bail!(
                        "another chaos run (pid {pid}) owns the test hosts; wait for it or kill it"
                    );
                }
            }
        }
        std::fs::write(PID_FILE, std::process::id().to_string())
            .with_context(|| format!("cannot write {PID_FILE}"))?;
        Self::remove_all().await;
        Ok(())
    }

    async fn remove_all() {
        if let Ok(list) = run("ip", &["netns", "list"], None).await {
            for ns in list
                .lines()
                .filter_map(|l| l.split_whitespace().next())
                .filter(|n| n.starts_with(NS_PREFIX))
            {
                // Anything still inside (a task's orphaned child) would keep the namespace and
                // its veth alive after the name is gone.
                if let Ok(pids) = run("ip", &["netns", "pids", ns], None).await {
                    for pid in pids.split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(pid),
                            nix::sys::signal::Signal::SIGKILL,
                        );
                    }
                }
                let _ = run("ip", &["netns", "del", ns], None).await;
            }
        }
        if let Ok(links) = run("ip", &["-o", "link", "show"], None).await {
            for link in links
                .lines()
                .filter_map(|l| l.split(": ").nth(1))
                .filter_map(|n| n.split('@').next())
                .filter(|n| n.starts_with("cc-"))
            {
                let _ = run("ip", &["link", "del", link], None).await;
            }
        }
        let _ = run("ip", &["link", "del", BRIDGE], None).await;
        if let Ok(mounts) = std::fs::read_to_string("/proc/mounts") {
            for point in mounts.lines().filter_map(|l| {
                l.strip_prefix(MOUNT_SOURCE).and_then(|rest| rest.split_whitespace().next())
            }) {
                let _ = run("umount", &["-l", point], None).await;
            }
        }
    }

    /// Creates the bridge (with the controller's address) and one namespace per host.
    pub async fn create(hosts: &[Host]) -> Result<Net> {
        run("ip", &["link", "add", BRIDGE, "type", "bridge"], None).await?;
        run("ip", &["addr", "add", &format!("{CONTROLLER_IP}/{PREFIX_LEN}"), "dev", BRIDGE], None)
            .await?;
        run("ip", &["link", "set", BRIDGE, "up"], None).await?;
        for host in hosts {
            let ns = host.namespace();
            let outer = format!("cc-{}", host.name);
            run("ip", &["netns", "add", &ns], None).await?;
            run(
                "ip",
                &["link", "add", &outer, "type", "veth", "peer", "name", "eth0", "netns", &ns],
                None,
            )
            .await?;
            run("ip", &["link", "set", &outer, "master", BRIDGE, "up"], None).await?;
            let inside: [&[&str]; 3] = [
                &["addr", "add", &format!("{}/{PREFIX_LEN}", host.ip), "dev", "eth0"],
                &["link", "set", "eth0", "up"],
                &["link", "set", "lo", "up"],
            ];
            for args in inside {
                let mut full = vec!["-n", ns.as_str()];
                full.extend_from_slice(args);
                run("ip", &full, None).await?;
            }
        }
        Ok(Net { hosts: hosts.iter().map(|h| (h.name.clone(), h.clone())).collect() })
    }

    pub async fn destroy(&self) {
        Self::release().await;
    }

    /// Removes every test host and gives up the claim.
    pub async fn release() {
        Self::remove_all().await;
        let _ = std::fs::remove_file(PID_FILE);
    }

    fn host(&self, name: &str) -> Result<&Host> {
        self.hosts.get(name).with_context(|| format!("no test host named {name}"))
    }

    pub fn ip(&self, name: &str) -> Result<Ipv4Addr> {
        Ok(self.host(name)?.ip)
    }

    /// Loads an nftables script inside a host's namespace.
    async fn nft(&self, host: &str, script: &str) -> Result<()> {
        let ns = self.host(host)?.namespace();
        run("ip", &["netns", "exec", &ns, "nft", "-f", "-"], Some(script)).await.map(|_| ())
    }

    async fn drop_table(&self, host: &str, family: &str, table: &str) -> Result<()> {
        let ns = self.host(host)?.namespace();
        match run("ip", &["netns", "exec", &ns, "nft", "delete", "table", family, table], None)
            .await
        {
            Err(e) if e.to_string().contains("No such file") => Ok(()),
            other => other.map(|_| ()),
        }
    }

    /// Applies a partition: each host drops every packet arriving from the hosts named against it
    /// (a "grudge", as Jepsen calls it). A symmetric cut names each side in the other's grudge.
    pub async fn partition(&self, grudge: &BTreeMap<String, BTreeSet<String>>) -> Result<()> {
        for (host, from) in grudge.iter().filter(|(_, from)| !from.is_empty()) {
            let addrs = from
                .iter()
                .map(|h| self.ip(h).map(|ip| ip.to_string()))
                .collect::<Result<Vec<_>>>()?
                .join(", ");
            let script = format!(
                "table inet chaos_partition {{\n  chain input {{ type filter hook input priority -10; ip saddr {{ {addrs} }} drop; }}\n}}\n"
            );
            self.nft(host, &script).await.with_context(|| format!("cannot partition {host}"))?;
        }
        Ok(())
    }

    /// Drops each packet arriving on these hosts from other test hosts with this probability.
    pub async fn lose(&self, hosts: &[String], percent: u32) -> Result<()> {
        for host in hosts {
            let script = format!(
                "table inet chaos_loss {{\n  chain input {{ type filter hook input priority -10; ip saddr 10.213.0.0/{PREFIX_LEN} numgen random mod 100 < {percent} drop; }}\n}}\n"
            );
            self.nft(host, &script)
                .await
                .with_context(|| format!("cannot add packet loss on {host}"))?;
        }
        Ok(())
    }

    /// Sends this host's new TCP connections and UDP flows to `to` through local ports where the
    /// proxy listens (`redirects`: destination port -> proxy port, per protocol), and forgets
    /// tracked flows so established ones are redirected (or reset) too.
    pub async fn redirect(
        &self,
        host: &str,
        to: Ipv4Addr,
        redirects: &[(&str, u16, u16)],
    ) -> Result<()> {
        let rules: String = redirects
            .iter()
            .map(|(proto, port, proxy)| format!("    ip daddr {to} {proto} dport {port} meta skgid != {PROXY_GID} redirect to :{proxy};\n"))
            .collect();
        let table = format!("chaos_slow_{}", to.octets()[3]);
        let script = format!("table ip {table} {{\n  chain output {{\n    type nat hook output priority -100;\n{rules}  }}\n}}\n");
        self.nft(host, &script)
            .await
            .with_context(|| format!("cannot redirect {host}'s traffic to {to}"))?;
        self.forget_flows(host).await
    }

    async fn forget_flows(&self, host: &str) -> Result<()> {
        let ns = self.host(host)?.namespace();
        match run("ip", &["netns", "exec", &ns, "conntrack", "-F"], None).await {
            Ok(_) => Ok(()),
            Err(e) => Err(e.context(format!("cannot flush tracked connections on {host}"))),
        }
    }

    /// Removes every fault rule from every host.
    pub async fn heal(&self) -> Result<()> {
        for host in self.hosts.values() {
            let ns = host.namespace();
            let tables = run("ip", &["netns", "exec", &ns, "nft", "list", "tables"], None).await?;
            let mut redirected = false;
            for line in tables.lines() {
                let mut words = line.split_whitespace().skip(1);
                let (Some(family), Some(table)) = (words.next(), words.next()) else { continue };
                if table.starts_with("chaos_") {
                    self.drop_table(&host.name, family, table).await?;
                    redirected |= table.starts_with("chaos_slow_");
                }
            }
            if redirected {
                self.forget_flows(&host.name).await?;
            }
        }
        Ok(())
    }
}
