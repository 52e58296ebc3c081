//! Workflows on a real cluster with real executors, through the `colony` CLI as a user drives it:
//! the research example passes data through a fan-out and a fan-in; a bad workflow creates
//! nothing; cancel stops every step; retry re-runs only what failed, reusing the outputs of what
//! succeeded; and outputs survive a kill -9 of the leader.

use colony_proto::pb;
use colony_tests::{wait_for, Cluster};
use std::path::Path;
use std::time::Duration;

const LONG: Duration = Duration::from_secs(60);

/// `colony ARGS` must fail with one error line mentioning `expected`.
fn refused(cluster: &Cluster, args: &[&str], expected: &str) {
    let out = cluster.cli(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "`colony {}` was accepted", args.join(" "));
    let first = stderr.lines().next().unwrap_or_default();
    assert!(
        first.starts_with("error: ") && first.contains(expected),
        "`colony {}`: {first:?} should mention {expected:?}",
        args.join(" ")
    );
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

fn example(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples").join(name).display().to_string()
}

async fn workflow(cluster: &Cluster, id: u64) -> anyhow::Result<pb::GetWorkflowResponse> {
    let c = cluster.any_server(Duration::from_secs(5))?;
    Ok(c.call("get workflow", |mut c| async move {
        c.get_workflow(pb::GetWorkflowRequest { id, consistency: None }).await
    })
    .await?)
}

async fn wait_state(
    cluster: &Cluster,
    id: u64,
    state: pb::WorkflowState,
) -> anyhow::Result<pb::GetWorkflowResponse> {
    wait_for(&format!("workflow {id} to be {state:?}"), LONG, || async move {
        let answer = workflow(cluster, id).await?;
        let now = answer.workflow.as_ref().map(|w| w.state).unwrap_or_default();
        Ok((now == state as i32).then_some(answer))
    })
    .await
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write a workflow file");
    path.display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workflows_pass_data_fan_out_cancel_retry_and_survive_a_leader_kill() -> anyhow::Result<()>
{
    let mut cluster = Cluster::start(3, 20_000).await?;
    for _ in 0..2 {
        cluster.add_executor("4", "4Gi", &[]).await?;
    }
    cluster.wait_for_executors_up(2, LONG).await?;
    let scratch = tempfile::tempdir()?;

    // 1. The research example: three topics analysed in parallel, a report that quotes each.
    let research = example("research.yaml");
    let done = cluster.cli_ok(&[
        "--output",
        "json",
        "workflow",
        "submit",
        &research,
        "--param",
        "topic=raft failover",
        "--wait",
        "--max-wait",
        "60s",
    ]);
    let done = json(&done);
    assert_eq!(done["state"], "succeeded", "{done:#}");
    let tasks = done["tasks"].as_array().cloned().unwrap_or_default();
    assert_eq!(tasks.iter().filter(|t| t["step"] == "analyze").count(), 3, "{done:#}");
    let report_task = tasks.iter().find(|t| t["step"] == "report").and_then(|t| t["id"].as_u64());
    let report =
        cluster.cli_ok(&["task", "output", &report_task.unwrap_or_default().to_string(), "report"]);
    assert!(report.starts_with("# Report: raft failover"), "{report}");
    assert!(report.contains("Initial research on raft failover found 3 topics"), "{report}");
    for angle in
        ["how leaders are elected", "how the log is replicated", "how failures are detected"]
    {
        assert!(
            report.contains(&format!("Deep analysis of \"raft failover: {angle}\"")),
            "{angle}: {report}"
        );
    }
    let drawn = cluster.cli_ok(&["workflow", "get", &done["id"].to_string()]);
    assert!(drawn.contains("succeeded") && drawn.contains("└─ analyze ×3"), "{drawn}");

    // 2. Bad workflows: refused with the step named, nothing created.
    let before = cluster.cli_ok(&["--output", "json", "workflow", "list"]);
    let cyclic = write(scratch.path(), "cyclic.yaml", "name: c\nsteps:\n  - {name: a, after: [b], builtin: echo}\n  - {name: b, after: [a], builtin: echo}\n");
    refused(&cluster, &["workflow", "submit", &cyclic], "cycle");
    let unknown = write(
        scratch.path(),
        "unknown.yaml",
        "name: u\nsteps:\n  - {name: a, builtin: echo, colour: blue}\n",
    );
    refused(&cluster, &["workflow", "submit", &unknown], "unknown field `colour`");
    let upstream = write(scratch.path(), "upstream.yaml", "name: u\nsteps:\n  - {name: a, builtin: echo, outputs: [x]}\n  - {name: b, builtin: echo, inputs: {x: a.x}}\n");
    refused(&cluster, &["workflow", "submit", &upstream], "not upstream of b");
    // Straight to the server, past the CLI's own checks: the server refuses the same way.
    let c = cluster.any_server(Duration::from_secs(5))?;
    let echo = pb::TaskSpec {
        run: Some(pb::task_spec::Run::Builtin(pb::BuiltinRun {
            handler: "echo".into(),
            input: String::new(),
        })),
        ..Default::default()
    };
    let spec = pb::WorkflowSpec {
        name: "direct".into(),
        steps: vec![pb::WorkflowStep {
            name: "a".into(),
            task: Some(echo.clone()),
            after: vec!["a".into()],
            ..Default::default()
        }],
        ..Default::default()
    };
    let status = c
        .call("submit workflow", |mut c| {
            let spec = spec.clone();
            async move { c.submit_workflow(pb::SubmitWorkflowRequest { spec: Some(spec) }).await }
        })
        .await
        .expect_err("a step after itself");
    assert!(status.to_string().contains("step a: a step cannot run after itself"), "{status}");
    assert_eq!(
        cluster.cli_ok(&["--output", "json", "workflow", "list"]),
        before,
        "nothing was created"
    );

    // An output over its limit fails the step, saying which output, how large, and the limit.
    let big = write(scratch.path(), "big.yaml", "name: big\nsteps:\n  - {name: dump, outputs: [blob], run: [sh, -c, 'head -c 300000 /dev/zero > $COLONY_OUTPUT_DIR/blob']}\n");
    let id: u64 = cluster.cli_ok(&["workflow", "submit", &big]).trim().parse()?;
    let failed = wait_state(&cluster, id, pb::WorkflowState::Failed).await?;
    let reason = failed.workflow.map(|w| w.reason).unwrap_or_default();
    assert!(
        reason.contains("output blob is 300000 bytes; the limit is 262144 bytes per output"),
        "{reason}"
    );

    // 3. Cancel: the running step is stopped, the waiting one never starts.
    let slow = write(scratch.path(), "slow.yaml", "name: slow\nsteps:\n  - {name: wait, run: [sleep, '60']}\n  - {name: never, after: [wait], builtin: echo}\n");
    let id: u64 = cluster.cli_ok(&["workflow", "submit", &slow]).trim().parse()?;
    wait_for("the slow step to run", LONG, || async {
        let answer = workflow(&cluster, id).await?;
        let running = answer.tasks.iter().any(|t| t.state == pb::TaskState::Running as i32);
        Ok(running.then_some(()))
    })
    .await?;
    refused(&cluster, &["workflow", "retry", &id.to_string()], "is still running");
    cluster.cli_ok(&["workflow", "cancel", &id.to_string(), "--reason", "changed my mind"]);
    let cancelled = wait_state(&cluster, id, pb::WorkflowState::Cancelled).await?;
    let steps = cancelled.workflow.map(|w| w.steps).unwrap_or_default();
    assert!(steps.iter().all(|s| s.state == pb::StepState::Cancelled as i32), "{steps:?}");
    assert!(cancelled.tasks.iter().all(|t| t.state == pb::TaskState::Cancelled as i32));
    refused(&cluster, &["workflow", "cancel", &id.to_string()], "has already ended as cancelled");

    // 4. Retry: a step that fails until a flag file exists; the step before it keeps its output.
    let flag = cluster.task_writable("flag")?;
    std::fs::remove_file(&flag)?;
    let counter = cluster.task_writable("first-runs")?;
    let flaky = format!(
        "name: flaky\nsteps:\n  - name: first\n    outputs: [value]\n    run: [sh, -c, 'echo run >> {counter}; echo 42 > $COLONY_OUTPUT_DIR/value']\n  - name: second\n    after: [first]\n    inputs: {{value: first.value}}\n    outputs: [doubled]\n    run: [sh, -c, 'test -e {flag} && echo $(( $(cat $COLONY_INPUT_DIR/value) * 2 )) > $COLONY_OUTPUT_DIR/doubled']\n",
        counter = counter.display(),
        flag = flag.display()
    );
    let flaky = write(scratch.path(), "flaky.yaml", &flaky);
    let id: u64 = cluster.cli_ok(&["workflow", "submit", &flaky]).trim().parse()?;
    let failed = wait_state(&cluster, id, pb::WorkflowState::Failed).await?;
    let reason = failed.workflow.map(|w| w.reason).unwrap_or_default();
    assert!(reason.contains("step second failed"), "{reason}");
    refused(&cluster, &["workflow", "cancel", &id.to_string()], "has already ended as failed");
    std::fs::write(&flag, b"")?;
    cluster.cli_ok(&["workflow", "retry", &id.to_string()]);
    let retried = wait_state(&cluster, id, pb::WorkflowState::Succeeded).await?;
    assert_eq!(std::fs::read_to_string(&counter)?.lines().count(), 1, "the first step ran once");
    let second =
        retried.tasks.iter().find(|t| t.step == "second").map(|t| t.id).unwrap_or_default();
    assert_eq!(cluster.cli_ok(&["task", "output", &second.to_string(), "doubled"]).trim(), "84");
    let runs: Vec<u32> =
        retried.workflow.map(|w| w.steps.iter().map(|s| s.runs).collect()).unwrap_or_default();
    assert_eq!(runs, vec![1, 2]);
    refused(&cluster, &["workflow", "retry", &id.to_string()], "has already ended as succeeded");

    // 5. Outputs are replicated: the leader goes (kill -9), the report is still there.
    let leader = cluster.wait_for_leader(LONG).await?;
    cluster.servers[leader].kill9();
    let report =
        cluster.cli_ok(&["task", "output", &report_task.unwrap_or_default().to_string(), "report"]);
    assert!(
        report.contains("Deep analysis of \"raft failover: how failures are detected\""),
        "{report}"
    );
    Ok(())
}
