//! Who may do what: the built-in roles, the permissions each grants, ACL tokens (only their
//! secrets' hashes) and what a join token admits.
//!
//! Pure data and rules: the admin service authenticates a caller to a [`Grant`] and asks it
//! [`Grant::allows`] before serving anything.

use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

/// The namespace of a task submitted without one.
pub const DEFAULT_NAMESPACE: &str = "default";

/// A built-in role.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Role {
    /// Everything, including ACL tokens; sees task environment values.
    Admin,
    /// The cluster, executors (drain and undrain), models; reads every task.
    Operator,
    /// Submits, reads and cancels tasks in its namespaces.
    Submitter,
    /// Reads tasks in its namespaces, executors, models and the cluster.
    Reader,
    /// Follows finished tasks and publishes models.
    Learner,
    /// Executors speak the executor link, not the admin API: cluster status only.
    Executor,
    /// Another server of this cluster (certificate only, never a token).
    Server,
}

/// The roles a token may name (servers are known by their certificates only).
pub const TOKEN_ROLES: [Role; 6] =
    [Role::Admin, Role::Operator, Role::Submitter, Role::Reader, Role::Learner, Role::Executor];

/// What one admin RPC needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Permission {
    /// Cluster status and identity, the CA certificate: every authenticated caller.
    Status,
    /// Executors, models, state digests.
    ClusterRead,
    /// Membership, join tokens, drain and undrain.
    ClusterWrite,
    /// Join the cluster as a voter (a server, with its own certificate).
    JoinCluster,
    TaskRead,
    TaskSubmit,
    TaskCancel,
    /// The feed of finished tasks, every namespace.
    FeedRead,
    ModelPublish,
    ModelRollback,
    /// Create, list and revoke ACL tokens.
    AclManage,
    /// Take a backup of the whole state, secrets (the CA key) included.
    Backup,
}

impl Permission {
    /// Whether the permission is about tasks, and so limited to the grant's namespaces.
    pub fn namespaced(self) -> bool {
        matches!(self, Permission::TaskRead | Permission::TaskSubmit | Permission::TaskCancel)
    }
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Operator => "operator",
            Role::Submitter => "submitter",
            Role::Reader => "reader",
            Role::Learner => "learner",
            Role::Executor => "executor",
            Role::Server => "server",
        }
    }

    /// Whether the role grants `permission` (in its namespaces, for a namespaced one).
    pub fn grants(self, permission: Permission) -> bool {
        use Permission as P;
        match self {
            Role::Admin => permission != P::JoinCluster,
            Role::Operator => matches!(
                permission,
                P::Status
                    | P::ClusterRead
                    | P::ClusterWrite
                    | P::TaskRead
                    | P::FeedRead
                    | P::ModelPublish
                    | P::ModelRollback
            ),
            Role::Submitter => {
                matches!(permission, P::Status | P::TaskRead | P::TaskSubmit | P::TaskCancel)
            }
            Role::Reader => matches!(permission, P::Status | P::ClusterRead | P::TaskRead),
            Role::Learner => {
                matches!(permission, P::Status | P::ClusterRead | P::FeedRead | P::ModelPublish)
            }
            Role::Executor => permission == P::Status,
            Role::Server => matches!(permission, P::Status | P::ClusterRead | P::JoinCluster),
        }
    }

    /// Whether the role sees the values of task environments (others see the keys only).
    pub fn sees_secrets(self) -> bool {
        self == Role::Admin
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("unknown role {0:?}: one of admin, operator, submitter, reader, learner, executor")]
pub struct UnknownRole(pub String);

impl FromStr for Role {
    type Err = UnknownRole;

    fn from_str(s: &str) -> Result<Role, UnknownRole> {
        TOKEN_ROLES.into_iter().find(|r| r.as_str() == s).ok_or_else(|| UnknownRole(s.to_owned()))
    }
}

/// A role and the namespaces it covers (`None`: every namespace).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    pub role: Role,
    pub namespaces: Option<BTreeSet<String>>,
}

impl Grant {
    pub fn everywhere(role: Role) -> Grant {
        Grant { role, namespaces: None }
    }

    /// Whether the grant allows `permission`; for a namespaced permission, in `namespace`
    /// (`None` asks for every namespace, as an unfiltered listing does).
    pub fn allows(&self, permission: Permission, namespace: Option<&str>) -> bool {
        if !self.role.grants(permission) {
            return false;
        }
        if !permission.namespaced() {
            return true;
        }
        match (&self.namespaces, namespace) {
            (None, _) => true,
            (Some(covered), Some(namespace)) => covered.contains(namespace),
            (Some(_), None) => false,
        }
    }

