//! Messaging and discovery from inside tasks, with no credentials: every attempt gets a Unix
//! socket (`$COLONY_AGENT_SOCKET`) that speaks the admin API as that attempt. The Python pair in
//! examples/agents (a requester and two responders) talks through it on a real cluster; an
//! attempt may use only its own namespace and the messaging and discovery calls; and once its
//! attempt is superseded (here: stopped, while it still runs its SIGTERM handler) its socket's
//! publish is refused and nothing it sent then is stored. A PublishBatch through the socket is
//! fenced and namespaced message by message, and a request over the socket's 1 MiB is refused.

use colony_tests::{wait_for, Cluster};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const LONG: Duration = Duration::from_secs(90);

/// Where cluster/setup.sh installs grpcio and grpcio-tools (`COLONY_PYTHONPATH` overrides): a
/// directory every user reads, since tasks run as nobody.
fn python_path() -> String {
    std::env::var("COLONY_PYTHONPATH").unwrap_or_else(|_| "/opt/colony/python".to_owned())
}

/// Copies the examples and admin.proto into a directory the tasks' user can read.
fn examples(dir: &Path) -> anyhow::Result<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = dir.join("agents");
    std::fs::create_dir_all(&out)?;
    for name in ["colony_local.py", "requester.py", "responder.py"] {
        std::fs::copy(root.join("examples/agents").join(name), out.join(name))?;
    }
    std::fs::copy(root.join("proto/colony/v1/admin.proto"), out.join("admin.proto"))?;
    for path in [dir.to_owned(), out.clone()] {
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
    }
    Ok(out)
}

/// Records what the attempt's socket allows, then, on SIGTERM (its agent stopped), tries to
/// publish once more.
const HOLDER: &str = r#"
import os, signal, sys, time
sys.path.insert(0, os.environ["EXAMPLES"])
import grpc
from colony_local import local_admin
pb, admin = local_admin()
out = os.environ["OUT"]
def attempt(label, call):
    try:
        call()
        return label + "=OK"
    except grpc.RpcError as error:
        return label + "=" + error.code().name
def batch():
    messages = [pb.PublishRequest(topic="topics/batched", payload=b"mine"),
                pb.PublishRequest(namespace="other", topic="t", payload=b"x")]
    reply = admin.PublishBatch(pb.PublishBatchRequest(messages=messages), timeout=20)
    return ",".join(r.WhichOneof("result") if r.WhichOneof("result") == "published"
                    else "error" + str(r.error.code) for r in reply.results)
try:
    batched = "batch=" + batch()
except grpc.RpcError as error:
    batched = "batch=" + error.code().name
lines = [
    batched,
    attempt("oversized", lambda: admin.Publish(pb.PublishRequest(topic="topics/held", payload=b"x" * (2 << 20)), timeout=20)),
    attempt("publish", lambda: admin.Publish(pb.PublishRequest(topic="topics/held", payload=b"live"), timeout=20)),
    attempt("other_namespace", lambda: admin.Publish(pb.PublishRequest(namespace="other", topic="t", payload=b"x"), timeout=20)),
    attempt("submit", lambda: admin.SubmitTask(pb.SubmitTaskRequest(), timeout=20)),
    attempt("resolve", lambda: admin.ResolveAgent(pb.ResolveAgentRequest(name="holder"), timeout=20)),
]
with open(out, "w") as f:
    f.write("\n".join(lines) + "\n")
def on_term(*_):
    line = attempt("after_stop", lambda: admin.Publish(pb.PublishRequest(topic="topics/held", payload=b"stale"), timeout=1.5))
    with open(out, "a") as f:
        f.write(line + "\n")
    sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
while True:
    time.sleep(0.2)
