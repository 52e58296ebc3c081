//! The faults. A seed fixes the schedule: which nemesis comes when, for how long, and every
//! random choice it makes (which server, which split, how much loss or delay). Choices that
//! depend on the run, such as who leads, are resolved when the fault starts.

use crate::cluster::{Cluster, FILL_FILE};
use crate::procs::SERVER_PORT;
use anyhow::{bail, Context as _, Result};
use colony_client::{Client, ClientConfig, ClientError};
use colony_proto::pb;
use rand::rngs::StdRng;
use rand::seq::SliceRandom as _;
use rand::{Rng as _, SeedableRng as _};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Nemesis {
    /// Cut one random server off from the other servers.
    PartitionOne,
    /// Cut the leader off from the other servers.
    PartitionLeader,
    /// Split the servers into a majority and a minority.
    PartitionHalves,
    /// Each server hears only the next majority of servers around a ring.
    PartitionRing,
    /// Two halves that only one bridge server hears both of.
    PartitionBridge,
    /// One server (the leader, half the time) hears no other server, but they hear it.
    PartitionOneWay,
    /// Cut executors off from every server.
    PartitionExecutors,
    /// Random packet loss on every link.
    Loss,
    /// kill -9 of one server, then a restart on the same data.
    KillOne,
    /// kill -9 of the leader, then a restart.
    KillLeader,
    /// kill -9 of a minority of the servers, then restarts.
    KillMinority,
    /// kill -9 of every server, then restarts.
    KillAll,
    /// kill -9 of one executor, then a restart on the same data (its attempts fail over; none
    /// may run twice).
    KillExecutor,
    /// SIGSTOP of the leader (or another server) for longer than an election timeout.
    Pause,
    /// Delay and jitter on every link, and duplicated, reordered datagrams on the executors'.
    Slow,
    /// Remove a server and add it back (wiped, under a new id) while packets are lost.
    Membership,
    /// Restart a server with its wall clock minutes off.
    Clock,
    /// Fill a server's data directory.
    DiskFull,
}

impl Nemesis {
    pub const ALL: [Nemesis; 18] = [
        Nemesis::PartitionOne,
        Nemesis::PartitionLeader,
        Nemesis::PartitionHalves,
        Nemesis::PartitionRing,
        Nemesis::PartitionBridge,
        Nemesis::PartitionOneWay,
        Nemesis::PartitionExecutors,
        Nemesis::Loss,
        Nemesis::KillOne,
        Nemesis::KillLeader,
        Nemesis::KillMinority,
        Nemesis::KillAll,
        Nemesis::KillExecutor,
        Nemesis::Pause,
        Nemesis::Slow,
        Nemesis::Membership,
        Nemesis::Clock,
        Nemesis::DiskFull,
    ];

    pub fn name(self) -> String {
        serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default()
    }

    /// `all`, a group (`partition`, `kill`), or one name.
    pub fn parse_set(text: &str) -> Result<Vec<Nemesis>> {
        let mut set = BTreeSet::new();
        for word in text.split(',').map(str::trim).filter(|w| !w.is_empty()) {
            let matched: Vec<Nemesis> = match word {
                "all" => Self::ALL.to_vec(),
                "partition" | "kill" => {
                    Self::ALL.iter().copied().filter(|n| n.name().starts_with(word)).collect()
                }
                _ => Self::ALL.iter().copied().filter(|n| n.name() == word).collect(),
            };
            if matched.is_empty() {
                let names: Vec<String> = Self::ALL.iter().map(|n| n.name()).collect();
                bail!(
                    "unknown nemesis {word:?}; use all, partition, kill, or one of {}",
                    names.join(", ")
                );
            }
            set.extend(matched);
        }
        if set.is_empty() {
            bail!("no nemesis given");
        }
        Ok(set.into_iter().collect())
    }
}

/// One entry of the schedule, fixed by the seed.
#[derive(Clone, Debug, Serialize)]
pub struct Planned {
    pub nemesis: Nemesis,
    #[serde(with = "humantime_serde_ms")]
    pub fault_for: Duration,
    #[serde(with = "humantime_serde_ms")]
    pub quiet_after: Duration,
    /// Seeds this fault's own random choices.
    pub seed: u64,
}

mod humantime_serde_ms {
    pub fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }
}

