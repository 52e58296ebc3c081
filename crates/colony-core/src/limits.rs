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
        }
    }
}
