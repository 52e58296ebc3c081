//! `colony agent`: keep a program running as a number of instances (restarted by a policy with
//! backoff, replaced when their executor is lost, rolled onto a new spec one at a time), list,
//! show, scale and stop agents.

use crate::output::{self, OutputFormat};
use crate::task_cmd::{custom_resources, pairs};
use crate::GlobalArgs;
use anyhow::{anyhow, bail, Context as _, Result};
use clap::{Args, Subcommand};
use colony_core::{
    parse_cpu_millis, parse_memory_bytes, AgentLimits, AgentSpec, HealthCheck, Limits,
    PlacementPolicy, Probe, Resources, RestartPolicy, RunSpec, TaskSpec,
};
use colony_proto::pb;
use std::time::Duration;

// Parsed once per run, so the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum AgentCommand {
    /// Create an agent (or change one: a new replica count applies at once, any other change
    /// rolls the instances onto it one at a time, each new one healthy before an old one stops).
    ///
    /// Example: colony agent run --name researcher --replicas 3 --restart on-failure --port --health-http /healthz -- python3 researcher.py
    Run(RunArgs),
    /// Agents with their instance counts.
    List(ListArgs),
    /// One agent: its spec and each instance's task, state, executor and restarts.
    Get(NameArgs),
    /// Change how many instances run.
    Scale(ScaleArgs),
    /// Stop every instance (the agent stays, stopped, until it is run again).
    Stop(NameArgs),
    /// The registry: an agent's healthy instances and where they serve (executor host and port).
    Endpoints(EndpointsArgs),
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The agent's name: its instances' tasks are NAME-0, NAME-1, ...
    #[arg(long)]
    name: String,
    #[arg(long, default_value = colony_core::DEFAULT_NAMESPACE)]
    namespace: String,
    #[arg(long, default_value_t = 1)]
    replicas: u32,
    /// always (whatever the end) or on-failure (an instance that exits 0 stays down).
    #[arg(long, default_value = "on-failure")]
    restart: RestartPolicy,
    /// The first restart in a row waits this long; each further one twice as long.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    backoff: Duration,
    /// The longest a restart waits.
    #[arg(long, default_value = "1m", value_parser = humantime::parse_duration)]
    backoff_max: Duration,
    /// CPU each instance reserves: millicores (250m) or cores (2, 0.5).
    #[arg(long, default_value = "100m")]
    cpu: String,
    /// Memory each instance reserves.
    #[arg(long, default_value = "64Mi")]
    memory: String,
    #[arg(long, default_value_t = 0)]
    gpus: u32,
    /// A named custom resource to reserve (repeatable).
    #[arg(long = "resource", value_name = "NAME=COUNT")]
    resources: Vec<String>,
    /// 0 (lowest) to 1000 (highest); instances preempt lower-priority tasks.
    #[arg(long, default_value_t = 0)]
    priority: u16,
    /// A label an executor must carry (repeatable).
    #[arg(long = "label", value_name = "KEY=VALUE")]
    labels: Vec<String>,
    /// A capability an executor must offer (repeatable).
    #[arg(long = "capability")]
    capabilities: Vec<String>,
    /// An environment variable (repeatable).
    #[arg(long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Spread instances over executors instead of packing them.
    #[arg(long)]
    spread: bool,
    /// Lease each instance a port of its executor's (in COLONY_PORT), registered with it.
    #[arg(long)]
    port: bool,
    /// A health check: a shell command run by the executor in the instance's directory, as its
    /// user, with COLONY_PORT (exit 0 passes).
    #[arg(long, value_name = "COMMAND", conflicts_with = "health_http")]
    health_cmd: Option<String>,
    /// A health check: GET this path on the instance's port on its executor (2xx passes;
    /// needs --port).
    #[arg(long, value_name = "PATH", requires = "port")]
    health_http: Option<String>,
    /// How often the check runs (until an instance first passes, at least every second).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    health_interval: Duration,
    /// How long one check may take; a check that hangs fails.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    health_timeout: Duration,
    /// Failed checks in a row that make a healthy instance unhealthy.
    #[arg(long, default_value_t = colony_proto::agent::HEALTH_FAILURES_DEFAULT)]
    health_failures: u32,
    /// The program and its arguments.
    #[arg(last = true, required = true, value_name = "PROGRAM [ARGS]")]
    command: Vec<String>,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only this namespace (default: every one the token covers).
    #[arg(long)]
    namespace: Option<String>,
}

