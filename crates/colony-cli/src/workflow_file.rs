//! Workflow files: YAML (or JSON, which YAML reads too) with a name, parameters and named steps.
//! Unknown keys are errors with their line and column; the whole workflow is checked as the
//! server will check it before anything is sent, each error naming the step.
//!
//! ```yaml
//! name: research
//! params:
//!   topic: raft failover        # a default; `--param topic=...` overrides it
//!   audience: null              # no default: `--param audience=...` is required
//! steps:
//!   - name: plan
//!     run: [python3, plan.py]   # the program and its arguments
//!     inputs: {topic: params.topic}
//!     outputs: [topics]
//!   - name: analyze
//!     after: [plan]
//!     for_each: plan.topics     # once per item of the JSON list plan wrote
//!     run: [sh, -c, 'wc -w < "$COLONY_INPUT_DIR/item" > "$COLONY_OUTPUT_DIR/summary"']
//!     outputs: [summary]
//!   - name: report
//!     after: [analyze]
//!     inputs: {summaries: analyze.summary}   # a JSON list of every instance's summary
//!     run: [sh, -c, 'cat "$COLONY_INPUT_DIR/summaries" > "$COLONY_OUTPUT_DIR/report"']
//!     outputs: [report]
//! ```

use crate::task_cmd::{custom_resources, pairs};
use anyhow::{anyhow, bail, Context as _, Result};
use colony_core::{
    parse_cpu_millis, parse_memory_bytes, Limits, PlacementPolicy, Resources, RunSpec, TaskSpec,
    WorkflowLimits, WorkflowSpec,
};
use colony_proto::pb;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

