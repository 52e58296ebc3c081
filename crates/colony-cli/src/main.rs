//! The `colony` binary: servers, operators' commands, the local dev cluster and benchmarks.
//!
//! Every failure ends here as one line on stderr (`error: ...`) and exit code 1; clap's usage
//! errors keep clap's own message and exit code 2.

mod acl_cmd;
mod agent_cmd;
mod audit_cmd;
mod bench;
mod bench_failover;
mod bench_learn;
mod bench_messages;
mod bench_placement;
mod bench_schedule;
mod bench_soak;
mod bench_workflow;
mod cluster_cmd;
mod config_file;
mod dev;
mod executor_cmd;
mod learner_cmd;
mod model_cmd;
mod msg_cmd;
mod output;
mod server_cmd;
mod snapshot_cmd;
mod task_cmd;
mod workflow_cmd;
mod workflow_file;

use clap::{Args, CommandFactory as _, Parser, Subcommand};
use output::OutputFormat;
use std::process::ExitCode;
use std::time::Duration;

/// mimalloc rather than glibc's malloc: a server allocates and frees small buffers for every
/// request (HTTP/2 frames, TLS records, protobuf messages), and glibc's allocator cost the leader
/// about a fifth of its CPU per submission (README, "Allocator").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Colony: a Raft-replicated control plane for multi-agent workloads.
#[derive(Debug, Parser)]
#[command(name = "colony", version, propagate_version = true)]
struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

/// Options every subcommand takes.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Global options")]
pub struct GlobalArgs {
    /// Servers to talk to, comma-separated HOST:PORT; any one will do (non-leaders forward).
    #[arg(
        long,
        global = true,
        env = "COLONY_ENDPOINT",
        default_value = "127.0.0.1:7101",
        value_delimiter = ',',
        value_parser = colony_client::parse_endpoint
    )]
    pub endpoint: Vec<String>,
    /// How results are printed.
    #[arg(long, global = true, value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,
    /// How long a command keeps retrying through leader changes and unreachable servers.
    #[arg(long, global = true, default_value = "10s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// The token this command uses: an ACL token for calls (it also pins the cluster CA), or a
    /// join token the first time a server joins, an executor or the learner starts.
    #[arg(long, global = true, env = "COLONY_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

impl GlobalArgs {
    /// The credentials of `--token` / `COLONY_TOKEN`.
    pub fn auth(&self) -> anyhow::Result<colony_client::Auth> {
        let token = self.token.as_deref().ok_or_else(|| {
            anyhow::anyhow!(
                "no token: set COLONY_TOKEN or pass --token (`colony acl bootstrap` prints the first one)"
            )
        })?;
        colony_client::Auth::token(token).map_err(|e| anyhow::anyhow!("--token: {e}"))
    }

    /// A failover client over `--endpoint` with `--token`'s credentials.
    pub fn client(&self) -> anyhow::Result<colony_client::Client> {
        Ok(colony_client::Client::new(&self.endpoint, self.timeout, &self.auth()?)?)
    }
}

// Parsed once per run, so the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Command {
    /// Run a server (a Raft member) until SIGTERM or SIGINT
    ///
    /// A new cluster:     colony server --id 1 --listen 127.0.0.1:7101 --data-dir d1 --bootstrap
    /// Another server:    colony server --id 2 --listen 127.0.0.1:7102 --data-dir d2 --join 127.0.0.1:7101 --token SERVER_TOKEN
    /// A restart:         colony server --data-dir d1
    #[command(verbatim_doc_comment)]
    Server(server_cmd::ServerArgs),
    /// Run an executor: join the cluster over QUIC and run the tasks it is assigned
    ///
    /// First start:  colony executor --join 127.0.0.1:7101 --token TOKEN --data-dir e1 --cpu 4 --memory 8Gi
    /// A restart:    colony executor --join 127.0.0.1:7101 --data-dir e1
    #[command(verbatim_doc_comment)]
    Executor(executor_cmd::ExecutorArgs),
    /// Submit, inspect and cancel tasks.
    #[command(subcommand)]
    Task(task_cmd::TaskCommand),
    /// Workflows: a DAG of steps in one file, each step's outputs flowing into the next.
    #[command(subcommand)]
    Workflow(workflow_cmd::WorkflowCommand),
    /// Inspect and change the cluster.
    #[command(subcommand)]
    Cluster(cluster_cmd::ClusterCommand),
    /// Run the learner: follow finished tasks, train the runtime/memory model, publish better versions
    ///
    /// colony learner --join 127.0.0.1:7101 --token LEARNER_TOKEN --data-dir l1 [--device auto|cpu|cuda:0]
    #[command(verbatim_doc_comment)]
    Learner(learner_cmd::LearnerArgs),
    /// Long-running agents: run, list, get, scale, stop.
    #[command(subcommand)]
    Agent(agent_cmd::AgentCommand),
    /// Durable messages: publish, subscribe, request-response, topics.
    #[command(subcommand)]
    Msg(msg_cmd::MsgCommand),
    /// The model registry: list, show and roll back the learner's versions.
    #[command(subcommand)]
    Model(model_cmd::ModelCommand),
    /// ACL tokens: bootstrap the first one, create, list and revoke others.
    #[command(subcommand)]
    Acl(acl_cmd::AclCommand),
    /// The audit trail a server keeps in its data directory.
    #[command(subcommand)]
    Audit(audit_cmd::AuditCommand),
    /// Start a local cluster of servers and submit a demo workload; Ctrl-C stops it.
    Dev(dev::DevArgs),
    /// Load generators that print throughput and latency percentiles.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// The chaos suite: faults in a namespaced cluster, histories checked (needs root)
    #[command(subcommand)]
    Chaos(colony_chaos::ChaosCommand),
}

