//! Whether a registered executor's `Hello` is accepted, and whether it must be registered again.

use crate::executor::{ExecutorSpec, ExecutorState};
use crate::ids::ExecutorId;
use crate::state_machine::{Command, StateMachine};
use crate::task::SpecError;

/// What the leader does with a `Hello` it accepts.
#[derive(Clone, Debug, PartialEq)]
// Built once per connection and consumed at once: boxing the command would only add an allocation.
#[allow(clippy::large_enum_variant)]
pub enum Hello {
    /// Already up with this very spec: nothing to commit.
    AlreadyUp,
    /// Commit this registration before the session starts.
    Register(Command),
}

/// Why a `Hello` is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HelloRefusal {
    /// Final: the cluster does not know this executor (removed, or from another cluster).
    #[error("executor {0} is unknown to this cluster")]
    UnknownExecutor(ExecutorId),
    /// The peer's fault: its certificate belongs to another executor.
    #[error("the certificate presented is not executor {0}'s")]
    WrongCertificate(ExecutorId),
    /// Final until the executor's configuration changes.
    #[error("invalid registration: {0}")]
    InvalidSpec(#[from] SpecError),
}

/// Checks a `Hello` from `id`, presented with a certificate whose fingerprint is `fingerprint`,
/// offering `spec`.
pub fn check_hello(
    state: &StateMachine,
    id: ExecutorId,
    fingerprint: &[u8; 32],
    spec: ExecutorSpec,
) -> Result<Hello, HelloRefusal> {
    let executor = state.get_executor(id).ok_or(HelloRefusal::UnknownExecutor(id))?;
    if &executor.cert_fingerprint != fingerprint {
        return Err(HelloRefusal::WrongCertificate(id));
    }
    spec.validate(state.limits())?;
    if executor.state == ExecutorState::Up && executor.spec == spec {
        return Ok(Hello::AlreadyUp);
    }
    Ok(Hello::Register(Command::RegisterExecutor { id, spec }))
}
