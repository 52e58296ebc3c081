//! The cluster's trust: the CA record, join tokens (only their secrets' hashes) and the admission
//! of an executor that presented one.

use super::{check_text, StateMachine};
use super::{CommandError, Outcome};
use crate::executor::{ClusterCaRecord, Executor, ExecutorSpec, ExecutorState, JoinTokenRecord};
use crate::ids::ExecutorId;
use std::collections::{BTreeMap, BTreeSet};

impl StateMachine {
    pub(super) fn init_ca(&mut self, ca: &ClusterCaRecord) -> Result<Outcome, CommandError> {
        if self.ca.is_some() {
            return Err(CommandError::CaExists);
        }
        check_text("CA certificate", &ca.cert_pem, self.limits.pem_bytes_max)?;
        check_text("CA key", &ca.key_pem, self.limits.pem_bytes_max)?;
        self.ca = Some(ca.clone());
        Ok(Outcome::CaInitialized)
    }

    pub(super) fn create_join_token(
        &mut self,
        secret_hash: [u8; 32],
        expires_unix_ms: u64,
    ) -> Result<Outcome, CommandError> {
        let now = self.now_unix_ms;
        if expires_unix_ms <= now {
            return Err(CommandError::DeadlinePassed {
                deadline_unix_ms: expires_unix_ms,
                now_unix_ms: now,
            });
        }
        let live = self.join_tokens.values().filter(|t| t.expires_unix_ms > now).count();
        if live >= self.limits.join_tokens_max {
            return Err(CommandError::TooMany {
                what: "join tokens".to_owned(),
                max: self.limits.join_tokens_max,
            });
        }
        self.join_tokens.retain(|_, t| t.expires_unix_ms > now);
        self.join_tokens
            .insert(secret_hash, JoinTokenRecord { created_unix_ms: now, expires_unix_ms });
        Ok(Outcome::TokenCreated)
    }

    /// Whether a join token's secret hash names a live token.
    pub fn join_token_valid(&self, secret_hash: &[u8; 32]) -> bool {
        self.join_tokens.get(secret_hash).is_some_and(|t| t.expires_unix_ms > self.now_unix_ms)
    }

    pub(super) fn admit_executor(
        &mut self,
        secret_hash: &[u8; 32],
        expected_id: ExecutorId,
        name: &str,
        cert_fingerprint: [u8; 32],
    ) -> Result<Outcome, CommandError> {
        if !self.join_token_valid(secret_hash) {
            return Err(CommandError::InvalidJoinToken);
        }
        crate::task::check_name("executor name", name, self.limits.name_bytes_max)?;
        if self.executors.len() >= self.limits.executors_max {
            return Err(CommandError::TooMany {
                what: "executors".to_owned(),
                max: self.limits.executors_max,
            });
        }
        if expected_id.0 != self.next_executor_id {
            return Err(CommandError::AdmissionRaced { expected: expected_id });
        }
        let now = self.now_unix_ms;
        self.next_executor_id += 1;
        let spec = ExecutorSpec {
            name: name.to_owned(),
            capacity: Default::default(),
            labels: BTreeMap::new(),
            capabilities: BTreeSet::new(),
        };
        let executor = Executor {
            id: expected_id,
            spec,
            cert_fingerprint,
            state: ExecutorState::Admitted,
            allocated: Default::default(),
            tasks: BTreeSet::new(),
            drain_deadline_unix_ms: None,
            admitted_unix_ms: now,
            updated_unix_ms: now,
            reason: None,
        };
        self.executors.insert(expected_id, executor);
        Ok(Outcome::Admitted { id: expected_id })
    }
}