fn main() -> ExitCode {
    // `--config FILE` of server, executor and learner becomes flags before clap parses them.
    let argv = match config_file::expand(Cli::command(), std::env::args_os().collect()) {
        Ok(argv) => argv,
        Err(error) => {
            eprintln!("error: {error:#}");
            return ExitCode::from(2);
        }
    };
    let cli = Cli::parse_from(argv);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        // The reader of stdout has what it wanted (`colony task list | head`): stop quietly.
        Err(error) if output::is_broken_pipe(&error) => ExitCode::SUCCESS,
        Err(error) => {
            // `{:#}` joins the error's causes with ": "; the replace keeps it on one line even when
            // a server's message carries a newline.
            let message = format!("{error:#}").replace(['\n', '\r'], " ");
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("cannot start the async runtime: {e}"))?;
    let global = cli.global;
    runtime.block_on(async move {
        match cli.command {
            Command::Server(args) => server_cmd::run(args, &global).await,
            Command::Executor(args) => executor_cmd::run(args, &global).await,
            Command::Task(command) => task_cmd::run(command, &global).await,
            Command::Workflow(command) => workflow_cmd::run(command, &global).await,
            Command::Msg(command) => msg_cmd::run(command, &global).await,
            Command::Agent(command) => agent_cmd::run(command, &global).await,
            Command::Cluster(command) => cluster_cmd::run(command, &global).await,
            Command::Model(command) => model_cmd::run(command, &global).await,
            Command::Learner(args) => learner_cmd::run(args, &global).await,
            Command::Acl(command) => acl_cmd::run(command, &global).await,
            Command::Audit(command) => audit_cmd::run(command, &global),
            Command::Dev(args) => dev::run(args, &global).await,
            Command::Bench(command) => bench::run(command, &global).await,
            Command::Chaos(command) => {
                match colony_chaos::run(command, global.output == OutputFormat::Json).await? {
                    true => Ok(()),
                    false => Err(anyhow::anyhow!(
                        "the chaos run found violations (see the report above)"
                    )),
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn global_options_apply_to_subcommands() {
        let cli = Cli::try_parse_from([
            "colony",
            "task",
            "list",
            "--endpoint",
            "a:1,b:2",
            "--output",
            "json",
            "--timeout",
            "3s",
        ]);
        let cli = cli.map_err(|e| e.to_string());
        let Ok(cli) = cli else { panic!("parse failed: {cli:?}") };
        assert_eq!(cli.global.endpoint, vec!["a:1".to_owned(), "b:2".to_owned()]);
        assert_eq!(cli.global.output, OutputFormat::Json);
        assert_eq!(cli.global.timeout, Duration::from_secs(3));
    }

    #[test]
    fn bad_executor_limits_are_usage_errors() {
        let executor = |extra: &[&str]| {
            let base = ["colony", "executor", "--join", "a:1", "--data-dir", "d"];
            Cli::try_parse_from(base.iter().chain(extra)).map(|_| ())
        };
        assert!(executor(&[]).is_ok());
        for bad in [
            &["--task-pids-max", "0"][..],
            &["--task-pids-max", "99999999999"],
            &["--task-pids-max", "-1"],
            &["--require-limits", "maybe"],
        ] {
            assert!(executor(bad).is_err(), "{bad:?}");
        }
        assert!(executor(&["--require-limits=false", "--task-pids-max", "64"]).is_ok());
    }

    #[test]
    fn bad_endpoints_are_usage_errors() {
        for bad in ["nohost", "host:", ":7101", "host:notaport", "a:1,,b:2"] {
            assert!(
                Cli::try_parse_from(["colony", "task", "list", "--endpoint", bad]).is_err(),
                "{bad}"
            );
        }
    }
}
