//! `colony audit`: the audit trail a server writes in `DATA_DIR/audit/`, read from the files (the
//! trail is the server's local record; reading it needs access to the data directory, not a
//! token).

use crate::output::{self, OutputFormat};
use crate::GlobalArgs;
use anyhow::{Context, Result};
use clap::Subcommand;
use colony_server::audit::{trail_files, Record};
use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::Duration;

const FOLLOW_POLL: Duration = Duration::from_millis(250);

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// The last requests a server served, oldest first; `--follow` keeps printing new ones
    ///
    ///   colony audit tail --data-dir d1 -n 20
    ///   colony audit tail --data-dir d1 --follow --output json
    #[command(verbatim_doc_comment)]
    Tail {
        /// The server's data directory.
        #[arg(long)]
        data_dir: PathBuf,
        /// How many of the latest records to print first.
        #[arg(short = 'n', long, default_value_t = 20)]
        lines: usize,
        /// Keep printing records as the server writes them, until Ctrl-C.
        #[arg(long)]
        follow: bool,
    },
}

pub fn run(command: AuditCommand, global: &GlobalArgs) -> Result<()> {
    let AuditCommand::Tail { data_dir, lines, follow } = command;
    let files = trail_files(&data_dir)
        .with_context(|| format!("cannot read the audit trail in {}", data_dir.display()))?;
    let mut records = Vec::new();
    // Newest file last: read backwards through files until enough lines are found.
    for file in files.iter().rev() {
        let mut lines_here = read_lines(file)?;
        lines_here.append(&mut records);
        records = lines_here;
        if records.len() >= lines {
            break;
        }
    }
    let skip = records.len().saturating_sub(lines);
    print(&records[skip..], global.output, true)?;
    if follow {
        follow_current(
            &data_dir.join(colony_server::audit::DIR).join(colony_server::audit::CURRENT),
            global.output,
        )?;
    }
    Ok(())
}

fn read_lines(path: &Path) -> Result<Vec<String>> {
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut lines = Vec::new();
    for line in BufReader::new(file).lines() {
        let line = line.with_context(|| format!("cannot read {}", path.display()))?;
        if !line.trim().is_empty() {
            lines.push(line);
        }
    }
    Ok(lines)
}

/// Prints new lines of the current file as they appear; starts over when it is rotated.
fn follow_current(path: &Path, format: OutputFormat) -> Result<()> {
    let mut offset = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    loop {
        std::thread::sleep(FOLLOW_POLL);
        let len = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        if len < offset {
            offset = 0;
        }
        if len == offset {
            continue;
        }
        let mut file = std::fs::File::open(path)?;
        file.seek(SeekFrom::Start(offset))?;
        let mut reader = BufReader::new(file);
        let mut fresh = Vec::new();
        let mut line = String::new();
        while reader.read_line(&mut line)? > 0 {
            // A line not yet finished is read again next time.
            if !line.ends_with('\n') {
                break;
            }
            offset += line.len() as u64;
            fresh.push(line.trim_end().to_owned());
            line.clear();
        }
        print(&fresh, format, false)?;
    }
}

fn print(lines: &[String], format: OutputFormat, header: bool) -> Result<()> {
    match format {
        OutputFormat::Json => {
            for line in lines {
                output::out(line)?;
            }
            Ok(())
        }
        OutputFormat::Table => {
            let mut table = output::table([
                "TIME",
                "RPC",
                "OUTCOME",
                "WHO",
                "ROLE",
                "NAMESPACE",
                "TARGET",
                "SOURCE",
            ]);
            for line in lines {
                let Ok(r) = serde_json::from_str::<Record>(line) else {
                    table.add_row(vec![
                        "(unreadable line)".to_owned(),
                        line.chars().take(60).collect(),
                    ]);
                    continue;
                };
                let who = r
                    .accessor
                    .clone()
                    .or(r.certificate.clone())
                    .unwrap_or_else(|| "anonymous".to_owned());
                let outcome = match &r.code {
                    Some(code) => format!("{} {code}", r.outcome),
                    None => r.outcome.clone(),
                };
                table.add_row(vec![
                    r.time,
                    r.rpc,
                    outcome,
                    who,
                    r.role.unwrap_or_else(|| "-".to_owned()),
                    r.namespace.unwrap_or_else(|| "-".to_owned()),
                    r.target.unwrap_or_else(|| "-".to_owned()),
                    r.source.unwrap_or_else(|| "-".to_owned()),
                ]);
            }
            if header || !lines.is_empty() {
                output::print_table(table)?;
            }
            Ok(())
        }
    }
}
