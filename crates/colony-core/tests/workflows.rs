//! Workflows in the state machine: steps start only when what they wait for has ended, outputs
//! flow into inputs (a fan-out's as a list), a failure fails the workflow and cancels the rest,
//! cancel and retry, outputs over a limit, and retention. Invariants are checked after every
//! command.

#![allow(clippy::unwrap_used)]

use colony_core::{
    AttemptOutcome, AttemptResult, AttemptStatus, Command, CommandError, ExecutorId, ExecutorSpec,
    InputSource, JoinKind, Outcome, OutputRef, Outputs, Placement, Proposal, Resources, Retention,
    RunSpec, StateMachine, StepSpec, StepState, TaskId, TaskSpec, TaskState, Workflow, WorkflowId,
    WorkflowSpec, WorkflowState,
};
use std::collections::{BTreeMap, BTreeSet};

const HOUR: u64 = 3_600_000;

fn task() -> TaskSpec {
    TaskSpec {
        name: String::new(),
        namespace: "default".to_owned(),
        labels: BTreeMap::new(),
        capabilities: BTreeSet::new(),
        resources: Resources {
            cpu_millis: 100,
            memory_bytes: 1 << 20,
            gpus: 0,
            custom: BTreeMap::new(),
        },
        priority: 1,
        deadline_unix_ms: None,
        timeout_ms: None,
        max_retries: 0,
        dependencies: BTreeSet::new(),
        run: RunSpec::Process {
            program: "/bin/true".to_owned(),
            args: vec![],
            env: BTreeMap::new(),
        },
        idempotency_key: None,
        placement: Default::default(),
        memory_auto: false,
    }
}

fn step(name: &str, after: &[&str], inputs: &[(&str, &str)], outputs: &[&str]) -> StepSpec {
    StepSpec {
        name: name.to_owned(),
        task: task(),
        after: after.iter().map(|s| s.to_string()).collect(),
        inputs: inputs
            .iter()
            .map(|(k, v)| (k.to_string(), InputSource::parse(v).unwrap()))
            .collect(),
        outputs: outputs.iter().map(|s| s.to_string()).collect(),
        for_each: None,
        allow_failure: false,
    }
}

fn workflow(name: &str, steps: Vec<StepSpec>) -> WorkflowSpec {
    WorkflowSpec {
        name: name.to_owned(),
        namespace: "default".to_owned(),
        params: BTreeMap::from([("topic".to_owned(), "raft".to_owned())]),
        steps,
    }
}

/// research -> analyze (one per topic) -> report (all analyses).
fn research() -> WorkflowSpec {
    let mut analyze = step("analyze", &["research"], &[("notes", "research.notes")], &["summary"]);
    analyze.for_each = Some(OutputRef { step: "research".into(), output: "topics".into() });
    workflow(
        "research",
        vec![
            step("research", &[], &[("topic", "params.topic")], &["notes", "topics"]),
            analyze,
            step("report", &["analyze"], &[("summaries", "analyze.summary")], &["report"]),
        ],
    )
}

fn outputs(pairs: &[(&str, &str)]) -> Outputs {
    pairs.iter().map(|(k, v)| (k.to_string(), v.as_bytes().to_vec())).collect()
}

struct Cluster {
    sm: StateMachine,
    now: u64,
    executor: ExecutorId,
}

impl Cluster {
    fn new() -> Cluster {
        let mut cluster =
            Cluster { sm: StateMachine::new(), now: 1_000_000, executor: ExecutorId(1) };
        let hash = [1; 32];
        let expires = cluster.now + 10 * HOUR;
        cluster
            .apply(Command::CreateJoinToken {
                secret_hash: hash,
                expires_unix_ms: expires,
                kind: JoinKind::Executor,
            })
            .unwrap();
        cluster
            .apply(Command::AdmitExecutor {
                secret_hash: hash,
                expected_id: ExecutorId(1),
                name: "e1".into(),
                cert_fingerprint: hash,
            })
            .unwrap();
        let spec = ExecutorSpec {
            name: "e1".into(),
            capacity: Resources {
                cpu_millis: 64_000,
                memory_bytes: 64 << 30,
                gpus: 0,
                custom: BTreeMap::new(),
            },
            labels: BTreeMap::new(),
            capabilities: BTreeSet::new(),
        };
        cluster.apply(Command::RegisterExecutor { id: ExecutorId(1), spec }).unwrap();
        cluster
    }

    fn apply(&mut self, command: Command) -> Result<Outcome, CommandError> {
        let proposal = Proposal { now_unix_ms: self.now, commands: vec![command] };
        let result = self.sm.apply_proposal(&proposal).remove(0);
        self.sm.check_invariants().unwrap();
        result
    }

