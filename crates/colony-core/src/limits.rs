//! Limits on everything a request can carry, each a named field so operators can see and tune them.

use serde::{Deserialize, Serialize};

/// Bounds on the size of what enters the state machine.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    pub name_bytes_max: usize,
    pub label_value_bytes_max: usize,
    pub labels_max: usize,
    pub custom_resources_max: usize,
    pub dependencies_max: usize,
    pub args_max: usize,
    pub arg_bytes_max: usize,
    pub env_max: usize,
    pub retries_max: u32,
    /// All of a spec's strings together: the per-field limits alone would allow megabytes.
    pub spec_bytes_max: usize,
    /// Commands carried by one Raft entry.
    pub batch_commands_max: usize,
    /// Placements carried by one scheduling command.
    pub placements_max: usize,
    /// Each of stdout and stderr kept with a task.
    pub output_tail_bytes_max: usize,
    /// A report's or a reason's free-text message.
    pub message_bytes_max: usize,
    /// Join tokens alive at once (expired ones are pruned when a new one is created).
    pub join_tokens_max: usize,
    /// ACL tokens alive at once (expired ones are pruned when a new one is created).
    pub acl_tokens_max: usize,
    /// An ACL token's description.
    pub description_bytes_max: usize,
    pub executors_max: usize,
    /// A certificate authority's PEM text.
    pub pem_bytes_max: usize,
    /// The first retry waits this long; each later one twice as long, up to the maximum.
    pub retry_backoff_ms_base: u64,
    pub retry_backoff_ms_max: u64,
    /// The least memory a `memory_auto` task is given, whatever the model predicts.
    pub memory_auto_floor_bytes: u64,
    /// Model versions kept in the registry; the oldest non-current one goes first.
    pub models_kept_max: usize,
    pub model_weights_bytes_max: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            name_bytes_max: 253,
            label_value_bytes_max: 1024,
            labels_max: 64,
            custom_resources_max: 32,
            dependencies_max: 1024,
            args_max: 1024,
            arg_bytes_max: 8192,
            env_max: 256,
            retries_max: 100,
            spec_bytes_max: 64 << 10,
            batch_commands_max: 4096,
            placements_max: 8192,
            output_tail_bytes_max: 4096,
            message_bytes_max: 4096,
            join_tokens_max: 1024,
            acl_tokens_max: 4096,
            description_bytes_max: 256,
            executors_max: 10_000,
            pem_bytes_max: 16 << 10,
            retry_backoff_ms_base: 250,
            retry_backoff_ms_max: 30_000,
            memory_auto_floor_bytes: 64 << 20,
            models_kept_max: 32,
            model_weights_bytes_max: 4 << 20,
        }
    }
}