#[derive(Debug, Args)]
pub struct NameArgs {
    name: String,
    #[arg(long, default_value = colony_core::DEFAULT_NAMESPACE)]
    namespace: String,
}

#[derive(Debug, Args)]
pub struct EndpointsArgs {
    name: String,
    #[arg(long, default_value = colony_core::DEFAULT_NAMESPACE)]
    namespace: String,
    /// Answer from the server asked, without asking the leader (may be behind).
    #[arg(long)]
    stale: bool,
}

#[derive(Debug, Args)]
pub struct ScaleArgs {
    name: String,
    replicas: u32,
    #[arg(long, default_value = colony_core::DEFAULT_NAMESPACE)]
    namespace: String,
}

fn millis(flag: &str, d: Duration) -> Result<u64> {
    u64::try_from(d.as_millis()).map_err(|_| anyhow!("--{flag} is too long"))
}

/// The flags as a spec, checked the way the server will check it, so bad input is refused here.
fn build_spec(args: &RunArgs) -> Result<AgentSpec> {
    let (program, rest) = args
        .command
        .split_first()
        .ok_or_else(|| anyhow!("nothing to run: give `-- PROGRAM [ARGS]`"))?;
    let task = TaskSpec {
        name: String::new(),
        namespace: args.namespace.clone(),
        labels: pairs("label", &args.labels)?,
        capabilities: args.capabilities.iter().cloned().collect(),
        resources: Resources {
            cpu_millis: parse_cpu_millis(&args.cpu).context("invalid --cpu")?,
            memory_bytes: parse_memory_bytes(&args.memory).context("invalid --memory")?,
            gpus: args.gpus,
            custom: custom_resources(&args.resources)?,
        },
        priority: args.priority,
        deadline_unix_ms: None,
        timeout_ms: None,
        max_retries: 0,
        dependencies: Default::default(),
        run: RunSpec::Process {
            program: program.clone(),
            args: rest.to_vec(),
            env: pairs("env", &args.env)?,
        },
        idempotency_key: None,
        placement: if args.spread { PlacementPolicy::Spread } else { PlacementPolicy::BinPack },
        memory_auto: false,
    };
    let spec = AgentSpec {
        name: args.name.clone(),
        namespace: args.namespace.clone(),
        task,
        replicas: args.replicas,
        restart: args.restart,
        backoff_ms_base: millis("backoff", args.backoff)?,
        backoff_ms_max: millis("backoff-max", args.backoff_max)?,
        port: args.port,
        health: health_check(args)?,
    };
    spec.validate(&Limits::default(), &AgentLimits::default())?;
    Ok(spec)
}

/// The health flags as a check, if one was asked for.
fn health_check(args: &RunArgs) -> Result<Option<HealthCheck>> {
    let probe = match (&args.health_cmd, &args.health_http) {
        (Some(command), None) => Probe::Command {
            program: "/bin/sh".to_owned(),
            args: vec!["-c".to_owned(), command.clone()],
        },
        (None, Some(path)) => Probe::Http { path: path.clone() },
        (None, None) => return Ok(None),
        (Some(_), Some(_)) => bail!("give --health-cmd or --health-http, not both"),
    };
    Ok(Some(HealthCheck {
        probe,
        interval_ms: millis("health-interval", args.health_interval)?,
        timeout_ms: millis("health-timeout", args.health_timeout)?,
        failures: args.health_failures,
    }))
}