    fn submit(&mut self, spec: WorkflowSpec) -> WorkflowId {
        match self.apply(Command::SubmitWorkflow(spec)).unwrap() {
            Outcome::WorkflowSubmitted { workflow } => workflow.id,
            other => panic!("{other:?}"),
        }
    }

    fn workflow(&self, id: WorkflowId) -> Workflow {
        self.sm.get_workflow(id).cloned().unwrap()
    }

    fn step_tasks(&self, id: WorkflowId, step: &str) -> Vec<TaskId> {
        let w = self.workflow(id);
        let index = w.spec.step_index(step).unwrap();
        w.steps[index].tasks.clone()
    }

    fn step_state(&self, id: WorkflowId, step: &str) -> StepState {
        let w = self.workflow(id);
        w.steps[w.spec.step_index(step).unwrap()].state
    }

    /// Places `task` and reports it ended with `outcome` and `outputs`.
    fn finish(
        &mut self,
        task: TaskId,
        outcome: AttemptOutcome,
        outputs: Outputs,
    ) -> Result<Outcome, CommandError> {
        let placement =
            Placement { task, executor: self.executor, evict: vec![], memory_bytes: None };
        let token = match self
            .apply(Command::PlaceTasks { placements: vec![placement], unschedulable: vec![] })
            .unwrap()
        {
            Outcome::Placed { assigned, .. } => assigned[0].token,
            other => panic!("{other:?}"),
        };
        let result = AttemptResult {
            outcome,
            exit_code: Some(if outcome == AttemptOutcome::Succeeded { 0 } else { 1 }),
            stdout_tail: String::new(),
            stderr_tail: String::new(),
            message: String::new(),
            peak_memory_bytes: None,
        };
        let status = match outputs.is_empty() {
            true => AttemptStatus::Finished(result),
            false => AttemptStatus::FinishedWithOutputs(result, outputs),
        };
        self.apply(Command::Report { executor: self.executor, task, token, status })
    }

    fn succeed(&mut self, task: TaskId, pairs: &[(&str, &str)]) {
        self.finish(task, AttemptOutcome::Succeeded, outputs(pairs)).unwrap();
    }

    fn state(&self, task: TaskId) -> TaskState {
        self.sm.get_task(task).unwrap().state
    }
}

