//! `--config FILE` for `colony server`, `executor` and `learner`: a TOML file whose top-level keys
//! are the subcommand's long flag names (`data-dir = "/var/lib/colony"`, `data_dir` also works),
//! with the values the flags take (durations and sizes as strings, switches as booleans, a list
//! for a repeatable or comma-separated flag).
//!
//! The file becomes flags before clap parses the command line: each key is checked against the
//! subcommand's flags (an unknown key, a wrong type or a value the flag refuses is an error naming
//! the key and its line), turned into `--flag=value`, and inserted right after the subcommand for
//! every flag the command line and the environment leave unset. So a flag given on the command
//! line (or a `COLONY_TOKEN` in the environment) overrides the file, and clap checks the result as
//! if it had all been typed.

use anyhow::{anyhow, bail, Context as _, Result};
use clap::parser::ValueSource;
use clap::{Arg, ArgAction, ArgMatches, Command};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use toml_edit::{Item, Value};

/// The subcommands that take `--config`.
const SUBCOMMANDS: [&str; 3] = ["server", "executor", "learner"];

/// A config file larger than this is refused before it is read whole.
const CONFIG_BYTES_MAX: u64 = 1024 * 1024;

/// Flags a config file may not set: the file itself, and clap's own.
const NOT_IN_FILES: [&str; 3] = ["config", "help", "version"];

/// `--config`, flattened into the arguments of each subcommand that takes it.
#[derive(Debug, clap::Args)]
pub struct ConfigArg {
    /// Read flags from this TOML file, each key a long flag name (`data-dir = "/var/lib/colony"`);
    /// flags on the command line and COLONY_TOKEN in the environment override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

impl ConfigArg {
    /// Logs where the flags came from, once logging is set up.
    pub fn log(&self) {
        if let Some(path) = &self.config {
            tracing::info!(config = %path.display(), "flags read from a config file");
        }
    }
}

/// `argv` with the settings of the `--config` file (when the subcommand has one) inserted after
/// the subcommand. A command line clap cannot make sense of is returned as it is, for clap to
/// report.
pub fn expand(command: Command, argv: Vec<OsString>) -> Result<Vec<OsString>> {
    let Ok(matches) = command.clone().ignore_errors(true).try_get_matches_from(&argv) else {
        return Ok(argv);
    };
    let Some((name, sub_matches)) = matches.subcommand() else {
        return Ok(argv);
    };
    if !SUBCOMMANDS.contains(&name) {
        return Ok(argv);
    }
    let Some(path) = sub_matches.try_get_one::<PathBuf>("config").ok().flatten() else {
        return Ok(argv);
    };
    let mut command = command;
    command.build();
    let subcommand =
        command.find_subcommand(name).ok_or_else(|| anyhow!("no subcommand {name}"))?;
    let flags = flags_from_file(path, subcommand, sub_matches)?;
    let at = subcommand_position(&command, &argv, name)
        .ok_or_else(|| anyhow!("cannot find `{name}` on the command line"))?;
    let mut expanded = argv[..=at].to_vec();
    expanded.extend(flags);
    expanded.extend_from_slice(&argv[at + 1..]);
    Ok(expanded)
}

/// The flags the file at `path` sets for `subcommand`, leaving out those `given` already has from
/// the command line or the environment.
fn flags_from_file(path: &Path, subcommand: &Command, given: &ArgMatches) -> Result<Vec<OsString>> {
    let shown = path.display();
    let text = read_bounded(path).with_context(|| format!("config file {shown}"))?;
    let document = toml_edit::Document::parse(text.as_str())
        .map_err(|e| anyhow!("config file {shown}: {}", one_line(&e.to_string())))?;
    let mut flags = Vec::new();
    let mut seen: Vec<(String, usize)> = Vec::new();
    for (key, item) in document.as_table().iter() {
        let line = document
            .as_table()
            .key(key)
            .and_then(|k| k.span())
            .map_or(0, |span| line_of(&text, span.start));
        let at = || format!("config file {shown} line {line}");
        let value = match item {
            Item::Value(value) => value,
            _ => bail!("{}: `{key}` is a table; keys are flag names at the top level", at()),
        };
        let long = key.replace('_', "-");
        if let Some((_, first)) = seen.iter().find(|(seen, _)| *seen == long) {
            bail!("{}: `{key}` sets --{long} again (line {first})", at());
        }
        seen.push((long.clone(), line));
        let arg = file_arg(subcommand, &long).ok_or_else(|| {
            anyhow!(
                "{}: unknown key `{key}`: colony {} has no flag --{long}",
                at(),
                subcommand.get_name()
            )
        })?;
        if matches!(
            given.value_source(arg.get_id().as_str()),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        ) {
            continue;
        }
        flags.extend(
            arg_flags(subcommand, arg, &long, value)
                .map_err(|e| anyhow!("{}: `{key}`: {e}", at()))?,
        );
    }
    Ok(flags)
}

/// The flag `--long` of `subcommand`, if a file may set it.
fn file_arg<'a>(subcommand: &'a Command, long: &str) -> Option<&'a Arg> {
    subcommand.get_arguments().find(|arg| {
        arg.get_long() == Some(long)
            && !arg.is_hide_set()
            && !NOT_IN_FILES.contains(&arg.get_id().as_str())
    })
}