pub async fn run(command: AgentCommand, global: &GlobalArgs) -> Result<()> {
    let client = global.client()?;
    match command {
        AgentCommand::Run(args) => {
            let spec = pb::AgentSpec::from(&build_spec(&args)?);
            let request = pb::RunAgentRequest { spec: Some(spec) };
            let response = client
                .call("run agent", |mut c| {
                    let request = request.clone();
                    async move { c.run_agent(request).await }
                })
                .await?;
            let agent =
                response.agent.ok_or_else(|| anyhow!("the server's answer has no agent"))?;
            match global.output {
                OutputFormat::Json => output::print_json(&agent_json(&agent)),
                OutputFormat::Table => output::out(format!(
                    "{} {} (version {}, {} instances)",
                    if response.created { "created" } else { "updated" },
                    args.name,
                    agent.version,
                    agent.instances.len()
                )),
            }
        }
        AgentCommand::List(args) => {
            let request = pb::ListAgentsRequest {
                namespace: args.namespace.unwrap_or_default(),
                consistency: None,
            };
            let response = client
                .call("list agents", |mut c| {
                    let request = request.clone();
                    async move { c.list_agents(request).await }
                })
                .await?;
            match global.output {
                OutputFormat::Json => {
                    output::print_json(&response.agents.iter().map(agent_json).collect::<Vec<_>>())
                }
                OutputFormat::Table => {
                    let mut table = output::table([
                        "NAMESPACE",
                        "NAME",
                        "STATE",
                        "VERSION",
                        "REPLICAS",
                        "RUNNING",
                        "RESTARTS",
                    ]);
                    for a in &response.agents {
                        let spec = a.spec.clone().unwrap_or_default();
                        let running = a
                            .instances
                            .iter()
                            .filter(|i| i.state == pb::TaskState::Running as i32)
                            .count();
                        let restarts: u64 = a.instances.iter().map(|i| i.restarts).sum();
                        table.add_row(vec![
                            spec.namespace,
                            spec.name,
                            a.state.clone(),
                            a.version.to_string(),
                            spec.replicas.to_string(),
                            running.to_string(),
                            restarts.to_string(),
                        ]);
                    }
                    output::print_table(table)
                }
            }
        }
        AgentCommand::Get(args) => {
            let request = pb::GetAgentRequest {
                namespace: args.namespace,
                name: args.name,
                consistency: None,
            };
            let response = client
                .call("get agent", |mut c| {
                    let request = request.clone();
                    async move { c.get_agent(request).await }
                })
                .await?;
            let agent =
                response.agent.ok_or_else(|| anyhow!("the server's answer has no agent"))?;
            print_agent(&agent, global.output)
        }
        AgentCommand::Scale(args) => {
            if args.replicas == 0 {
                bail!(
                    "replicas must be at least 1: `colony agent stop {}` stops every instance",
                    args.name
                );
            }
            let request = pb::ScaleAgentRequest {
                namespace: args.namespace,
                name: args.name,
                replicas: args.replicas,
            };
            let response = client
                .call("scale agent", |mut c| {
                    let request = request.clone();
                    async move { c.scale_agent(request).await }
                })
                .await?;
            let agent =
                response.agent.ok_or_else(|| anyhow!("the server's answer has no agent"))?;
            print_agent(&agent, global.output)
        }
        AgentCommand::Endpoints(args) => {
            let request = pb::ResolveAgentRequest {
                namespace: args.namespace,
                name: args.name,
                consistency: Some(pb::ReadConsistency { stale: args.stale }),
            };
            let response = client
                .call("resolve agent", |mut c| {
                    let request = request.clone();
                    async move { c.resolve_agent(request).await }
                })
                .await?;
            print_endpoints(&response.endpoints, global.output)
        }
        AgentCommand::Stop(args) => {
            let request = pb::StopAgentRequest { namespace: args.namespace, name: args.name };
            let response = client
                .call("stop agent", |mut c| {
                    let request = request.clone();
                    async move { c.stop_agent(request).await }
                })
                .await?;
            let agent =
                response.agent.ok_or_else(|| anyhow!("the server's answer has no agent"))?;
            print_agent(&agent, global.output)
        }
    }
}

fn state_name(state: i32) -> String {
    pb::TaskState::try_from(state)
        .map(|s| s.as_str_name().trim_start_matches("TASK_STATE_").to_lowercase())
        .unwrap_or_else(|_| "unknown".to_owned())
}

