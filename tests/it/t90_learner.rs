//! The learner end to end: real servers, a real executor running real processes, and a real
//! `colony learner` process that follows finished tasks, trains, and publishes a model the
//! scheduler then uses for `--memory auto`; the registry refuses bad models and rollbacks.

use colony_proto::pb;
use colony_tests::{client, colony_bin, free_port, http_get, sample, wait_for, Cluster};
use std::process::{Command, Stdio};
use std::time::Duration;

struct Learner(std::process::Child);

impl Drop for Learner {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `sh -c 'sleep SECONDS' job ARG...`: the extra arguments are ignored by the script but are
/// features the model sees, which is what lets it beat the per-kind baseline.
fn shell(name: &str, seconds: &str, memory: &str, extra_args: usize) -> pb::TaskSpec {
    let memory_auto = memory == "auto";
    let mut args = vec!["-c".to_owned(), format!("sleep {seconds}"), "job".to_owned()];
    args.extend((0..extra_args).map(|i| format!("arg{i}")));
    pb::TaskSpec {
        name: name.to_owned(),
        namespace: "default".to_owned(),
        resources: Some(pb::Resources {
            cpu_millis: 100,
            memory_bytes: if memory_auto { 0 } else { 64 << 20 },
            gpus: 0,
            custom: Default::default(),
        }),
        memory_auto,
        run: Some(pb::task_spec::Run::Process(pb::ProcessRun {
            program: "/bin/sh".into(),
            args,
            env: Default::default(),
        })),
        idempotency_key: Some(format!("{name}-{:016x}", rand::random::<u64>())),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_learner_publishes_a_model_the_scheduler_uses() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(3, 20_000).await?;
    cluster.add_executor("4", "4Gi", &[]).await?;
    cluster.wait_for_executors_up(1, Duration::from_secs(30)).await?;
    let token = cluster.join_token_of("learner").await?;
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    let log = std::fs::File::create(cluster.dir.path().join("learner.log"))?;
    let _learner = Learner(
        Command::new(colony_bin())
            .args([
                "learner",
                "--join",
                &cluster.addrs().join(","),
                "--token",
                &token,
                "--device",
                "cpu",
            ])
            .args([
                "--min-examples",
                "40",
                "--retrain-every",
                "40",
                "--retrain-interval",
                "2s",
                "--metrics-listen",
                &metrics_addr,
            ])
            .arg("--data-dir")
            .arg(cluster.dir.path().join("learner"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?,
    );
    let mut c = client(&cluster.addrs()[0]).await?;
    // One kind of task whose runtime grows with its argument count: the per-kind mean cannot
    // predict it, a model of the features can.
    for i in 0..120 {
        let extra = i % 4;
        let seconds = ["0.02", "0.15", "0.3", "0.45"][extra];
        c.submit_task(pb::SubmitTaskRequest {
            spec: Some(shell(&format!("job-{i}"), seconds, "64Mi", extra)),
        })
        .await?;
    }
    let learner_log =
        || std::fs::read_to_string(cluster.dir.path().join("learner.log")).unwrap_or_default();
    let models = wait_for("the learner to publish a model", Duration::from_secs(120), || async {
        let mut c = client(&cluster.addrs()[1]).await?;
        let models = c.list_models(pb::ListModelsRequest {}).await?.into_inner();
        Ok((!models.models.is_empty()).then_some(models))
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n--- learner ---\n{}", learner_log()))?;
    let model = &models.models[0];
    let metrics = model.metrics.unwrap_or_default();
    assert!(
        model.current && model.feature_schema == "colony-features-v1" && model.device == "cpu",
        "{model:?}"
    );
    assert!(
        metrics.holdout_mse < metrics.baseline_mse,
        "a published model beats the baseline: {metrics:?}"
    );

    let (code, text) = http_get(&metrics_addr, "/metrics")?;
    assert_eq!(code, 200);
    assert!(
        sample(&text, "colony_learner_examples").is_some_and(|n| n >= 40.0),
        "the learner counts its examples"
    );
    assert!(sample(&text, "colony_learner_holdout_error_ratio").is_some_and(|r| r < 1.0));
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            anyhow::anyhow!(
                "promtool is required (cluster/test.sh installs Debian's prometheus package): {e}"
            )
        })?;
    std::io::Write::write_all(
        &mut promtool.stdin.take().ok_or_else(|| anyhow::anyhow!("no stdin"))?,
        text.as_bytes(),
    )?;
    let checked = promtool.wait_with_output()?;
    assert!(
        checked.status.success(),
        "promtool rejects the learner's /metrics: {}",
        String::from_utf8_lossy(&checked.stderr)
    );
    assert_eq!(http_get(&metrics_addr, "/readyz")?.0, 200, "a learner following the feed is ready");

    // `--memory auto` is now sized by the model: these tasks peak at a few MiB, so the floor
    // (64 MiB) applies instead of the no-model fallback (512 MiB).
    let auto = c
        .submit_task(pb::SubmitTaskRequest { spec: Some(shell("job-auto", "0.01", "auto", 0)) })
        .await?
        .into_inner()
        .task
        .map_or(0, |t| t.id);
    let placed = wait_for("the memory-auto task to be placed", Duration::from_secs(30), || async {
        let mut c = client(&cluster.addrs()[0]).await?;
        let task =
            c.get_task(pb::GetTaskRequest { id: auto, consistency: None }).await?.into_inner().task;
        Ok(task.filter(|t| t.attempt > 0))
    })
    .await?;
    assert_eq!(
        placed.allocated.map(|a| a.memory_bytes),
        Some(64 << 20),
        "sized by the model, to the floor"
    );

    // The registry refuses what the scheduler could not use, and rollbacks to nowhere.
    let mut bad = model.clone();
    bad.feature_schema = "something-else".into();
    let refused = c
        .publish_model(pb::PublishModelRequest { model: Some(bad) })
        .await
        .expect_err("wrong schema");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused}");
    let mut garbage = model.clone();
    garbage.weights = b"{\"layers\": [1, 2]}".to_vec();
    let refused = c
        .publish_model(pb::PublishModelRequest { model: Some(garbage) })
        .await
        .expect_err("bad weights");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused}");
    let ca = cluster.token.parse::<colony_quic::Token>()?.ca_fingerprint;
    let mut anonymous =
        colony_tests::client_with(&cluster.addrs()[0], &colony_client::Auth::pinned(ca))?;
    let refused = anonymous
        .publish_model(pb::PublishModelRequest { model: Some(model.clone()) })
        .await
        .expect_err("no credentials");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused}");
    let refused = c
        .rollback_model(pb::RollbackModelRequest { version: 999 })
        .await
        .expect_err("unknown version");
    assert_eq!(refused.code(), tonic::Code::NotFound, "{refused}");
    let after = c.list_models(pb::ListModelsRequest {}).await?.into_inner();
    assert_eq!(
        after.models.len(),
        models.models.len().max(after.models.len()),
        "nothing refused was added"
    );
    assert!(after.models.iter().all(|m| m.feature_schema == "colony-features-v1"));
    let rolled = c
        .rollback_model(pb::RollbackModelRequest { version: model.version })
        .await?
        .into_inner()
        .model
        .unwrap_or_default();
    assert!(rolled.current && rolled.version == model.version);
    Ok(())
}
