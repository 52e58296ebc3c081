//! One trace per task across server and executor, exported over OTLP/gRPC to a real receiver (a
//! small one on the official `opentelemetry-proto` Python package: tests/otlp/receiver.py).

use anyhow::Context as _;
use colony_proto::pb;
use colony_tests::{
    auth_for, client_with, free_port, http_get, sample, shell_task, submit_task, task_finished,
    wait_for, wait_task, Cluster,
};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Where cluster/test.sh installs grpcio and opentelemetry-proto (`COLONY_OTLP_PYTHONPATH`
/// overrides).
fn python_path() -> String {
    std::env::var("COLONY_OTLP_PYTHONPATH").unwrap_or_else(|_| {
        format!("{}/.cache/colony/otlp", std::env::var("HOME").unwrap_or_default())
    })
}

/// The receiver process, killed when dropped.
struct Receiver {
    child: Child,
    url: String,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start_receiver(out: &Path) -> anyhow::Result<Receiver> {
    let path = python_path();
    let probe = Command::new("python3")
        .args(["-c", "import grpc, opentelemetry.proto.collector.trace.v1"])
        .env("PYTHONPATH", &path)
        .output()?;
    anyhow::ensure!(
        probe.status.success(),
        "grpcio and opentelemetry-proto are missing from {path}: cluster/test.sh installs them: {}",
        String::from_utf8_lossy(&probe.stderr)
    );
    let addr = format!("127.0.0.1:{}", free_port());
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/otlp/receiver.py");
    let child = Command::new("python3")
        .arg(script)
        .args(["--listen", &addr, "--out"])
        .arg(out)
        .env("PYTHONPATH", &path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .context("start the OTLP receiver")?;
    let receiver = Receiver { child, url: format!("http://{addr}") };
    wait_for("the OTLP receiver to listen", Duration::from_secs(20), || async {
        Ok(std::net::TcpStream::connect(&addr).is_ok().then_some(()))
    })
    .await?;
    Ok(receiver)
}

/// The spans the receiver wrote, as JSON objects.
fn spans(out: &Path) -> Vec<Value> {
    std::fs::read_to_string(out)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect()
}

fn text<'a>(span: &'a Value, key: &str) -> &'a str {
    span[key].as_str().unwrap_or_default()
}

/// The spans of the trace whose `submit` span names `task`, by name, once all `names` are in.
async fn trace_of(
    out: &Path,
    task: u64,
    names: &[&str],
) -> anyhow::Result<BTreeMap<String, Value>> {
    wait_for(&format!("the trace of task {task} with {names:?}"), Duration::from_secs(30), || {
        let all = spans(out);
        async move {
            let Some(submit) = all
                .iter()
                .find(|s| text(s, "name") == "submit" && s["attributes"]["colony.task.id"] == task)
            else {
                return Ok(None);
            };
            let trace: BTreeMap<String, Value> = all
                .iter()
                .filter(|s| text(s, "trace_id") == text(submit, "trace_id"))
                .map(|s| (text(s, "name").to_owned(), s.clone()))
                .collect();
            Ok(names.iter().all(|n| trace.contains_key(*n)).then_some(trace))
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_is_one_trace_across_server_and_executor() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("spans.jsonl");
    let receiver = start_receiver(&out).await?;
    let otlp = ["--otlp-endpoint", receiver.url.as_str(), "--trace-sample-ratio", "1"];
    let mut cluster = Cluster::start_with(3, 20_000, &otlp).await?;
    cluster.add_executor("2", "1Gi", &otlp).await?;
    cluster.wait_for_executors_up(1, Duration::from_secs(30)).await?;
    let addrs = cluster.addrs();

    let id = submit_task(&addrs, shell_task("traced", "echo traced", 100, 64, 0, 0)).await?;
    let task = wait_task(&addrs, id, "finished", Duration::from_secs(60), task_finished).await?;
    assert_eq!(task.state(), pb::TaskState::Succeeded, "{task:?}");

    let names = ["submit", "commit", "placement", "assignment", "run", "report"];
    let trace = trace_of(&out, id, &names).await?;
    let span = |name: &str| &trace[name];
    let parent_is = |child: &str, parent: &str| {
        assert_eq!(
            text(span(child), "parent_span_id"),
            text(span(parent), "span_id"),
            "the parent of {child} is {parent}: {trace:#?}"
        );
    };
    parent_is("commit", "submit");
    parent_is("placement", "submit");
    parent_is("assignment", "placement");
    parent_is("run", "assignment");
    parent_is("report", "run");
    assert_eq!(text(span("submit"), "parent_span_id"), "", "submit is the root: {trace:#?}");
    // One trace, two kinds of process.
    assert_eq!(text(span("run"), "service"), "colony-executor", "{trace:#?}");
    for name in ["submit", "commit", "placement", "assignment", "report"] {
        assert_eq!(text(span(name), "service"), "colony-server", "{name}: {trace:#?}");
    }
    assert_eq!(span("run")["attributes"]["colony.attempt.outcome"], "succeeded");
    assert_eq!(span("placement")["attributes"]["colony.task.attempt"], 1);

    // A caller's own trace context is the parent of the task's trace, through a follower (which
    // forwards it to the leader).
    let leader = cluster.wait_for_leader(Duration::from_secs(10)).await?;
    let follower = &cluster.servers[(leader + 1) % cluster.servers.len()];
    let mut client = client_with(&follower.addr, &auth_for(&follower.addr)?)?;
    let (client_trace, client_span) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let mut request = tonic::Request::new(pb::SubmitTaskRequest {
        spec: Some(shell_task("caller-traced", "true", 100, 64, 0, 0)),
    });
    request
        .metadata_mut()
        .insert("traceparent", format!("00-{client_trace}-{client_span}-01").parse()?);
    let id = client.submit_task(request).await?.into_inner().task.context("no task")?.id;
    let trace = trace_of(&out, id, &["submit", "run", "report"]).await?;
    assert_eq!(text(&trace["submit"], "trace_id"), client_trace, "{trace:#?}");
    assert_eq!(text(&trace["submit"], "parent_span_id"), client_span, "{trace:#?}");

    // Every span was exported, none dropped.
    for server in &cluster.servers {
        let (_, body) = http_get(&server.metrics_addr, "/metrics")?;
        assert_eq!(
            sample(&body, "colony_trace_spans_dropped_total{reason=\"queue_full\"}"),
            Some(0.0),
            "server {}",
            server.id
        );
    }
    drop(receiver);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_otlp_receiver_that_is_down_costs_spans_not_service() -> anyhow::Result<()> {
    // Nothing listens on this port.
    let url = format!("http://127.0.0.1:{}", free_port());
    let otlp = ["--otlp-endpoint", url.as_str(), "--trace-sample-ratio", "1"];
    let cluster = Cluster::start_with(1, 20_000, &otlp).await?;
    let addrs = cluster.addrs();
    for n in 0..5 {
        submit_task(&addrs, shell_task(&format!("untraced-{n}"), "true", 100, 64, 0, 0)).await?;
    }
    let metrics = cluster.servers[0].metrics_addr.clone();
    let dropped = wait_for("spans counted as dropped", Duration::from_secs(30), || {
        let metrics = metrics.clone();
        async move {
            let (_, body) = http_get(&metrics, "/metrics")?;
            let dropped =
                sample(&body, "colony_trace_spans_dropped_total{reason=\"export_failed\"}");
            Ok(dropped.filter(|d| *d >= 10.0))
        }
    })
    .await?;
    assert!(dropped >= 10.0, "5 submit and 5 commit spans at least: {dropped}");
    // And the server still serves.
    submit_task(&addrs, shell_task("after", "true", 100, 64, 0, 0)).await?;
    Ok(())
}