fn agent_json(a: &pb::Agent) -> serde_json::Value {
    let spec = a.spec.clone().unwrap_or_default();
    let command = match spec.task.as_ref().and_then(|t| t.run.as_ref()) {
        Some(pb::task_spec::Run::Process(p)) => {
            std::iter::once(p.program.clone()).chain(p.args.iter().cloned()).collect()
        }
        _ => Vec::new(),
    };
    serde_json::json!({
        "namespace": spec.namespace,
        "name": spec.name,
        "state": a.state,
        "version": a.version,
        "replicas": spec.replicas,
        "restart": spec.restart,
        "backoff_ms_base": spec.backoff_ms_base,
        "backoff_ms_max": spec.backoff_ms_max,
        "port": spec.port,
        "health": spec.health.as_ref().map(|h| serde_json::json!({
            "command": h.command,
            "http_path": (!h.http_path.is_empty()).then_some(&h.http_path),
            "interval_ms": h.interval_ms,
            "timeout_ms": h.timeout_ms,
            "failures": h.failures,
        })),
        "command": command,
        "reason": a.reason,
        "instances": a.instances.iter().map(|i| serde_json::json!({
            "index": i.index,
            "task": i.task,
            "state": state_name(i.state),
            "version": i.version,
            "replacing": (i.replacing > 0).then_some(i.replacing),
            "restarts": i.restarts,
            "executor": (i.executor > 0).then_some(i.executor),
            "not_before_unix_ms": i.not_before_unix_ms,
            "reason": i.reason,
            "endpoint": (!i.endpoint.is_empty()).then_some(&i.endpoint),
        })).collect::<Vec<_>>(),
    })
}

fn print_agent(a: &pb::Agent, format: OutputFormat) -> Result<()> {
    if format == OutputFormat::Json {
        return output::print_json(&agent_json(a));
    }
    let spec = a.spec.clone().unwrap_or_default();
    let mut fields = vec![
        ("agent", format!("{}/{}", spec.namespace, spec.name)),
        ("state", a.state.clone()),
        ("version", a.version.to_string()),
        ("replicas", spec.replicas.to_string()),
        (
            "restart",
            format!(
                "{} (backoff {} ms to {} ms)",
                spec.restart, spec.backoff_ms_base, spec.backoff_ms_max
            ),
        ),
    ];
    if let Some(h) = &spec.health {
        let probe = match h.command.as_slice() {
            [sh, c, command] if sh == "/bin/sh" && c == "-c" => format!("command {command:?}"),
            [] => format!("GET {}", h.http_path),
            argv => format!("command {argv:?}"),
        };
        fields.push((
            "health",
            format!(
                "{probe} every {} ms, {} ms each, unhealthy after {} failures",
                h.interval_ms, h.timeout_ms, h.failures
            ),
        ));
    }
    if !a.reason.is_empty() {
        fields.push(("reason", a.reason.clone()));
    }
    output::print_fields(&fields)?;
    output::out("")?;
    let mut table = output::table([
        "INSTANCE",
        "TASK",
        "STATE",
        "VERSION",
        "EXECUTOR",
        "RESTARTS",
        "REPLACING",
        "ENDPOINT",
    ]);
    for i in &a.instances {
        table.add_row(vec![
            i.index.to_string(),
            i.task.to_string(),
            state_name(i.state),
            i.version.to_string(),
            if i.executor > 0 { i.executor.to_string() } else { "-".to_owned() },
            i.restarts.to_string(),
            if i.replacing > 0 { i.replacing.to_string() } else { "-".to_owned() },
            if i.endpoint.is_empty() { "-".to_owned() } else { i.endpoint.clone() },
        ]);
    }
    output::print_table(table)
}

fn print_endpoints(endpoints: &[pb::AgentEndpoint], format: OutputFormat) -> Result<()> {
    if format == OutputFormat::Json {
        let rows: Vec<serde_json::Value> = endpoints
            .iter()
            .map(|e| {
                serde_json::json!({
                    "index": e.index,
                    "task": e.task,
                    "version": e.version,
                    "address": e.address,
                    "executor": e.executor,
                    "healthy_since_unix_ms": e.healthy_since_unix_ms,
                })
            })
            .collect();
        return output::print_json(&rows);
    }
    let mut table =
        output::table(["INSTANCE", "ADDRESS", "TASK", "VERSION", "EXECUTOR", "HEALTHY FOR"]);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    for e in endpoints {
        let healthy_for = Duration::from_secs(now.saturating_sub(e.healthy_since_unix_ms) / 1000);
        table.add_row(vec![
            e.index.to_string(),
            e.address.clone(),
            e.task.to_string(),
            if e.version == 0 { "older".to_owned() } else { e.version.to_string() },
            e.executor.to_string(),
            humantime::format_duration(healthy_for).to_string(),
        ]);
    }
    output::print_table(table)
}
