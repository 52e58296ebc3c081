//! Upgrades: data directories the releases before formats 3 and 4 wrote (`tests/fixtures/
//! format-{2,3}-datadir.tar.gz`, made by `tests/fixtures/make-format-{2,3}.sh`) open with this
//! build, hold every task they held, take new writes (a workflow too), and open again after a
//! restart.

use colony_proto::pb;
use colony_tests::{wait_for, Server};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

const LONG: Duration = Duration::from_secs(30);

/// Every task the server holds, by id: (name, state as the CLI's JSON writes it).
async fn tasks(addr: &str) -> anyhow::Result<BTreeMap<u64, (String, String)>> {
    let mut c = colony_tests::client(addr).await?;
    let request = pb::ListTasksRequest { page_size: 1000, ..Default::default() };
    let page = c.list_tasks(request).await?.into_inner();
    Ok(page
        .tasks
        .iter()
        .map(|t| {
            let state = colony_tests::task_state(t).as_str_name();
            let state = state.trim_start_matches("TASK_STATE_").to_lowercase();
            (t.id, (t.spec.as_ref().map(|s| s.name.clone()).unwrap_or_default(), state))
        })
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_format_2_data_directory_opens_and_keeps_working() -> anyhow::Result<()> {
    opens_and_keeps_working("fixtures/format-2-datadir.tar.gz").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_format_3_data_directory_opens_and_keeps_working() -> anyhow::Result<()> {
    opens_and_keeps_working("fixtures/format-3-datadir.tar.gz").await
}

async fn opens_and_keeps_working(fixture: &str) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join(fixture);
    let status = std::process::Command::new("tar")
        .arg("-xzf")
        .arg(&fixture)
        .arg("-C")
        .arg(dir.path())
        .status()?;
    anyhow::ensure!(status.success(), "cannot unpack {}", fixture.display());
    let data_dir = dir.path().join("data");
    let mut server = Server::new(1, data_dir.clone(), dir.path().join("server.log"));
    // The fixture listened on a fixed port; this run moves it to a free one.
    let node_file = data_dir.join("node.json");
    let mut node: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&node_file)?)?;
    node["addr"] = serde_json::Value::String(server.addr.clone());
    std::fs::write(&node_file, serde_json::to_vec_pretty(&node)?)?;
    let token = std::fs::read_to_string(dir.path().join("token"))?;
    colony_tests::register(&server.addr, &colony_client::Auth::token(token.trim())?);

    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("expected.json"))?)?;
    let expected: BTreeMap<u64, (String, String)> = expected
        .as_array()
        .ok_or_else(|| anyhow::anyhow!("expected.json is not a list"))?
        .iter()
        .filter_map(|t| {
            Some((
                t["id"].as_u64()?,
                (t["name"].as_str()?.to_owned(), t["state"].as_str()?.to_owned()),
            ))
        })
        .collect();
    anyhow::ensure!(expected.len() == 45, "the fixture lists {} tasks", expected.len());

    // The fixture's finished tasks finished when it was made: retention (72 hours by default)
    // would remove them from a run days later, so this run keeps finished tasks for ten years.
    let args = [
        "--metrics-listen".to_owned(),
        server.metrics_addr.clone(),
        "--task-retention".to_owned(),
        "3650d".to_owned(),
    ];
    server.start(&args)?;
    let addr = server.addr.clone();
    let held =
        wait_for("the old data directory to serve", LONG, || async { Ok(tasks(&addr).await.ok()) })
            .await
            .map_err(|e| anyhow::anyhow!("{e}\n{}", server.log()))?;
    assert_eq!(held, expected, "the upgraded server holds other tasks than the old one did");

    // New writes land in today's format beside the old ones, and a restart reads both.
    let id = colony_tests::submit_task(
        std::slice::from_ref(&addr),
        colony_tests::task_spec("after", None),
    )
    .await?;
    assert!(id > *expected.keys().last().unwrap_or(&0));
    let echo = pb::TaskSpec {
        run: Some(pb::task_spec::Run::Builtin(pb::BuiltinRun {
            handler: "echo".into(),
            input: String::new(),
        })),
        ..Default::default()
    };
    let workflow = pb::WorkflowSpec {
        name: "upgraded".into(),
        steps: vec![pb::WorkflowStep {
            name: "one".into(),
            task: Some(echo),
            ..Default::default()
        }],
        ..Default::default()
    };
    let mut c = colony_tests::client(&addr).await?;
    let submitted = c
        .submit_workflow(pb::SubmitWorkflowRequest { spec: Some(workflow) })
        .await?
        .into_inner()
        .workflow
        .map(|w| w.id)
        .unwrap_or_default();
    server.terminate()?;
    server.start(&args)?;
    let held =
        wait_for("the restarted server", LONG, || async { Ok(tasks(&addr).await.ok()) }).await?;
    assert_eq!(held.len(), expected.len() + 2, "the old tasks, the new one and the workflow's");
    let mut c = colony_tests::client(&addr).await?;
    let kept = c.get_workflow(pb::GetWorkflowRequest { id: submitted, consistency: None }).await?;
    assert_eq!(
        kept.into_inner().workflow.map(|w| w.spec.map(|s| s.name)),
        Some(Some("upgraded".into()))
    );
    Ok(())
}