#[test]
fn outputs_flow_through_a_fan_out_and_a_fan_in() {
    let mut c = Cluster::new();
    let id = c.submit(research());
    // Only the first step has a task; the others wait for it.
    let research = c.step_tasks(id, "research");
    assert_eq!(research.len(), 1);
    assert_eq!(c.step_state(id, "analyze"), StepState::Waiting);
    assert_eq!(c.sm.task_inputs(research[0]), outputs(&[("topic", "raft")]));
    assert_eq!(c.sm.get_task(research[0]).unwrap().spec.name, "research/research");

    let topics = r#"["election", {"log": 1}, "reads"]"#;
    c.succeed(research[0], &[("notes", "some notes"), ("topics", topics)]);
    let analyses = c.step_tasks(id, "analyze");
    assert_eq!(analyses.len(), 3, "one task per item");
    assert_eq!(c.sm.get_task(analyses[1]).unwrap().spec.name, "research/analyze/1");
    let inputs = c.sm.task_inputs(analyses[1]);
    assert_eq!(inputs, outputs(&[("item", r#"{"log":1}"#), ("notes", "some notes")]));
    assert_eq!(
        c.sm.task_inputs(analyses[0]).get("item").map(Vec::as_slice),
        Some(&b"election"[..])
    );
    assert_eq!(c.sm.task_declared_outputs(analyses[0]), BTreeSet::from(["summary".to_owned()]));

    // The report waits for every instance.
    c.succeed(analyses[0], &[("summary", "s0")]);
    c.succeed(analyses[2], &[("summary", "s2")]);
    assert_eq!(c.step_state(id, "report"), StepState::Waiting);
    c.succeed(analyses[1], &[("summary", "s1")]);
    let report = c.step_tasks(id, "report");
    assert_eq!(c.sm.task_inputs(report[0]), outputs(&[("summaries", r#"["s0","s1","s2"]"#)]));
    c.succeed(report[0], &[("report", "done")]);
    let w = c.workflow(id);
    assert_eq!(w.state, WorkflowState::Succeeded);
    let written = "some notes".len() + topics.len() + "s0s1s2".len() + "done".len();
    assert_eq!(w.output_bytes, written as u64);
    assert_eq!(c.sm.task_outputs(report[0]), Some(&outputs(&[("report", "done")])));
}

#[test]
fn a_failed_step_fails_the_workflow_and_cancels_the_rest() {
    let mut c = Cluster::new();
    let wf = workflow(
        "w",
        vec![step("a", &[], &[], &[]), step("b", &[], &[], &[]), step("c", &["a", "b"], &[], &[])],
    );
    let id = c.submit(wf);
    let (a, b) = (c.step_tasks(id, "a")[0], c.step_tasks(id, "b")[0]);
    c.finish(a, AttemptOutcome::Failed, Outputs::new()).unwrap();
    let w = c.workflow(id);
    assert_eq!(w.state, WorkflowState::Failed);
    assert!(w.reason.as_deref().unwrap_or_default().starts_with("step a failed"), "{:?}", w.reason);
    assert_eq!(c.state(b), TaskState::Cancelled, "the running sibling was cancelled");
    assert_eq!(c.step_state(id, "c"), StepState::Cancelled);
    assert!(c.step_tasks(id, "c").is_empty(), "c never started");
}

#[test]
fn allow_failure_lets_later_steps_run_without_its_outputs() {
    let mut c = Cluster::new();
    let mut a = step("a", &[], &[], &["x"]);
    a.allow_failure = true;
    let id = c.submit(workflow("w", vec![a, step("b", &["a"], &[("x", "a.x")], &[])]));
    let a = c.step_tasks(id, "a")[0];
    c.finish(a, AttemptOutcome::Failed, Outputs::new()).unwrap();
    let b = c.step_tasks(id, "b");
    assert_eq!(b.len(), 1);
    assert!(c.sm.task_inputs(b[0]).is_empty(), "the failed step's output is absent");
    c.succeed(b[0], &[]);
    assert_eq!(c.workflow(id).state, WorkflowState::Succeeded);
}

#[test]
fn outputs_past_a_limit_or_missing_fail_the_step_saying_which() {
    let mut c = Cluster::new();
    let id = c.submit(workflow("w", vec![step("a", &[], &[], &["notes"])]));
    let a = c.step_tasks(id, "a")[0];
    let big = "x".repeat(c.sm.workflow_limits().output_bytes_max + 1);
    c.finish(a, AttemptOutcome::Succeeded, outputs(&[("notes", &big)])).unwrap();
    assert_eq!(c.state(a), TaskState::Failed);
    let reason = c.sm.get_task(a).unwrap().reason.clone().unwrap_or_default();
    assert!(reason.starts_with("output notes is 262145 bytes; the limit is 262144"), "{reason}");
    assert!(reason.contains("external storage"), "{reason}");
    assert!(c.sm.task_outputs(a).is_none(), "nothing over the limit is kept");

    let id = c.submit(workflow("w2", vec![step("a", &[], &[], &["notes"])]));
    let a = c.step_tasks(id, "a")[0];
    c.finish(a, AttemptOutcome::Succeeded, outputs(&[("other", "x")])).unwrap();
    let reason = c.sm.get_task(a).unwrap().reason.clone().unwrap_or_default();
    assert!(reason.contains("did not write its declared output notes"), "{reason}");
}

#[test]
fn a_for_each_over_something_not_a_list_fails_the_step() {
    let mut c = Cluster::new();
    let mut fan = step("fan", &["plan"], &[], &[]);
    fan.for_each = Some(OutputRef { step: "plan".into(), output: "items".into() });
    let id = c.submit(workflow("w", vec![step("plan", &[], &[], &["items"]), fan]));
    let plan = c.step_tasks(id, "plan")[0];
    c.succeed(plan, &[("items", "{\"not\": \"a list\"}")]);
    let w = c.workflow(id);
    assert_eq!(w.state, WorkflowState::Failed);
    let reason = w.reason.unwrap_or_default();
    assert!(reason.contains("for_each plan.items: the output is not a JSON list"), "{reason}");

    // A list longer than the limit.
    let mut fan = step("fan", &["plan"], &[], &[]);
    fan.for_each = Some(OutputRef { step: "plan".into(), output: "items".into() });
    let id = c.submit(workflow("w3", vec![step("plan", &[], &[], &["items"]), fan]));
    let plan = c.step_tasks(id, "plan")[0];
    let items = serde_json::to_string(&(0..257).collect::<Vec<u32>>()).unwrap();
    c.succeed(plan, &[("items", &items)]);
    let reason = c.workflow(id).reason.unwrap_or_default();
    assert!(reason.contains("257 items; the limit is 256 (for_each_items_max)"), "{reason}");
    assert!(c.step_tasks(id, "fan").is_empty(), "no instance was created");

    // An empty list: nothing to run, the step succeeds at once.
    let mut fan = step("fan", &["plan"], &[], &[]);
    fan.for_each = Some(OutputRef { step: "plan".into(), output: "items".into() });
    let id = c.submit(workflow("w2", vec![step("plan", &[], &[], &["items"]), fan]));
    let plan = c.step_tasks(id, "plan")[0];
    c.succeed(plan, &[("items", "[]")]);
    assert_eq!(c.workflow(id).state, WorkflowState::Succeeded);
}

#[test]
fn cancel_and_retry() {
    let mut c = Cluster::new();
    let id = c.submit(workflow(
        "w",
        vec![step("a", &[], &[], &["v"]), step("b", &["a"], &[("v", "a.v")], &[])],
    ));
    assert!(matches!(
        c.apply(Command::RetryWorkflow { id }),
        Err(CommandError::WorkflowRunning(_))
    ));
    let a = c.step_tasks(id, "a")[0];
    c.succeed(a, &[("v", "42")]);
    let b = c.step_tasks(id, "b")[0];
    c.apply(Command::CancelWorkflow { id, reason: "stop".into() }).unwrap();
    assert_eq!(c.workflow(id).state, WorkflowState::Cancelled);
    assert_eq!(c.state(b), TaskState::Cancelled);
    assert!(matches!(
        c.apply(Command::CancelWorkflow { id, reason: String::new() }),
        Err(CommandError::WorkflowFinished { state: WorkflowState::Cancelled, .. })
    ));

    // Retry re-runs only b, with a's output.
    c.apply(Command::RetryWorkflow { id }).unwrap();
    let w = c.workflow(id);
    assert_eq!(w.state, WorkflowState::Running);
    assert_eq!(c.step_tasks(id, "a"), vec![a], "a kept its task and output");
    let b2 = c.step_tasks(id, "b")[0];
    assert_ne!(b2, b);
    assert_eq!(c.sm.task_inputs(b2), outputs(&[("v", "42")]));
    c.succeed(b2, &[]);
    let w = c.workflow(id);
    assert_eq!(w.state, WorkflowState::Succeeded);
    assert_eq!(w.steps.iter().map(|s| s.runs).collect::<Vec<_>>(), vec![1, 2]);
    assert!(matches!(
        c.apply(Command::RetryWorkflow { id }),
        Err(CommandError::WorkflowFinished { .. })
    ));
    assert!(matches!(
        c.apply(Command::RetryWorkflow { id: WorkflowId(99) }),
        Err(CommandError::UnknownWorkflow(_))
    ));
}

#[test]
fn bad_workflows_change_nothing() {
    let mut c = Cluster::new();
    let before = c.sm.clone();
    let cyclic = workflow("w", vec![step("a", &["b"], &[], &[]), step("b", &["a"], &[], &[])]);
    let error = c.apply(Command::SubmitWorkflow(cyclic)).unwrap_err();
    assert!(error.to_string().contains("cycle"), "{error}");
    let mut late = workflow("w", vec![step("a", &[], &[], &[])]);
    late.steps[0].task.deadline_unix_ms = Some(1);
    let error = c.apply(Command::SubmitWorkflow(late)).unwrap_err();
    assert!(error.to_string().contains("step a: deadline 1 is already past"), "{error}");
    let mut tc = before.clone();
    // Only the clock moved.
    tc.apply_proposal(&Proposal { now_unix_ms: c.now, commands: vec![] });
    assert_eq!(c.sm, tc);
}

#[test]
fn retention_keeps_a_running_workflow_and_forgets_a_finished_one_with_its_last_task() {
    let mut c = Cluster::new();
    let id = c.submit(workflow(
        "w",
        vec![step("a", &[], &[], &["v"]), step("b", &["a"], &[("v", "a.v")], &[])],
    ));
    let a = c.step_tasks(id, "a")[0];
    c.succeed(a, &[("v", "1")]);
    let retention = Retention {
        task_retention_ms: HOUR,
        finished_tasks_max: 1_000,
        executor_gc_after_ms: 100 * HOUR,
        scan_max: 100,
    };
    c.now += 2 * HOUR;
    c.apply(Command::Collect(retention)).unwrap();
    assert!(c.sm.get_task(a).is_some(), "a's output is still needed by b");
    let b = c.step_tasks(id, "b")[0];
    c.succeed(b, &[]);
    c.now += 2 * HOUR;
    c.apply(Command::Collect(retention)).unwrap();
    assert!(c.sm.get_task(a).is_none() && c.sm.get_task(b).is_none());
    assert!(c.sm.task_outputs(a).is_none());
    assert!(c.sm.get_workflow(id).is_none(), "the workflow went with its last task");
}