    /// Whether a task in `namespace` is visible to this grant's reads.
    pub fn covers(&self, namespace: &str) -> bool {
        self.namespaces.as_ref().is_none_or(|covered| covered.contains(namespace))
    }
}

/// An ACL token as the cluster keeps it: the secret's SHA-256, never the secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AclToken {
    /// Public, random: what lists, audit lines and revocations name.
    pub accessor: String,
    pub secret_hash: [u8; 32],
    pub grant: Grant,
    pub description: String,
    pub created_unix_ms: u64,
    /// `None`: never expires (the bootstrap token).
    pub expires_unix_ms: Option<u64>,
}

impl AclToken {
    pub fn live_at(&self, now_unix_ms: u64) -> bool {
        self.expires_unix_ms.is_none_or(|expires| expires > now_unix_ms)
    }
}

/// What a join token admits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum JoinKind {
    Executor,
    Server,
    Learner,
}

impl JoinKind {
    pub fn as_str(self) -> &'static str {
        match self {
            JoinKind::Executor => "executor",
            JoinKind::Server => "server",
            JoinKind::Learner => "learner",
        }
    }
}

impl fmt::Display for JoinKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JoinKind {
    type Err = String;

    fn from_str(s: &str) -> Result<JoinKind, String> {
        [JoinKind::Executor, JoinKind::Server, JoinKind::Learner]
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| {
                format!("unknown join token kind {s:?}: one of executor, server, learner")
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scoped(role: Role, namespaces: &[&str]) -> Grant {
        Grant { role, namespaces: Some(namespaces.iter().map(|n| n.to_string()).collect()) }
    }

    #[test]
    fn each_role_grants_what_it_says() {
        use Permission as P;
        let all = [
            P::Status,
            P::ClusterRead,
            P::ClusterWrite,
            P::JoinCluster,
            P::TaskRead,
            P::TaskSubmit,
            P::TaskCancel,
            P::FeedRead,
            P::ModelPublish,
            P::ModelRollback,
            P::AclManage,
        ];
        let granted =
            |role: Role| all.iter().copied().filter(|p| role.grants(*p)).collect::<Vec<_>>();
        assert_eq!(granted(Role::Admin).len(), all.len() - 1);
        assert!(!Role::Operator.grants(P::TaskSubmit) && !Role::Operator.grants(P::AclManage));
        assert!(Role::Operator.grants(P::ClusterWrite) && Role::Operator.grants(P::ModelRollback));
        assert_eq!(
            granted(Role::Submitter),
            vec![P::Status, P::TaskRead, P::TaskSubmit, P::TaskCancel]
        );
        assert_eq!(granted(Role::Reader), vec![P::Status, P::ClusterRead, P::TaskRead]);
        assert!(!Role::Learner.grants(P::ModelRollback) && Role::Learner.grants(P::FeedRead));
        assert_eq!(granted(Role::Executor), vec![P::Status]);
        assert!(Role::Server.grants(P::JoinCluster) && !Role::Server.grants(P::TaskSubmit));
        assert!(Role::Admin.sees_secrets() && !Role::Operator.sees_secrets());
    }

    #[test]
    fn namespaces_limit_task_permissions_only() {
        let research = scoped(Role::Submitter, &["research"]);
        assert!(research.allows(Permission::TaskSubmit, Some("research")));
        assert!(!research.allows(Permission::TaskSubmit, Some("default")));
        assert!(!research.allows(Permission::TaskRead, None), "an unfiltered read is refused");
        assert!(research.allows(Permission::Status, None));
        assert!(research.covers("research") && !research.covers("prod"));
        let everywhere = Grant::everywhere(Role::Reader);
        assert!(everywhere.allows(Permission::TaskRead, None));
        assert!(!everywhere.allows(Permission::TaskSubmit, Some("default")));
    }

    #[test]
    fn roles_and_kinds_parse_and_bad_names_are_refused() {
        for role in TOKEN_ROLES {
            assert_eq!(role.as_str().parse::<Role>(), Ok(role));
        }
        assert!("server".parse::<Role>().is_err(), "servers hold certificates, not tokens");
        assert!("root".parse::<Role>().is_err());
        assert_eq!("server".parse::<JoinKind>(), Ok(JoinKind::Server));
        assert!("admin".parse::<JoinKind>().is_err());
    }

    #[test]
    fn tokens_expire() {
        let token = AclToken {
            accessor: "a".into(),
            secret_hash: [0; 32],
            grant: Grant::everywhere(Role::Reader),
            description: String::new(),
            created_unix_ms: 1,
            expires_unix_ms: Some(10),
        };
        assert!(token.live_at(9) && !token.live_at(10));
        assert!(AclToken { expires_unix_ms: None, ..token }.live_at(u64::MAX));
    }
}