/// The schedule for a seed: every nemesis of the set in a shuffled order, then again in another
/// order, as many rounds as the run is long (the caller stops when the time is up).
pub fn schedule(set: &[Nemesis], seed: u64, fault_time: Duration, rounds: usize) -> Vec<Planned> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut plan = Vec::new();
    let base = fault_time.as_millis() as u64;
    for _ in 0..rounds {
        let mut order = set.to_vec();
        order.shuffle(&mut rng);
        for nemesis in order {
            plan.push(Planned {
                nemesis,
                fault_for: Duration::from_millis(rng.gen_range(base / 2..=base * 3 / 2)),
                quiet_after: Duration::from_millis(rng.gen_range(1_000..=3_000)),
                seed: rng.gen(),
            });
        }
    }
    plan
}

fn cut(grudge: &mut BTreeMap<String, BTreeSet<String>>, a: &[String], b: &[String]) {
    for x in a {
        grudge.entry(x.clone()).or_default().extend(b.iter().cloned());
    }
    for y in b {
        grudge.entry(y.clone()).or_default().extend(a.iter().cloned());
    }
}

fn describe(grudge: &BTreeMap<String, BTreeSet<String>>) -> String {
    grudge
        .iter()
        .filter(|(_, from)| !from.is_empty())
        .map(|(host, from)| {
            format!(
                "{host} hears nothing from {}",
                from.iter().cloned().collect::<Vec<_>>().join(",")
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Starts a fault; returns what it did, in words, for the report.
pub async fn apply(cluster: &mut Cluster, planned: &Planned) -> Result<String> {
    let mut rng = StdRng::seed_from_u64(planned.seed);
    let servers = cluster.server_names();
    let n = servers.len();
    let random = rng.gen_range(0..n);
    match planned.nemesis {
        Nemesis::PartitionOne | Nemesis::PartitionLeader => {
            let target = if planned.nemesis == Nemesis::PartitionLeader {
                cluster.leader().await.unwrap_or(random)
            } else {
                random
            };
            let alone = vec![servers[target].clone()];
            let others: Vec<String> =
                servers.iter().filter(|s| **s != servers[target]).cloned().collect();
            let mut grudge = BTreeMap::new();
            cut(&mut grudge, &alone, &others);
            cluster.net.partition(&grudge).await?;
            Ok(format!("isolated {}", servers[target]))
        }
        Nemesis::PartitionHalves => {
            let mut shuffled = servers.clone();
            shuffled.shuffle(&mut rng);
            let (minority, majority) = shuffled.split_at(n / 2);
            let mut grudge = BTreeMap::new();
            cut(&mut grudge, minority, majority);
            cluster.net.partition(&grudge).await?;
            Ok(format!("minority {} | majority {}", minority.join(","), majority.join(",")))
        }
        Nemesis::PartitionRing => {
            let mut ring = servers.clone();
            ring.shuffle(&mut rng);
            let hears = n / 2;
            let grudge: BTreeMap<String, BTreeSet<String>> = (0..n)
                .map(|i| {
                    (ring[i].clone(), (hears + 1..n).map(|d| ring[(i + d) % n].clone()).collect())
                })
                .collect();
            cluster.net.partition(&grudge).await?;
            Ok(format!("ring {}: {}", ring.join("→"), describe(&grudge)))
        }
        Nemesis::PartitionBridge => {
            let mut shuffled = servers.clone();
            shuffled.shuffle(&mut rng);
            let bridge = shuffled.remove(0);
            let (left, right) = shuffled.split_at(shuffled.len() / 2);
            let mut grudge = BTreeMap::new();
            cut(&mut grudge, left, right);
            cluster.net.partition(&grudge).await?;
            Ok(format!("{} | bridge {bridge} | {}", left.join(","), right.join(",")))
        }
        Nemesis::PartitionOneWay => {
            let target =
                if rng.gen_bool(0.5) { cluster.leader().await.unwrap_or(random) } else { random };
            let deaf = servers[target].clone();
            let grudge = BTreeMap::from([(
                deaf.clone(),
                servers.iter().filter(|s| **s != deaf).cloned().collect(),
            )]);
            cluster.net.partition(&grudge).await?;
            Ok(format!("{deaf} hears no server; they hear it"))
        }
        Nemesis::PartitionExecutors => {
            let mut executors = cluster.executor_names();
            executors.shuffle(&mut rng);
            let count = rng.gen_range(1..=executors.len());
            let cut_off = &executors[..count];
            let mut grudge = BTreeMap::new();
            cut(&mut grudge, cut_off, &servers);
            cluster.net.partition(&grudge).await?;
            Ok(format!("cut {} from every server", cut_off.join(",")))
        }
        Nemesis::Loss => {
            let percent = rng.gen_range(10..=35);
            let hosts: Vec<String> =
                servers.iter().cloned().chain(cluster.executor_names()).collect();
            cluster.net.lose(&hosts, percent).await?;
            Ok(format!("{percent}% of packets dropped on every host"))
        }
        Nemesis::KillOne | Nemesis::KillLeader | Nemesis::KillMinority | Nemesis::KillAll => {
            let mut victims: Vec<usize> = match planned.nemesis {
                Nemesis::KillOne => vec![random],
                Nemesis::KillLeader => vec![cluster.leader().await.unwrap_or(random)],
                Nemesis::KillMinority => {
                    let mut all: Vec<usize> = (0..n).collect();
                    all.shuffle(&mut rng);
                    all.truncate((n - 1) / 2);
                    all
                }
                _ => (0..n).collect(),
            };
            victims.sort_unstable();
            for &i in &victims {
                cluster.servers[i].kill().await;
            }
            Ok(format!(
                "kill -9 {}",
                victims.iter().map(|&i| servers[i].clone()).collect::<Vec<_>>().join(",")
            ))
        }
        Nemesis::KillExecutor => {
            let index = rng.gen_range(0..cluster.executors.len());
            cluster.executors[index].kill().await;
            Ok(format!("kill -9 {}", cluster.executors[index].host.name))
        }
        Nemesis::Pause => {
            let target =
                if rng.gen_bool(0.7) { cluster.leader().await.unwrap_or(random) } else { random };
            cluster.servers[target].pause()?;
            Ok(format!("SIGSTOP {}", servers[target]))
        }
        Nemesis::Slow => {
            let delay_ms = rng.gen_range(20..=120u64);
            let jitter_ms = rng.gen_range(10..=80u64);
            let faults = [
                "--delay".to_owned(),
                format!("{delay_ms}ms"),
                "--jitter".to_owned(),
                format!("{jitter_ms}ms"),
                "--duplicate".to_owned(),
                "0.05".to_owned(),
                "--reorder".to_owned(),
            ];
            let ips: Vec<(String, std::net::Ipv4Addr)> =
                cluster.servers.iter().map(|p| (p.host.name.clone(), p.host.ip)).collect();
            for (name, _) in &ips {
                let mut links = Vec::new();
                for (peer, ip) in ips.iter().filter(|(p, _)| p != name) {
                    let proxy_port = 17_000 + u16::from(ip.octets()[3]);
                    links.push(format!("tcp:127.0.0.1:{proxy_port}={ip}:{SERVER_PORT}"));
                    cluster
                        .net
                        .redirect(name, *ip, &[("tcp", SERVER_PORT, proxy_port)])
                        .await
                        .with_context(|| format!("slowing {name}→{peer}"))?;
                }
                cluster.start_proxy(name, &links, &faults, rng.gen())?;
            }
            for executor in cluster.executor_names() {
                let mut links = Vec::new();
                for (_, ip) in &ips {
                    let proxy_port = 17_000 + u16::from(ip.octets()[3]);
                    links.push(format!("udp:127.0.0.1:{proxy_port}={ip}:{SERVER_PORT}"));
                    cluster
                        .net
                        .redirect(&executor, *ip, &[("udp", SERVER_PORT, proxy_port)])
                        .await?;
                }
                cluster.start_proxy(&executor, &links, &faults, rng.gen())?;
            }
            Ok(format!("{delay_ms} ms delay, {jitter_ms} ms jitter on server links; executors' datagrams also 5% duplicated and reordered"))
        }
        Nemesis::Membership => membership(cluster, &mut rng).await,
        Nemesis::Clock => {
            let skew_s: i64 = rng.gen_range(30..=600) * if rng.gen_bool(0.5) { 1 } else { -1 };
            let proc = &mut cluster.servers[random];
            proc.stop().await;
            proc.clock_skew = Some(format!("{skew_s:+}s"));
            proc.start()?;
            Ok(format!("restarted {} with its wall clock {skew_s:+} s off", servers[random]))
        }
        Nemesis::DiskFull => {
            let proc = &cluster.servers[random];
            let fill = proc.data_dir.join(FILL_FILE).display().to_string();
            // Megabytes until ENOSPC, then pages until ENOSPC: dd fails at the end by design.
            let script = format!("dd if=/dev/zero of={fill} bs=1M 2>/dev/null; dd if=/dev/zero of={fill} bs=4k oflag=append conv=notrunc 2>/dev/null; true");
            crate::net::run("sh", &["-c", &script], None).await?;
            let dir = proc.data_dir.display().to_string();
            let avail = crate::net::run("df", &["-B1", "--output=avail", &dir], None).await?;
            let left: u64 = avail
                .lines()
                .nth(1)
                .and_then(|l| l.trim().parse().ok())
                .context("cannot read df's answer")?;
            if left > 64 << 10 {
                bail!("{} still has {left} bytes free after filling", servers[random]);
            }
            Ok(format!("filled {}'s data directory ({left} bytes left)", servers[random]))
        }
    }
}

/// Removes a follower while 10% of packets are lost, wipes it, and adds it back under a new id.
async fn membership(cluster: &mut Cluster, rng: &mut StdRng) -> Result<String> {
    let servers = cluster.server_names();
    let leader = cluster.leader().await.context("no leader to change the membership through")?;
    let followers: Vec<usize> = (0..servers.len()).filter(|&i| i != leader).collect();
    let target = followers[rng.gen_range(0..followers.len())];
    let hosts: Vec<String> = servers.clone();
    cluster.net.lose(&hosts, 10).await?;
    let old_id = cluster.servers[target].node_id;
    // Elections may be under way (10% loss): any server forwards to the leader, so try them in
    // turn, the leader first, until one answers or 20 s pass.
    let mut channels = cluster.channels.clone();
    channels.rotate_left(leader);
    let any_server = Client::from_channels(channels, ClientConfig::new(Duration::from_secs(20)))?;
    let request = pb::RemoveNodeRequest { node_id: old_id };
    match any_server.call("remove node", |mut c| async move { c.remove_node(request).await }).await
    {
        Ok(_) => {}
        // Already removed: an earlier attempt committed but its answer was lost.
        Err(ClientError::Answered { status, .. }) if status.code() == tonic::Code::NotFound => {}
        Err(e) => bail!("removing node {old_id} failed: {e}"),
    }
    // The wiped server enrolls again, with a server join token.
    let request = pb::CreateJoinTokenRequest { ttl_ms: 600_000, kind: "server".to_owned() };
    let token = any_server
        .call("create a server join token", |mut c| {
            let request = request.clone();
            async move { c.create_join_token(request).await }
        })
        .await
        .context("creating a server join token")?
        .token;
    let new_id = cluster.next_node_id();
    let args = cluster.rejoin_args(target, new_id, &token);
    let restart = cluster.restart_args(target);
    let proc = &mut cluster.servers[target];
    proc.stop().await;
    for entry in std::fs::read_dir(&proc.data_dir)
        .with_context(|| format!("cannot list {}", proc.data_dir.display()))?
    {
        let path = entry?.path();
        if path.is_dir() {
            std::fs::remove_dir_all(&path)?;
        } else {
            std::fs::remove_file(&path)?;
        }
    }
    proc.node_id = new_id;
    proc.set_args(args);
    proc.start()?;
    proc.set_args(restart);
    Ok(format!(
        "removed {} (node {old_id}) under 10% loss, wiped it, re-added it as node {new_id}",
        servers[target]
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_replays_the_same_schedule_and_another_does_not() -> Result<()> {
        let set = Nemesis::parse_set("all")?;
        let names = |plan: &[Planned]| {
            plan.iter().map(|p| (p.nemesis, p.fault_for, p.seed)).collect::<Vec<_>>()
        };
        let first = schedule(&set, 42, Duration::from_secs(6), 2);
        assert_eq!(names(&first), names(&schedule(&set, 42, Duration::from_secs(6), 2)));
        assert_ne!(names(&first), names(&schedule(&set, 43, Duration::from_secs(6), 2)));
        // Every round holds every nemesis once, so a run long enough for one round tries them all.
        let round: BTreeSet<Nemesis> = first[..set.len()].iter().map(|p| p.nemesis).collect();
        assert_eq!(round.len(), Nemesis::ALL.len());
        assert!(first.iter().all(
            |p| p.fault_for >= Duration::from_secs(3) && p.fault_for <= Duration::from_secs(9)
        ));
        Ok(())
    }

    #[test]
    fn nemesis_sets_parse_groups_names_and_refuse_unknown_words() -> Result<()> {
        assert_eq!(Nemesis::parse_set("all")?.len(), 18);
        assert_eq!(Nemesis::parse_set("partition")?.len(), 7);
        assert_eq!(Nemesis::parse_set("kill,pause")?.len(), 6);
        assert_eq!(Nemesis::parse_set("disk-full")?, vec![Nemesis::DiskFull]);
        let error = Nemesis::parse_set("partition,fire")
            .map(|_| ())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(error.contains("\"fire\"") && error.contains("disk-full"), "{error}");
        assert!(Nemesis::parse_set(" , ").is_err());
        Ok(())
    }
}
