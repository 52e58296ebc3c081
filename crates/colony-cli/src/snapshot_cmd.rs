//! `colony cluster snapshot`: save a backup from the leader, and inspect a backup file.

use crate::output::{self, OutputFormat};
use crate::GlobalArgs;
use anyhow::{bail, Context as _, Result};
use clap::Subcommand;
use colony_client::{lazy_channel, ClientConfig};
use colony_proto::pb;
use colony_proto::pb::admin_client::AdminClient;
use colony_store::backup::{self, Backup, BACKUP_BYTES_MAX};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Save a consistent backup of the cluster's state, taken on the leader, to FILE (written
    /// atomically, checked before it is kept). It holds the cluster's secrets: keep it as you keep
    /// the data directories.
    Save { file: PathBuf },
    /// Check a backup file and say what it holds.
    Inspect {
        file: PathBuf,
        /// Refuse a backup of any other cluster.
        #[arg(long)]
        expect_cluster_id: Option<String>,
    },
}

/// What a backup holds, for people and scripts.
#[derive(Debug, Serialize)]
pub struct Summary {
    pub file: String,
    pub bytes: u64,
    pub format_version: u8,
    pub cluster_id: String,
    pub written_by_node: u64,
    pub taken_at: String,
    pub log_index: u64,
    pub log_term: u64,
    pub tasks: u64,
    pub tasks_by_state: BTreeMap<String, u64>,
    pub executors: usize,
    pub acl_tokens: usize,
    pub models: usize,
    pub state_sha256: String,
}

impl Summary {
    pub fn of(file: &Path, backup: &Backup) -> Summary {
        let machine = &backup.applied.machine;
        let taken =
            std::time::UNIX_EPOCH + std::time::Duration::from_millis(backup.header.created_unix_ms);
        Summary {
            file: file.display().to_string(),
            bytes: backup.file_bytes,
            format_version: backup.format_version,
            cluster_id: backup.header.cluster_id.clone(),
            written_by_node: backup.header.node_id,
            taken_at: humantime::format_rfc3339_millis(taken).to_string(),
            log_index: backup.header.last_applied.map_or(0, |l| l.index),
            log_term: backup.header.last_applied.map_or(0, |l| l.leader_id.term),
            tasks: machine.task_count() as u64,
            tasks_by_state: machine
                .count_by_state()
                .into_iter()
                .filter(|(_, n)| *n > 0)
                .map(|(state, n)| (state.to_string(), n))
                .collect(),
            executors: machine.executors().count(),
            acl_tokens: machine.acl_tokens().count(),
            models: machine.models().count(),
            state_sha256: hex::encode(backup.header.state_sha256),
        }
    }

    fn print(&self, format: OutputFormat) -> Result<()> {
        match format {
            OutputFormat::Json => output::print_json(self),
            OutputFormat::Table => {
                let by_state: Vec<String> =
                    self.tasks_by_state.iter().map(|(s, n)| format!("{s} {n}")).collect();
                output::print_fields(&[
                    ("file", format!("{} ({} bytes, checksum verified)", self.file, self.bytes)),
                    ("format version", self.format_version.to_string()),
                    ("cluster", self.cluster_id.clone()),
                    ("taken", format!("{} on node {}", self.taken_at, self.written_by_node)),
                    ("log position", format!("index {} (term {})", self.log_index, self.log_term)),
                    ("tasks", format!("{} ({})", self.tasks, by_state.join(", "))),
                    ("executors", self.executors.to_string()),
                    ("ACL tokens", self.acl_tokens.to_string()),
                    ("models", self.models.to_string()),
                    ("state SHA-256", self.state_sha256.clone()),
                ])
            }
        }
    }
}

pub async fn run(command: SnapshotCommand, global: &GlobalArgs) -> Result<()> {
    match command {
        SnapshotCommand::Inspect { file, expect_cluster_id } => {
            let backup = backup::read_file(&file, expect_cluster_id.as_deref())
                .with_context(|| format!("{} is refused", file.display()))?;
            Summary::of(&file, &backup).print(global.output)
        }
        SnapshotCommand::Save { file } => {
            let contents = download(global).await?;
            let backup = backup::decode(&contents).context("the leader sent a damaged backup")?;
            backup::write_atomically(&file, &contents)
                .with_context(|| format!("cannot write {}", file.display()))?;
            Summary::of(&file, &backup).print(global.output)
        }
    }
}

/// The backup file from the leader: asks each endpoint in turn, following a follower's pointer to
/// the leader.
async fn download(global: &GlobalArgs) -> Result<Vec<u8>> {
    let auth = global.auth()?;
    let config = ClientConfig::new(global.timeout);
    let mut failures = Vec::new();
    let mut endpoints: Vec<String> = global.endpoint.clone();
    let mut tried = 0;
    while tried < endpoints.len() && tried < 8 {
        let addr = endpoints[tried].clone();
        tried += 1;
        let mut client = AdminClient::new(lazy_channel(&addr, &config, &auth)?)
            .max_decoding_message_size(2 << 20);
        let call = client.save_snapshot(pb::SaveSnapshotRequest {});
        let mut stream = match tokio::time::timeout(global.timeout, call).await {
            Ok(Ok(response)) => response.into_inner(),
            Ok(Err(status)) => {
                let leader =
                    status.metadata().get(colony_proto::LEADER_ADDR).and_then(|v| v.to_str().ok());
                if let Some(leader) = leader.filter(|l| !endpoints.iter().any(|e| e == l)) {
                    endpoints.insert(tried, leader.to_owned());
                }
                failures.push(format!("{addr}: {}", colony_client::status_message(&status)));
                continue;
            }
            Err(_) => {
                failures.push(format!("{addr}: no answer within {:?}", global.timeout));
                continue;
            }
        };
        let bar = ProgressBar::new_spinner().with_style(
            ProgressStyle::with_template("{spinner} {bytes} from {msg}")
                .context("bad progress template")?,
        );
        bar.set_message(addr.clone());
        let mut contents = Vec::new();
        while let Some(chunk) = stream.message().await.context("the backup stream broke")? {
            contents.extend_from_slice(&chunk.data);
            if contents.len() as u64 > BACKUP_BYTES_MAX {
                bail!("the backup passed {BACKUP_BYTES_MAX} bytes; refused");
            }
            bar.set_position(contents.len() as u64);
        }
        bar.finish_and_clear();
        return Ok(contents);
    }
    bail!("no server gave a backup: {}", failures.join("; "))
}