/// `value` as `--long=...` flags, each value checked by the flag's own parser.
fn arg_flags(subcommand: &Command, arg: &Arg, long: &str, value: &Value) -> Result<Vec<OsString>> {
    if !arg.get_action().takes_values() {
        return match value.as_bool() {
            Some(true) => Ok(vec![OsString::from(format!("--{long}"))]),
            Some(false) => Ok(Vec::new()),
            None => bail!("--{long} is a switch: give true or false"),
        };
    }
    let values = match value {
        Value::Array(items) if matches!(arg.get_action(), ArgAction::Append) => {
            items.iter().map(scalar).collect::<Result<Vec<_>>>()?
        }
        Value::Array(_) => bail!("--{long} takes one value, not a list"),
        other => vec![scalar(other)?],
    };
    let mut flags = Vec::with_capacity(values.len());
    for value in values {
        // A comma-separated flag (`join = "a:7101,b:7101"`) is checked one part at a time, as clap
        // splits it.
        let parts: Vec<&str> = match arg.get_value_delimiter() {
            Some(delimiter) => value.split(delimiter).collect(),
            None => vec![value.as_str()],
        };
        for part in parts {
            check_value(subcommand, long, part)?;
        }
        flags.push(OsString::from(format!("--{long}={value}")));
    }
    Ok(flags)
}

/// Whether `--long=value` alone is a value `subcommand` takes. What other flags it needs or
/// excludes is clap's to check once the whole command line is put together.
fn check_value(subcommand: &Command, long: &str, value: &str) -> Result<()> {
    let alone = subcommand.clone().mut_args(|arg| arg.required(false));
    let argv = [OsString::from(subcommand.get_name()), OsString::from(format!("--{long}={value}"))];
    match alone.try_get_matches_from(argv) {
        Err(e) if is_value_error(e.kind()) => bail!("{}", clap_message(&e)),
        _ => Ok(()),
    }
}

fn is_value_error(kind: clap::error::ErrorKind) -> bool {
    use clap::error::ErrorKind;
    matches!(kind, ErrorKind::InvalidValue | ErrorKind::ValueValidation | ErrorKind::InvalidUtf8)
}

/// A TOML scalar as the text a flag would be given.
fn scalar(value: &Value) -> Result<String> {
    match value {
        Value::String(s) => Ok(s.value().clone()),
        Value::Integer(i) => Ok(i.value().to_string()),
        Value::Float(f) => Ok(f.value().to_string()),
        Value::Boolean(b) => Ok(b.value().to_string()),
        Value::Datetime(_) => bail!("a date is not a flag value; write it as a string"),
        Value::Array(_) => bail!("a list inside a list is not a flag value"),
        Value::InlineTable(_) => bail!("a table is not a flag value"),
    }
}

/// The position in `argv` of the subcommand `name`, stepping over the global flags before it and
/// their values.
fn subcommand_position(command: &Command, argv: &[OsString], name: &str) -> Option<usize> {
    let mut index = 1;
    while index < argv.len() {
        let token = argv[index].to_string_lossy();
        if token == name {
            return Some(index);
        }
        if let Some(long) = token.strip_prefix("--").filter(|t| !t.contains('=')) {
            let takes_value = command
                .get_arguments()
                .any(|arg| arg.get_long() == Some(long) && arg.get_action().takes_values());
            if takes_value {
                index += 1;
            }
        }
        index += 1;
    }
    None
}

fn read_bounded(path: &Path) -> Result<String> {
    use std::io::Read as _;
    let file = std::fs::File::open(path).context("cannot open it")?;
    let mut text = String::new();
    file.take(CONFIG_BYTES_MAX + 1)
        .read_to_string(&mut text)
        .context("cannot read it as UTF-8 text")?;
    if text.len() as u64 > CONFIG_BYTES_MAX {
        bail!("larger than {CONFIG_BYTES_MAX} bytes");
    }
    Ok(text)
}

fn line_of(text: &str, offset: usize) -> usize {
    text.get(..offset).map_or(0, |before| before.matches('\n').count()) + 1
}

