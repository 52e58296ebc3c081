//! Durable messages on a real 3-server cluster. Through gRPC: publishers and a consumer running
//! through a kill -9 of the leader lose no acknowledged message and see a message again only by
//! redelivery, never after its ack was confirmed. Through the `colony` CLI as a user drives it:
//! broadcast and competing consumers, dead letters after bounded redeliveries, request-response
//! with `msg serve`, a request nobody answers, and bad input refused with nothing stored.
//! PublishBatch answers each message on its own, and `colony_client::Publisher` gathers
//! concurrent publishes into few such calls.

use colony_proto::pb;
use colony_tests::{client, colony_bin, wait_for, Cluster};
use rand::Rng;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const MESSAGES: usize = 400;
const PUBLISHERS: usize = 8;
const TOPIC: &str = "topics/durable";

/// Publishes `payload` with an idempotency key through random servers until one acknowledges it.
async fn publish_until_acked(addrs: &[String], payload: String) -> anyhow::Result<u64> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let addr = &addrs[rand::thread_rng().gen_range(0..addrs.len())];
        let request = pb::PublishRequest {
            namespace: String::new(),
            topic: TOPIC.to_owned(),
            payload: payload.clone().into_bytes(),
            priority: 0,
            idempotency_key: payload.clone(),
            reply_to: String::new(),
            correlation_id: String::new(),
        };
        let answer = match client(addr).await {
            Ok(mut c) => tokio::time::timeout(Duration::from_secs(5), c.publish(request)).await,
            Err(_) => Ok(Err(tonic::Status::unavailable("no connection"))),
        };
        match answer {
            Ok(Ok(reply)) => return Ok(reply.into_inner().seq),
            Ok(Err(status)) if status.code() == tonic::Code::InvalidArgument => {
                anyhow::bail!("publish {payload} refused: {status}")
            }
            _ if Instant::now() > deadline => anyhow::bail!("publish {payload} never acknowledged"),
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// What the consumer saw: every payload delivered, the seqs whose ack a server confirmed, and
/// deliveries that came after a confirmed ack (which must never happen).
#[derive(Default)]
struct Seen {
    delivered: BTreeMap<String, u32>,
    acked: BTreeSet<u64>,
    after_ack: Vec<u64>,
}

async fn consume(addrs: Vec<String>, seen: Arc<Mutex<Seen>>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::SeqCst) {
        let addr = &addrs[rand::thread_rng().gen_range(0..addrs.len())];
        let Ok(mut c) = client(addr).await else { continue };
        let request = pb::ReceiveRequest {
            namespace: String::new(),
            topic: TOPIC.to_owned(),
            consumer: "checkers".to_owned(),
            max: 50,
            ack_deadline_ms: 2_000,
            wait_ms: 500,
        };
        let Ok(Ok(reply)) = tokio::time::timeout(Duration::from_secs(5), c.receive(request)).await
        else {
            continue;
        };
        let mut refs = Vec::new();
        {
            let mut seen = seen.lock().unwrap();
            for d in reply.into_inner().deliveries {
                let Some(m) = d.message else { continue };
                if seen.acked.contains(&m.seq) {
                    seen.after_ack.push(m.seq);
                }
                *seen
                    .delivered
                    .entry(String::from_utf8_lossy(&m.payload).into_owned())
                    .or_default() += 1;
                refs.push(pb::DeliveryRef { seq: m.seq, delivery: d.delivery });
            }
        }
        if refs.is_empty() {
            continue;
        }
        let request = pb::AckRequest {
            namespace: String::new(),
            topic: TOPIC.to_owned(),
            consumer: "checkers".to_owned(),
            deliveries: refs,
        };
        // An ack whose answer is lost may or may not have landed: only confirmed ones count.
        if let Ok(Ok(reply)) = tokio::time::timeout(Duration::from_secs(5), c.ack(request)).await {
            seen.lock().unwrap().acked.extend(reply.into_inner().acked);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_messages_survive_a_leader_kill_and_arrive_at_least_once() -> anyhow::Result<()>
{
    let mut cluster = Cluster::start(3, 500).await?;
    let addrs = cluster.addrs();
    let published: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
    let next = Arc::new(AtomicUsize::new(0));
    let seen: Arc<Mutex<Seen>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let consumer = tokio::spawn(consume(addrs.clone(), seen.clone(), stop.clone()));

    let mut publishers = Vec::new();
    for _ in 0..PUBLISHERS {
        let (addrs, published, next) = (addrs.clone(), published.clone(), next.clone());
        publishers.push(tokio::spawn(async move {
            loop {
                let n = next.fetch_add(1, Ordering::SeqCst);
                if n >= MESSAGES {
                    return anyhow::Ok(());
                }
                let payload = format!("message-{n}");
                let seq = publish_until_acked(&addrs, payload.clone()).await?;
                published.lock().unwrap().insert(payload, seq);
            }
        }));
    }
    wait_for("100 acknowledged publishes", Duration::from_secs(60), || {
        let published = published.clone();
        async move { Ok((published.lock().unwrap().len() >= 100).then_some(())) }
    })
    .await?;
    let leader = cluster.wait_for_leader(Duration::from_secs(5)).await?;
    cluster.servers[leader].kill9();
    for publisher in publishers {
        publisher.await??;
    }

    let expected: BTreeSet<String> = published.lock().unwrap().keys().cloned().collect();
    assert_eq!(expected.len(), MESSAGES);
    // Idempotency keys kept retried publishes from being stored twice.
    let seqs: BTreeSet<u64> = published.lock().unwrap().values().copied().collect();
    assert_eq!(seqs.len(), MESSAGES, "two payloads share a sequence number");
    wait_for("every acknowledged message delivered", Duration::from_secs(60), || {
        let (seen, expected) = (seen.clone(), expected.clone());
        async move {
            let seen = seen.lock().unwrap();
            let got: BTreeSet<String> = seen.delivered.keys().cloned().collect();
            Ok(expected.is_subset(&got).then_some(()))
        }
    })
    .await?;
    // Let redeliveries of unconfirmed acks run their course, then stop.
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::SeqCst);
    consumer.await?;
    let seen = seen.lock().unwrap();
    let unexpected: Vec<&String> =
        seen.delivered.keys().filter(|p| !expected.contains(*p)).collect();
    assert!(unexpected.is_empty(), "delivered but never published: {unexpected:?}");
    assert!(
        seen.after_ack.is_empty(),
        "delivered again after a confirmed ack: {:?}",
        seen.after_ack
    );
    let duplicates = seen.delivered.values().filter(|n| **n > 1).count();
    println!(
        "{MESSAGES} messages acknowledged through a leader kill; all delivered; {duplicates} delivered more than once (by redelivery), none after a confirmed ack"
    );
    Ok(())
}

fn refused(cluster: &Cluster, args: &[&str], expected: &str) {
    let out = cluster.cli(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "`colony {}` was accepted", args.join(" "));
    assert!(
        stderr.contains(expected),
        "`colony {}`: {stderr:?} should mention {expected:?}",
        args.join(" ")
    );
}

/// The JSON lines `msg subscribe --output json` printed.
fn lines(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

fn payloads(text: &str) -> Vec<String> {
    lines(text).iter().map(|m| m["payload"].as_str().unwrap_or_default().to_owned()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcast_competing_dead_letters_and_request_response_through_the_cli(
) -> anyhow::Result<()> {
    let cluster = Cluster::start(3, 20_000).await?;
    let json = ["--output", "json"];
    let sub = |topic: &str, consumer: &str, count: &str, extra: &[&str]| {
        let mut args = vec![
            "--output",
            "json",
            "msg",
            "subscribe",
            topic,
            "--consumer",
            consumer,
            "--count",
            count,
            "--idle-timeout",
            "20s",
        ];
        args.extend_from_slice(extra);
        args.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };
    let run =
        |args: Vec<String>| cluster.cli_ok(&args.iter().map(String::as_str).collect::<Vec<_>>());

    // Broadcast: each consumer name gets every message, in priority order then publish order.
    cluster.cli_ok(&["msg", "publish", "topics/papers", "raft"]);
    cluster.cli_ok(&["msg", "publish", "topics/papers", "paxos"]);
    cluster.cli_ok(&["msg", "publish", "topics/papers", "urgent", "--priority", "9"]);
    for consumer in ["summarizers", "archivers"] {
        let got = run(sub("topics/papers", consumer, "3", &[]));
        assert_eq!(payloads(&got), ["urgent", "raft", "paxos"], "{consumer}");
    }

    // Competing: one name shares; two subscribers together see each message once.
    for i in 0..4 {
        cluster.cli_ok(&["msg", "publish", "topics/work", &format!("job-{i}")]);
    }
    let first = payloads(&run(sub("topics/work", "workers", "2", &[])));
    let second = payloads(&run(sub("topics/work", "workers", "2", &[])));
    assert_eq!([first, second].concat(), ["job-0", "job-1", "job-2", "job-3"]);

    // Dead letters: never acknowledged, delivered twice, then moved aside with where it came from.
    cluster.cli_ok(&[
        "msg",
        "create-topic",
        "topics/jobs",
        "--max-deliveries",
        "2",
        "--ack-deadline",
        "500ms",
    ]);
    cluster.cli_ok(&["msg", "publish", "topics/jobs", "poison"]);
    let once = lines(&run(sub("topics/jobs", "p", "1", &["--no-ack"])));
    let twice = lines(&run(sub("topics/jobs", "p", "1", &["--no-ack"])));
    assert_eq!((once[0]["delivery"].as_u64(), twice[0]["delivery"].as_u64()), (Some(1), Some(2)));
    // The first delivery's ack is refused: the message went out again.
    refused(&cluster, &["msg", "ack", "topics/jobs", "--consumer", "p", "1:1"], "expired");
    // The next receive past the second deadline finds it out of deliveries: nothing is handed out.
    let third = cluster.cli(&[
        "msg",
        "subscribe",
        "topics/jobs",
        "--consumer",
        "p",
        "--count",
        "1",
        "--idle-timeout",
        "3s",
    ]);
    assert!(third.status.success() && third.stdout.is_empty(), "{third:?}");
    assert!(
        String::from_utf8_lossy(&third.stderr).contains("dead-letter/topics/jobs"),
        "{third:?}"
    );
    let dead = lines(&run(sub("dead-letter/topics/jobs", "ops", "1", &[])));
    assert_eq!(dead[0]["payload"], "poison");
    assert_eq!(dead[0]["dead_letter_topic"], "topics/jobs");
    let topics: serde_json::Value =
        serde_json::from_str(&cluster.cli_ok(&[json[0], json[1], "msg", "topics"]))?;
    let jobs = topics.as_array().into_iter().flatten().find(|t| t["name"] == "topics/jobs");
    let jobs = jobs.ok_or_else(|| anyhow::anyhow!("topics/jobs not listed: {topics:#}"))?;
    assert_eq!(jobs["consumers"][0]["dead_lettered"], 1, "{jobs:#}");

    // Request-response: a responder answers through `msg serve`.
    let endpoint = cluster.addrs().join(",");
    let responder = std::process::Command::new(colony_bin())
        .args(["--endpoint", &endpoint, "--token", &cluster.token])
        .args([
            "msg",
            "serve",
            "agents/upper",
            "--consumer",
            "uppers",
            "--count",
            "1",
            "--",
            "tr",
            "a-z",
            "A-Z",
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let answer =
        cluster.cli_ok(&["msg", "request", "agents/upper", "hello agents", "--timeout", "20s"]);
    assert_eq!(answer.trim(), "HELLO AGENTS");
    let served = tokio::task::block_in_place(|| responder.wait_with_output())?;
    assert!(served.status.success(), "msg serve: {}", String::from_utf8_lossy(&served.stderr));
    // The reply mailbox is gone once the request has its answer.
    let listed = cluster.cli_ok(&["msg", "topics"]);
    assert!(!listed.contains("replies/"), "{listed}");
    refused(
        &cluster,
        &["msg", "request", "agents/nobody", "anyone?", "--timeout", "1s"],
        "no answer",
    );

    // Bad input: refused with a clear line, nothing stored.
    let scratch = tempfile::tempdir()?;
    let big = scratch.path().join("big");
    std::fs::write(&big, vec![b'x'; (64 << 10) + 1])?;
    refused(
        &cluster,
        &["msg", "publish", "topics/papers", &format!("@{}", big.display())],
        "limit",
    );
    refused(&cluster, &["msg", "publish", "topics/papers", "x", "--priority", "10"], "priority");
    refused(&cluster, &["msg", "publish", "topics/bad name", "x"], "topic");
    cluster.cli_ok(&["msg", "create-topic", "topics/small", "--max-messages", "1"]);
    cluster.cli_ok(&["msg", "publish", "topics/small", "one"]);
    refused(&cluster, &["msg", "publish", "topics/small", "two"], "is full");
    let papers = run(sub("topics/papers", "late-joiner", "3", &[]));
    assert_eq!(
        payloads(&papers),
        ["urgent", "raft", "paxos"],
        "a refused publish stored something"
    );
    Ok(())
}

fn publish(topic: &str, payload: Vec<u8>, priority: u32) -> pb::PublishRequest {
    pb::PublishRequest { topic: topic.to_owned(), payload, priority, ..Default::default() }
}

/// The messages each topic of the default namespace holds, by name.
async fn stored(addr: &str) -> anyhow::Result<BTreeMap<String, u64>> {
    let request = pb::ListTopicsRequest { namespace: "default".into(), ..Default::default() };
    let topics = client(addr).await?.list_topics(request).await?.into_inner().topics;
    Ok(topics.into_iter().map(|t| (t.name, t.messages)).collect())
}

/// How many PublishBatch calls the servers' audit trails record (a forwarded call is recorded by
/// the leader that served it).
fn batch_calls(cluster: &Cluster) -> anyhow::Result<usize> {
    let mut calls = 0;
    for server in &cluster.servers {
        let trail = std::fs::read_to_string(server.data_dir.join("audit/audit.jsonl"))?;
        calls +=
            trail.lines().filter(|l| l.contains(r#""rpc":"PublishBatch","outcome":"ok""#)).count();
    }
    Ok(calls)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_batch_answers_each_message_and_a_publisher_gathers_concurrent_publishes(
) -> anyhow::Result<()> {
    let mut cluster = Cluster::start(3, 500).await?;
    let leader = cluster.wait_for_leader(Duration::from_secs(10)).await?;
    let addr = cluster.servers[leader].addr.clone();
    let mut admin = client(&addr).await?;

    // Each message is answered as its own Publish would be, in order; a refused one refuses
    // nothing else.
    let batch = pb::PublishBatchRequest {
        messages: vec![
            publish("batch/a", b"first".to_vec(), 0),
            publish("batch/a", vec![b'x'; 70_000], 0),
            publish("batch/a", b"bad priority".to_vec(), 10),
            publish("batch/b", b"elsewhere".to_vec(), 3),
            publish("batch/a", b"second".to_vec(), 9),
        ],
    };
    let results = admin.publish_batch(batch).await?.into_inner().results;
    let answers: Vec<Result<u64, i32>> = results
        .iter()
        .map(|r| match &r.result {
            Some(pb::publish_result::Result::Published(p)) => Ok(p.seq),
            Some(pb::publish_result::Result::Error(e)) => Err(e.code),
            None => Err(-1),
        })
        .collect();
    let invalid = tonic::Code::InvalidArgument as i32;
    assert_eq!(answers, vec![Ok(1), Err(invalid), Err(invalid), Ok(1), Ok(2)], "{results:?}");
    let expected: BTreeMap<String, u64> = [("batch/a".into(), 2), ("batch/b".into(), 1)].into();
    assert_eq!(stored(&addr).await?, expected);

    // A batch that is empty or too long is refused whole, and stores nothing.
    for count in [0, 1001] {
        let messages = (0..count).map(|i| publish("batch/a", vec![i as u8], 0)).collect();
        let refused = admin.publish_batch(pb::PublishBatchRequest { messages }).await;
        let code = refused.as_ref().err().map(|s| s.code());
        assert_eq!(code, Some(tonic::Code::InvalidArgument), "a batch of {count}: {refused:?}");
    }
    assert_eq!(stored(&addr).await?, expected);
    let calls_before = batch_calls(&cluster)?;

    // Through a follower: 50 publishers, 20 messages each, every one waiting for its answer.
    let follower = cluster.servers[(leader + 1) % cluster.servers.len()].addr.clone();
    let publisher = colony_client::Publisher::spawn(client(&follower).await?, Default::default());
    let mut tasks = Vec::new();
    for p in 0..50 {
        let publisher = publisher.clone();
        tasks.push(tokio::spawn(async move {
            let mut seqs = Vec::new();
            for m in 0..20 {
                let payload = format!("{p}-{m}").into_bytes();
                seqs.push(publisher.publish(publish("batch/many", payload, 0)).await?.seq);
            }
            anyhow::Ok(seqs)
        }));
    }
    let mut all = BTreeSet::new();
    for task in tasks {
        let seqs = task.await??;
        // One publisher's messages keep their order.
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "out of order: {seqs:?}");
        all.extend(seqs);
    }
    assert_eq!(all, (1..=1000).collect::<BTreeSet<u64>>(), "each message its own seq");
    assert_eq!(stored(&addr).await?.get("batch/many"), Some(&1000));
    let calls = batch_calls(&cluster)? - calls_before;
    assert!(calls < 500, "1,000 publishes took {calls} PublishBatch calls: they were not gathered");
    println!("1,000 concurrent publishes through a follower took {calls} PublishBatch calls");

    // `msg publish --lines`: each line its own message; an oversized line is refused alone.
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("lines.txt");
    let mut text: String = (1..=1500).map(|i| format!("line-{i}\n")).collect();
    text += &format!("\n{}\n", "x".repeat(70_000));
    text += &(1501..=2500).map(|i| format!("line-{i}\n")).collect::<String>();
    std::fs::write(&file, text)?;
    let source = format!("@{}", file.display());
    let out =
        cluster.cli(&["--output", "json", "msg", "publish", "batch/lines", &source, "--lines"]);
    assert!(!out.status.success(), "a refused line must fail the command");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(report["published"], 2500, "{report}");
    assert_eq!((&report["first_seq"], &report["last_seq"]), (&1.into(), &2500.into()));
    assert_eq!(report["refused"][0]["line"], 1502, "{report}");
    assert_eq!(report["refused"].as_array().map(Vec::len), Some(1), "{report}");
    assert_eq!(stored(&addr).await?.get("batch/lines"), Some(&2500));
    let first = cluster.cli_ok(&[
        "--output",
        "json",
        "msg",
        "subscribe",
        "batch/lines",
        "--consumer",
        "c",
        "--count",
        "2",
    ]);
    assert_eq!(payloads(&first), ["line-1", "line-2"]);
    Ok(())
}
