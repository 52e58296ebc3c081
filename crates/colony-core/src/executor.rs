//! Executors as the cluster records them: what each offers, what it holds, and whether it may
//! receive work. Liveness itself is not replicated (the leader tracks heartbeats in memory);
//! only the transition to `down` is.

use crate::ids::{ExecutorId, TaskId};
use crate::limits::Limits;
use crate::resources::Resources;
use crate::task::SpecError;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// What an executor says about itself when it connects.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecutorSpec {
    pub name: String,
    pub capacity: Resources,
    pub labels: BTreeMap<String, String>,
    pub capabilities: BTreeSet<String>,
}

impl ExecutorSpec {
    pub fn validate(&self, limits: &Limits) -> Result<(), SpecError> {
        crate::task::check_name("executor name", &self.name, limits.name_bytes_max)?;
        crate::task::check_count("labels", self.labels.len(), limits.labels_max)?;
        for (key, value) in &self.labels {
            crate::task::check_name("label key", key, limits.name_bytes_max)?;
            crate::task::check_len("label value", value, limits.label_value_bytes_max)?;
        }
        crate::task::check_count("capabilities", self.capabilities.len(), limits.labels_max)?;
        for capability in &self.capabilities {
            crate::task::check_name("capability", capability, limits.name_bytes_max)?;
        }
        crate::task::check_count(
            "custom resources",
            self.capacity.custom.len(),
            limits.custom_resources_max,
        )?;
        for name in self.capacity.custom.keys() {
            crate::task::check_name("custom resource name", name, limits.name_bytes_max)?;
        }
        Ok(())
    }
}

/// Whether an executor may receive work.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExecutorState {
    /// Admitted with a join token but never connected.
    Admitted,
    Up,
    /// Takes no new work; what it runs finishes or is stopped at the drain deadline.
    Draining,
    /// Declared dead by the leader's failure detector; its tasks were rescheduled.
    Down,
}

impl ExecutorState {
    pub const ALL: [ExecutorState; 4] =
        [ExecutorState::Admitted, ExecutorState::Up, ExecutorState::Draining, ExecutorState::Down];

    pub fn as_str(self) -> &'static str {
        match self {
            ExecutorState::Admitted => "admitted",
            ExecutorState::Up => "up",
            ExecutorState::Draining => "draining",
            ExecutorState::Down => "down",
        }
    }
}

impl fmt::Display for ExecutorState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The replicated record of one executor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Executor {
    pub id: ExecutorId,
    pub spec: ExecutorSpec,
    /// SHA-256 of the client certificate the cluster issued it; a connection must present it.
    pub cert_fingerprint: [u8; 32],
    pub state: ExecutorState,
    /// The sum of the resources of `tasks`; never more than `spec.capacity`.
    pub allocated: Resources,
    /// Tasks assigned to it or running on it.
    pub tasks: BTreeSet<TaskId>,
    pub drain_deadline_unix_ms: Option<u64>,
    pub admitted_unix_ms: u64,
    pub updated_unix_ms: u64,
    /// Why it is in its state (why it went down, who drained it).
    pub reason: Option<String>,
}

impl Executor {
    /// What it can still take.
    pub fn free(&self) -> Resources {
        self.spec.capacity.minus(&self.allocated)
    }
}

/// A join token as the cluster stores it: only the hash of its secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinTokenRecord {
    pub kind: crate::acl::JoinKind,
    pub created_unix_ms: u64,
    pub expires_unix_ms: u64,
}

/// The cluster certificate authority: created by the bootstrap server, replicated so that any
/// leader can sign executor certificates.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterCaRecord {
    pub cert_pem: String,
    pub key_pem: String,
}