/// clap's message for a refused value without its `error: ` prefix and usage lines.
fn clap_message(error: &clap::Error) -> String {
    let text = error.to_string();
    let first = text.lines().next().unwrap_or_default();
    first.strip_prefix("error: ").unwrap_or(first).to_owned()
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Cli;
    use clap::{CommandFactory, Parser};

    fn file(text: &str) -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().expect("temp file");
        std::fs::write(file.path(), text).expect("write");
        file
    }

    fn expand_args(args: &[&str]) -> Result<Vec<String>> {
        let argv = args.iter().map(OsString::from).collect();
        Ok(expand(Cli::command(), argv)?
            .into_iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect())
    }

    #[test]
    fn keys_become_flags_after_the_subcommand_and_the_command_line_wins() {
        let config = file(
            "data-dir = \"/var/lib/colony\"\nheartbeat_ms = 20\nbootstrap = true\n\
             join = [\"10.0.0.1:7101\", \"10.0.0.2:7101\"]\nexecutor-heartbeat-interval = \"250ms\"\n",
        );
        let path = config.path().to_string_lossy().into_owned();
        let argv = expand_args(&[
            "colony",
            "--timeout",
            "5s",
            "server",
            "--config",
            &path,
            "--heartbeat-ms",
            "40",
        ])
        .expect("expands");
        assert_eq!(
            argv,
            [
                "colony",
                "--timeout",
                "5s",
                "server",
                "--data-dir=/var/lib/colony",
                "--bootstrap",
                "--join=10.0.0.1:7101",
                "--join=10.0.0.2:7101",
                "--executor-heartbeat-interval=250ms",
                "--config",
                &path,
                "--heartbeat-ms",
                "40",
            ]
        );
    }

    #[test]
    fn a_command_line_without_a_config_file_is_left_alone() {
        let argv = ["colony", "task", "list"];
        assert_eq!(expand_args(&argv).expect("expands"), argv);
        let argv = ["colony", "server", "--data-dir", "d"];
        assert_eq!(expand_args(&argv).expect("expands"), argv);
    }

    fn refusal(text: &str, subcommand: &str) -> String {
        let config = file(text);
        let path = config.path().to_string_lossy().into_owned();
        let error = expand_args(&["colony", subcommand, "--config", &path])
            .expect_err("the file is refused");
        format!("{error:#}")
    }

    #[test]
    fn an_unknown_key_is_named_with_its_line() {
        let error = refusal("data-dir = \"d\"\n\n# a comment\ndata-dri = \"d\"\n", "server");
        assert!(error.contains("line 4: unknown key `data-dri`"), "{error}");
        assert!(error.contains("colony server has no flag --data-dri"), "{error}");
        // A flag of another role, and a hidden test-only flag, are unknown too.
        let error = refusal("cpu = \"4\"\n", "server");
        assert!(error.contains("line 1: unknown key `cpu`"), "{error}");
        let error = refusal("unsafe-stale-reads = true\n", "server");
        assert!(error.contains("unknown key `unsafe-stale-reads`"), "{error}");
    }

    #[test]
    fn a_wrong_type_or_value_is_named_with_its_line() {
        let error = refusal("data-dir = \"d\"\nheartbeat-ms = \"fast\"\n", "server");
        assert!(error.contains("line 2: `heartbeat-ms`: invalid value 'fast'"), "{error}");
        let error = refusal("bootstrap = \"yes\"\n", "server");
        assert!(error.contains("line 1: `bootstrap`: --bootstrap is a switch"), "{error}");
        let error = refusal("data-dir = [\"a\", \"b\"]\n", "server");
        assert!(error.contains("takes one value, not a list"), "{error}");
        let error = refusal("join = \"127.0.0.1:7101,nonsense\"\n", "executor");
        assert!(error.contains("line 1: `join`"), "{error}");
        let error = refusal("[server]\ndata-dir = \"d\"\n", "server");
        assert!(error.contains("line 1: `server` is a table"), "{error}");
        let error = refusal("data-dir = \"d\"\ndata_dir = \"e\"\n", "server");
        assert!(error.contains("line 2: `data_dir` sets --data-dir again (line 1)"), "{error}");
        let error = refusal("data-dir = \n", "server");
        assert!(error.contains("line 1"), "a TOML syntax error has its place: {error}");
    }

    #[test]
    fn an_unreadable_file_is_named() {
        let error = expand_args(&["colony", "server", "--config", "/nonexistent/colony.toml"])
            .expect_err("refused");
        let error = format!("{error:#}");
        assert!(error.contains("config file /nonexistent/colony.toml: cannot open it"), "{error}");
    }

    #[test]
    fn the_shipped_example_files_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../cluster/systemd");
        for role in SUBCOMMANDS {
            let path = dir.join(format!("{role}.toml"));
            let path = path.to_string_lossy().into_owned();
            let argv = expand_args(&["colony", role, "--config", &path])
                .unwrap_or_else(|e| panic!("{path}: {e:#}"));
            Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("{path}: {e}"));
        }
    }
}
