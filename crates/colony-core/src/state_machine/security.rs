//! The cluster's trust: the CA record, join tokens and ACL tokens (only their secrets' hashes),
//! and the admission of an executor that presented a join token.

use super::{check_text, StateMachine};
use super::{CommandError, Outcome};
use crate::acl::{AclToken, JoinKind, Role};
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
        kind: JoinKind,
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
        self.join_tokens = self
            .join_tokens
            .iter()
            .filter(|(_, t)| t.expires_unix_ms > now)
            .map(|(k, t)| (*k, t.clone()))
            .collect();
        self.join_tokens
            .insert(secret_hash, JoinTokenRecord { kind, created_unix_ms: now, expires_unix_ms });
        Ok(Outcome::TokenCreated)
    }

    /// Whether a join token's secret hash names a live token that admits `kind`.
    pub fn join_token_valid(&self, secret_hash: &[u8; 32], kind: JoinKind) -> bool {
        self.join_tokens
            .get(secret_hash)
            .is_some_and(|t| t.kind == kind && t.expires_unix_ms > self.now_unix_ms)
    }

    pub(super) fn bootstrap_acl(&mut self, token: &AclToken) -> Result<Outcome, CommandError> {
        if self.acl_bootstrapped {
            return Err(CommandError::AclAlreadyBootstrapped);
        }
        if token.grant.role != Role::Admin || token.grant.namespaces.is_some() {
            return Err(CommandError::InvalidSpec(
                "the bootstrap token is an admin token for every namespace".to_owned(),
            ));
        }
        self.insert_acl_token(token)?;
        self.acl_bootstrapped = true;
        Ok(Outcome::AclBootstrapped)
    }

    pub(super) fn create_acl_token(&mut self, token: &AclToken) -> Result<Outcome, CommandError> {
        self.insert_acl_token(token)?;
        Ok(Outcome::AclTokenCreated)
    }

    pub(super) fn revoke_acl_token(&mut self, accessor: &str) -> Result<Outcome, CommandError> {
        let token = self
            .acl_tokens
            .remove(accessor)
            .ok_or_else(|| CommandError::UnknownAccessor(accessor.to_owned()))?;
        self.acl_by_secret.remove(&token.secret_hash);
        Ok(Outcome::AclTokenRevoked)
    }

    /// Checks and stores a token, pruning expired ones first so the bound counts live tokens.
    fn insert_acl_token(&mut self, token: &AclToken) -> Result<(), CommandError> {
        let now = self.now_unix_ms;
        check_text("accessor", &token.accessor, self.limits.name_bytes_max)?;
        check_text("description", &token.description, self.limits.description_bytes_max)?;
        if token.accessor.is_empty() || token.grant.role == Role::Server {
            return Err(CommandError::InvalidSpec(
                "a token needs an accessor and a role other than server".to_owned(),
            ));
        }
        if let Some(namespaces) = &token.grant.namespaces {
            if namespaces.is_empty() || namespaces.len() > self.limits.labels_max {
                return Err(CommandError::InvalidSpec(format!(
                    "a token covers 1 to {} namespaces, or all",
                    self.limits.labels_max
                )));
            }
            for namespace in namespaces {
                crate::task::check_name("namespace", namespace, self.limits.name_bytes_max)?;
            }
        }
        if let Some(expires) = token.expires_unix_ms.filter(|&e| e <= now) {
            return Err(CommandError::DeadlinePassed {
                deadline_unix_ms: expires,
                now_unix_ms: now,
            });
        }
        if self.acl_tokens.contains_key(&token.accessor)
            || self.acl_by_secret.contains_key(&token.secret_hash)
        {
            return Err(CommandError::AclTokenExists);
        }
        let expired: Vec<(String, [u8; 32])> = self
            .acl_tokens
            .values()
            .filter(|t| !t.live_at(now))
            .map(|t| (t.accessor.clone(), t.secret_hash))
            .collect();
        if self.acl_tokens.len() - expired.len() >= self.limits.acl_tokens_max {
            return Err(CommandError::TooMany {
                what: "ACL tokens".to_owned(),
                max: self.limits.acl_tokens_max,
            });
        }
        for (accessor, secret_hash) in expired {
            self.acl_tokens.remove(&accessor);
            self.acl_by_secret.remove(&secret_hash);
        }
        self.acl_by_secret.insert(token.secret_hash, token.accessor.clone());
        self.acl_tokens.insert(token.accessor.clone(), token.clone());
        Ok(())
    }

    /// The ACL token whose secret hashes to `secret_hash`, live or not.
    pub fn acl_token_by_secret(&self, secret_hash: &[u8; 32]) -> Option<&AclToken> {
        self.acl_by_secret.get(secret_hash).and_then(|accessor| self.acl_tokens.get(accessor))
    }

    pub fn acl_token(&self, accessor: &str) -> Option<&AclToken> {
        self.acl_tokens.get(accessor)
    }

    pub fn acl_tokens(&self) -> impl Iterator<Item = &AclToken> {
        self.acl_tokens.values()
    }

    pub fn acl_bootstrapped(&self) -> bool {
        self.acl_bootstrapped
    }

    pub(super) fn admit_executor(
        &mut self,
        secret_hash: &[u8; 32],
        expected_id: ExecutorId,
        name: &str,
        cert_fingerprint: [u8; 32],
    ) -> Result<Outcome, CommandError> {
        if !self.join_token_valid(secret_hash, JoinKind::Executor) {
            return Err(CommandError::InvalidJoinToken { kind: JoinKind::Executor });
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