"#;

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attempts_talk_through_their_socket_and_a_superseded_one_is_refused() -> anyhow::Result<()>
{
    let pythonpath = python_path();
    let probe = Command::new("python3")
        .args(["-c", "import grpc, grpc_tools"])
        .env("PYTHONPATH", &pythonpath)
        .output()?;
    anyhow::ensure!(
        probe.status.success(),
        "grpcio is missing from {pythonpath}: cluster/setup.sh installs it: {}",
        String::from_utf8_lossy(&probe.stderr)
    );
    let mut cluster = Cluster::start(3, 20_000).await?;
    cluster.add_executor("4", "4Gi", &[]).await?;
    cluster.wait_for_executors_up(1, LONG).await?;
    let shared = tempfile::tempdir()?;
    let examples = examples(shared.path())?;
    let env = |key: &str, value: &str| format!("{key}={value}");
    let (pythonpath_env, proto_env, examples_env) = (
        env("PYTHONPATH", &pythonpath),
        env("COLONY_PROTO", &examples.join("admin.proto").display().to_string()),
        env("EXAMPLES", &examples.display().to_string()),
    );
    let script = |name: &str| examples.join(name).display().to_string();

    // Two responders and a requester asking three questions, all through their sockets.
    let responder = script("responder.py");
    cluster.cli_ok(&[
        "agent",
        "run",
        "--name",
        "researcher",
        "--replicas",
        "2",
        "--restart",
        "always",
        "--memory",
        "256Mi",
        "--env",
        &pythonpath_env,
        "--env",
        &proto_env,
        "--",
        "python3",
        &responder,
    ]);
    let requester = script("requester.py");
    cluster.cli_ok(&[
        "agent",
        "run",
        "--name",
        "requester",
        "--restart",
        "on-failure",
        "--memory",
        "256Mi",
        "--env",
        &pythonpath_env,
        "--env",
        &proto_env,
        "--env",
        "QUESTIONS=3",
        "--env",
        "PAUSE_S=0",
        "--",
        "python3",
        &requester,
    ]);
    let answers = cluster.cli(&[
        "--output",
        "json",
        "msg",
        "subscribe",
        "topics/answers",
        "--consumer",
        "test",
        "--count",
        "3",
        "--idle-timeout",
        "60s",
    ]);
    let text = String::from_utf8_lossy(&answers.stdout);
    if text.lines().count() != 3 {
        // The agents' own words (their output tails) say why, far better than a count.
        let tasks = cluster.cli(&["--output", "json", "task", "list"]);
        eprintln!("tasks: {}", String::from_utf8_lossy(&tasks.stdout));
    }
    assert!(answers.status.success(), "{answers:?}");
    assert_eq!(text.lines().count(), 3, "three answers: {text}");
    for line in text.lines() {
        assert!(line.contains("researcher-"), "an answer names its responder: {line}");
        assert!(line.contains("researchers_registered"), "{line}");
    }
    // The requester exits 0 after its questions and, restarted only on failure, stays down.
    wait_for("the requester to finish", LONG, || async {
        let out = cluster.cli_ok(&["--output", "json", "agent", "get", "requester"]);
        let agent: serde_json::Value = serde_json::from_str(&out)?;
        Ok(agent["instances"].as_array().is_some_and(|i| i.is_empty()).then_some(()))
    })
    .await?;

    // What the socket allows, and a superseded attempt refused.
    let out = cluster.task_writable("holder.out")?;
    let holder_out = env("OUT", &out.display().to_string());
    cluster.cli_ok(&[
        "agent",
        "run",
        "--name",
        "holder",
        "--memory",
        "256Mi",
        "--env",
        &pythonpath_env,
        "--env",
        &proto_env,
        "--env",
        &examples_env,
        "--env",
        &holder_out,
        "--",
        "python3",
        "-c",
        HOLDER,
    ]);
    let first = wait_for("the holder's first calls", LONG, || async {
        let text = read(&out);
        Ok((text.lines().count() >= 6).then_some(text))
    })
    .await?;
    // A batch is fenced and namespaced message by message: its own namespace's is stored, the
    // other's refused (7: PERMISSION_DENIED) on its own.
    assert!(first.contains("batch=published,error7"), "{first}");
    // The socket bounds a request (1 MiB) before decoding it (tonic says OUT_OF_RANGE).
    assert!(first.contains("oversized=OUT_OF_RANGE"), "{first}");
    assert!(first.contains("publish=OK"), "{first}");
    assert!(first.contains("other_namespace=PERMISSION_DENIED"), "{first}");
    assert!(first.contains("submit=PERMISSION_DENIED"), "{first}");
    assert!(first.contains("resolve=OK"), "{first}");
    cluster.cli_ok(&["agent", "stop", "holder"]);
    let all = wait_for("the holder's call after its stop", LONG, || async {
        let text = read(&out);
        Ok(text.contains("after_stop").then_some(text))
    })
    .await?;
    assert!(all.contains("after_stop=PERMISSION_DENIED"), "a stopped attempt published: {all}");
    let held = cluster.cli_ok(&[
        "--output",
        "json",
        "msg",
        "subscribe",
        "topics/held",
        "--consumer",
        "test",
        "--idle-timeout",
        "2s",
    ]);
    assert_eq!(held.lines().count(), 1, "only the live attempt's message is stored: {held}");
    assert!(held.contains("live") && !held.contains("stale"), "{held}");
    Ok(())
}
