//! Identifier newtypes: a task id is never confused with a node id or a token.

use serde::{Deserialize, Serialize};
use std::fmt;

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub u64);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}", self.0)
            }
        }
    };
}

id_type!(
    /// A task, numbered by the state machine in submission order starting at 1.
    TaskId
);
id_type!(
    /// A Colony server (a Raft member).
    NodeId
);
id_type!(
    /// An executor registered with the cluster.
    ExecutorId
);
id_type!(
    /// A task assignment's fencing token: it only grows, and a report carrying an old one is rejected.
    FencingToken
);
id_type!(
    /// A version of the learner's model in the registry.
    ModelVersion
);
id_type!(
    /// A workflow, numbered by the state machine in submission order starting at 1.
    WorkflowId
);