/// The largest workflow file read.
const FILE_BYTES_MAX: u64 = 1 << 20;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WorkflowFile {
    name: String,
    #[serde(default)]
    namespace: Option<String>,
    /// Parameter defaults; `null` for one the submitter must give.
    #[serde(default)]
    params: BTreeMap<String, Option<String>>,
    steps: Vec<StepFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StepFile {
    name: String,
    /// The program and its arguments.
    #[serde(default)]
    run: Option<Vec<String>>,
    /// A built-in handler instead of a program (`sleep`, `echo`, `fail`).
    #[serde(default)]
    builtin: Option<String>,
    /// The built-in handler's input.
    #[serde(default)]
    input: Option<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    /// Millicores (250m) or cores (2, 0.5); default 100m.
    #[serde(default)]
    cpu: Option<String>,
    /// 64Mi, 1Gi, bytes, or `auto`; default 64Mi.
    #[serde(default)]
    memory: Option<String>,
    #[serde(default)]
    gpus: u32,
    /// Custom resources in whole units.
    #[serde(default)]
    resources: BTreeMap<String, u64>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    capabilities: Vec<String>,
    #[serde(default)]
    priority: u16,
    #[serde(default)]
    retries: u32,
    /// Each attempt's time limit (90s, 10m).
    #[serde(default)]
    timeout: Option<String>,
    /// The step must have started within this long of the submission (30m, 2h).
    #[serde(default)]
    deadline: Option<String>,
    /// Place on the emptiest executor that fits instead of the fullest.
    #[serde(default)]
    spread: bool,
    #[serde(default)]
    after: Vec<String>,
    /// Input file name to `STEP.OUTPUT` or `params.NAME`.
    #[serde(default)]
    inputs: BTreeMap<String, String>,
    #[serde(default)]
    outputs: Vec<String>,
    /// `STEP.OUTPUT` holding a JSON list: one task per item.
    #[serde(default)]
    for_each: Option<String>,
    #[serde(default)]
    allow_failure: bool,
}

/// Reads and checks a workflow file, applying `--param KEY=VALUE` overrides; the namespace flag,
/// when given, wins over the file's.
pub fn load(
    path: &Path,
    params: &[String],
    namespace: Option<&str>,
    now_unix_ms: u64,
) -> Result<pb::WorkflowSpec> {
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut text = String::new();
    std::io::Read::read_to_string(&mut std::io::Read::take(file, FILE_BYTES_MAX + 1), &mut text)
        .with_context(|| format!("cannot read {}", path.display()))?;
    if text.len() as u64 > FILE_BYTES_MAX {
        bail!("{} is larger than {FILE_BYTES_MAX} bytes", path.display());
    }
    parse(&text, params, namespace, now_unix_ms).with_context(|| format!("{}", path.display()))
}

/// `load` without the file.
pub fn parse(
    text: &str,
    params: &[String],
    namespace: Option<&str>,
    now_unix_ms: u64,
) -> Result<pb::WorkflowSpec> {
    let file: WorkflowFile = serde_norway::from_str(text).map_err(|e| anyhow!("{e}"))?;
    let mut values = file.params;
    for (key, value) in pairs("param", params)? {
        match values.get_mut(&key) {
            Some(slot) => *slot = Some(value),
            None => {
                let declared: Vec<&str> = values.keys().map(String::as_str).collect();
                bail!(
                    "--param {key}: the workflow declares no parameter {key:?} (it declares: {})",
                    if declared.is_empty() { "none".to_owned() } else { declared.join(", ") }
                );
            }
        }
    }
    let params = values
        .into_iter()
        .map(|(key, value)| match value {
            Some(value) => Ok((key, value)),
            None => Err(anyhow!("parameter {key} has no default: give --param {key}=VALUE")),
        })
        .collect::<Result<BTreeMap<_, _>>>()?;
    let namespace = namespace
        .map(str::to_owned)
        .or(file.namespace)
        .unwrap_or_else(|| colony_core::DEFAULT_NAMESPACE.to_owned());
    let steps = file
        .steps
        .into_iter()
        .map(|step| {
            let name = step.name.clone();
            step_message(step, &namespace, now_unix_ms).with_context(|| format!("step {name}"))
        })
        .collect::<Result<Vec<_>>>()?;
    let message = pb::WorkflowSpec {
        name: file.name,
        namespace,
        params: params.into_iter().collect(),
        steps,
    };
    // Checked here as the server will check it, so a bad workflow is refused before it is sent.
    let spec = WorkflowSpec::try_from(message.clone()).map_err(|e| anyhow!("{e}"))?;
    spec.validate(&Limits::default(), &WorkflowLimits::default()).map_err(|e| anyhow!("{e}"))?;
    Ok(message)
}

fn duration(field: &str, text: &Option<String>) -> Result<Option<u64>> {
    let Some(text) = text else { return Ok(None) };
    let parsed: Duration =
        humantime::parse_duration(text).map_err(|e| anyhow!("{field}: {text:?}: {e}"))?;
    if parsed.is_zero() {
        bail!("{field} must be greater than zero");
    }
    u64::try_from(parsed.as_millis()).map(Some).map_err(|_| anyhow!("{field} is too long"))
}

fn step_message(step: StepFile, namespace: &str, now_unix_ms: u64) -> Result<pb::WorkflowStep> {
    let run = match (step.run, step.builtin) {
        (Some(_), Some(_)) => bail!("give run or builtin, not both"),
        (Some(command), None) => {
            if step.input.is_some() {
                bail!("input is a builtin handler's; a program gets its inputs as files");
            }
            let Some((program, args)) = command.split_first() else {
                bail!("run is empty: give the program and its arguments");
            };
            RunSpec::Process { program: program.clone(), args: args.to_vec(), env: step.env }
        }
        (None, Some(handler)) => {
            if !step.env.is_empty() {
                bail!("env is for a program (run); a builtin handler has none");
            }
            RunSpec::Builtin { handler, input: step.input.unwrap_or_default() }
        }
        (None, None) => bail!("nothing to run: give run (a program and its arguments) or builtin"),
    };
    let memory = step.memory.unwrap_or_else(|| "64Mi".to_owned());
    let memory_auto = memory == "auto";
    let memory_bytes = match memory_auto {
        true => 0,
        false => parse_memory_bytes(&memory).context("invalid memory")?,
    };
    let cpu_millis =
        parse_cpu_millis(step.cpu.as_deref().unwrap_or("100m")).context("invalid cpu")?;
    let custom = custom_resources(
        &step.resources.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>(),
    )?;
    let deadline_unix_ms = duration("deadline", &step.deadline)?
        .map(|ms| now_unix_ms.checked_add(ms).ok_or_else(|| anyhow!("deadline is too long")))
        .transpose()?;
    let task = TaskSpec {
        name: String::new(),
        namespace: namespace.to_owned(),
        labels: step.labels,
        capabilities: step.capabilities.into_iter().collect(),
        resources: Resources { cpu_millis, memory_bytes, gpus: step.gpus, custom },
        priority: step.priority,
        deadline_unix_ms,
        timeout_ms: duration("timeout", &step.timeout)?,
        max_retries: step.retries,
        dependencies: Default::default(),
        run,
        idempotency_key: None,
        placement: if step.spread { PlacementPolicy::Spread } else { PlacementPolicy::BinPack },
        memory_auto,
    };
    Ok(pb::WorkflowStep {
        name: step.name,
        task: Some(pb::TaskSpec::from(&task)),
        after: step.after,
        inputs: step.inputs.into_iter().collect(),
        outputs: step.outputs,
        for_each: step.for_each.unwrap_or_default(),
        allow_failure: step.allow_failure,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const RESEARCH: &str = r#"
name: research
params:
  topic: raft
  audience: null
steps:
  - name: plan
    run: [sh, -c, 'echo "[\"a\",\"b\"]" > "$COLONY_OUTPUT_DIR/topics"']
    inputs: {topic: params.topic}
    outputs: [topics]
  - name: analyze
    after: [plan]
    for_each: plan.topics
    run: [sh, -c, 'cp "$COLONY_INPUT_DIR/item" "$COLONY_OUTPUT_DIR/summary"']
    outputs: [summary]
    timeout: 30s
    retries: 2
  - name: report
    after: [analyze]
    inputs: {summaries: analyze.summary, who: params.audience}
    builtin: echo
    input: done
"#;

    fn error(text: &str, params: &[&str]) -> String {
        let params: Vec<String> = params.iter().map(|s| s.to_string()).collect();
        match parse(text, &params, None, 1_000) {
            Ok(spec) => panic!("accepted: {spec:?}"),
            Err(e) => format!("{e:#}"),
        }
    }

    #[test]
    fn the_research_workflow_reads_with_its_parameters() {
        let params = ["audience=operators".to_owned(), "topic=raft failover".to_owned()];
        let spec = match parse(RESEARCH, &params, None, 1_000) {
            Ok(spec) => spec,
            Err(e) => panic!("{e:#}"),
        };
        assert_eq!(spec.namespace, "default");
        assert_eq!(spec.params.get("topic").map(String::as_str), Some("raft failover"));
        assert_eq!(spec.steps.len(), 3);
        assert_eq!(spec.steps[1].for_each, "plan.topics");
        let task = spec.steps[1].task.as_ref().map(|t| (t.timeout_ms, t.max_retries));
        assert_eq!(task, Some((Some(30_000), 2)));
    }

    #[test]
    fn bad_files_are_refused_with_a_clear_line() {
        let with_audience = ["audience=x"];
        let cases: Vec<(String, &[&str], &str)> = vec![
            ("name: [unclosed".to_owned(), &[], "line 1 column"),
            (
                RESEARCH.replace("retries: 2", "retries: 2\n    colour: blue"),
                &with_audience,
                "unknown field `colour`",
            ),
            (
                RESEARCH.to_owned(),
                &[],
                "parameter audience has no default: give --param audience=VALUE",
            ),
            (RESEARCH.to_owned(), &["audience=x", "nope=1"], "declares no parameter \"nope\""),
            (
                RESEARCH.replace("after: [analyze]", "after: [ghost]"),
                &with_audience,
                "step report: after: unknown step \"ghost\"",
            ),
            (
                RESEARCH.replace("analyze.summary", "analyze.missing"),
                &with_audience,
                "declares no output \"missing\"",
            ),
            (RESEARCH.replace("after: [plan]", "after: [report]"), &with_audience, "cycle"),
            (
                RESEARCH.replace("timeout: 30s", "timeout: soon"),
                &with_audience,
                "step analyze: timeout: \"soon\"",
            ),
            (
                RESEARCH.replace("builtin: echo", "builtin: echo\n    run: [x]"),
                &with_audience,
                "step report: give run or builtin, not both",
            ),
        ];
        for (text, params, expected) in cases {
            let message = error(&text, params);
            assert!(message.contains(expected), "{message:?} does not contain {expected:?}");
            assert!(!message.contains('\n'), "{message:?}");
        }
    }
}
