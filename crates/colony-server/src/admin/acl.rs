//! ACL tokens (bootstrap, create, list, revoke), enrollment of servers and the learner, and the
//! CA certificate for clients.

use super::auth::Caller;
use super::AdminService;
use colony_core::{AclToken, Command, Grant, JoinKind, Role};
use colony_proto::pb;
use colony_quic::{CertRole, ClusterCa, Token};
use std::collections::BTreeSet;
use std::time::Duration;
use tonic::Status;

/// ACL tokens live at most this long when they expire at all.
const ACL_TOKEN_TTL_MAX: Duration = Duration::from_secs(366 * 24 * 3600);
const ADDR_BYTES_MAX: usize = 255;

impl AdminService {
    pub(super) async fn bootstrap_acl_here(
        &self,
        _caller: Caller,
        _request: pb::BootstrapAclRequest,
    ) -> Result<pb::BootstrapAclResponse, Status> {
        if self.node.state().machine.acl_bootstrapped() {
            return Err(Status::failed_precondition(
                "ACLs are already bootstrapped: ask an admin for a token",
            ));
        }
        let (token, record) = self.new_token(
            Grant::everywhere(Role::Admin),
            "bootstrap management token".to_owned(),
            None,
        );
        self.propose(Command::BootstrapAcl(record.clone())).await?;
        tracing::info!(accessor = %record.accessor, "ACLs bootstrapped");
        Ok(pb::BootstrapAclResponse {
            token: Some(token_to_proto(&record)),
            secret: token.to_string(),
        })
    }

    pub(super) async fn create_acl_token_here(
        &self,
        _caller: Caller,
        request: pb::CreateAclTokenRequest,
    ) -> Result<pb::CreateAclTokenResponse, Status> {
        let role: Role = request
            .role
            .parse()
            .map_err(|e: colony_core::acl::UnknownRole| Status::invalid_argument(e.to_string()))?;
        let namespaces = match request.namespaces.is_empty() {
            true => None,
            false => Some(request.namespaces.into_iter().collect::<BTreeSet<String>>()),
        };
        let ttl = Duration::from_millis(request.ttl_ms);
        if ttl > ACL_TOKEN_TTL_MAX {
            return Err(Status::invalid_argument(format!(
                "ttl may be at most {} days (0: never expires)",
                ACL_TOKEN_TTL_MAX.as_secs() / 86_400
            )));
        }
        let expires = (!ttl.is_zero())
            .then(|| colony_process::unix_ms().saturating_add(ttl.as_millis() as u64));
        let (token, record) =
            self.new_token(Grant { role, namespaces }, request.description, expires);
        self.propose(Command::CreateAclToken(record.clone())).await?;
        Ok(pb::CreateAclTokenResponse {
            token: Some(token_to_proto(&record)),
            secret: token.to_string(),
        })
    }

    pub(super) async fn list_acl_tokens_here(
        &self,
        _caller: Caller,
        _request: pb::ListAclTokensRequest,
    ) -> Result<pb::ListAclTokensResponse, Status> {
        let state = self.node.state();
        Ok(pb::ListAclTokensResponse {
            tokens: state.machine.acl_tokens().map(token_to_proto).collect(),
        })
    }

    pub(super) async fn revoke_acl_token_here(
        &self,
        _caller: Caller,
        request: pb::RevokeAclTokenRequest,
    ) -> Result<pb::RevokeAclTokenResponse, Status> {
        self.propose(Command::RevokeAclToken { accessor: request.accessor.clone() }).await?;
        tracing::info!(accessor = %request.accessor, "ACL token revoked");
        Ok(pb::RevokeAclTokenResponse {})
    }

    /// Signs a server's or the learner's CSR for the holder of a live join token of that kind.
    pub(super) async fn enroll_here(
        &self,
        _caller: Caller,
        request: pb::EnrollRequest,
    ) -> Result<pb::EnrollResponse, Status> {
        let token: Token = request
            .token
            .parse()
            .map_err(|e| Status::unauthenticated(format!("malformed join token: {e}")))?;
        if token.ca_fingerprint != self.node.ca_fingerprint() {
            return Err(Status::unauthenticated("the join token belongs to another cluster"));
        }
        let kind = if request.node_id == 0 { JoinKind::Learner } else { JoinKind::Server };
        let (record, members) = {
            let state = self.node.state();
            if request.csr_pem.len() > state.machine.limits().pem_bytes_max {
                return Err(Status::invalid_argument("the CSR is too large"));
            }
            if !state.machine.join_token_valid(&token.secret_hash(), kind) {
                return Err(Status::permission_denied(format!(
                    "the join token is unknown, has expired, or does not admit a {kind}"
                )));
            }
            let record = state.machine.ca().cloned().ok_or_else(|| {
                Status::unavailable("the cluster CA is not replicated yet; retry")
            })?;
            (record, self.members())
        };
        let ca = ClusterCa::from_pem(&record.cert_pem, &record.key_pem)
            .map_err(|e| Status::internal(format!("cluster CA: {e}")))?;
        let (role, hosts) = match kind {
            JoinKind::Server => {
                self.check_new_member(request.node_id, &request.addr, &members)?;
                (
                    CertRole::Server(request.node_id),
                    vec![crate::join::host_of(&request.addr).to_owned()],
                )
            }
            _ => (CertRole::Learner(u64::from(rand::random::<u32>())), Vec::new()),
        };
        let cert_pem = ca
            .sign_csr(&request.csr_pem, role, &hosts)
            .map_err(|e| Status::invalid_argument(format!("cannot sign the CSR: {e}")))?;
        tracing::info!(holder = %role, "enrolled");
        Ok(pb::EnrollResponse {
            cert_pem,
            ca_pem: ca.cert_pem().to_owned(),
            cluster_id: self.node.cluster_id().to_owned(),
            members: members.into_iter().collect(),
        })
    }

    pub(super) async fn cluster_ca_here(
        &self,
        _caller: Caller,
        _request: pb::ClusterCaRequest,
    ) -> Result<pb::ClusterCaResponse, Status> {
        Ok(pb::ClusterCaResponse {
            cert_pem: self.node.ca_pem().to_owned(),
            sha256: hex::encode(self.node.ca_fingerprint()),
        })
    }

    /// A token with a fresh secret and accessor for `grant`, and the record the cluster keeps.
    fn new_token(
        &self,
        grant: Grant,
        description: String,
        expires_unix_ms: Option<u64>,
    ) -> (Token, AclToken) {
        let token = Token::generate_for(self.node.ca_fingerprint());
        let record = AclToken {
            accessor: uuid::Uuid::new_v4().simple().to_string(),
            secret_hash: token.secret_hash(),
            grant,
            description,
            created_unix_ms: colony_process::unix_ms(),
            expires_unix_ms,
        };
        (token, record)
    }

    fn members(&self) -> Vec<(u64, String)> {
        let metrics = self.raft_metrics();
        let membership = metrics.membership_config.membership();
        membership.nodes().map(|(&id, node)| (id, node.addr.clone())).collect()
    }

    /// Refuses a new server whose id or address another member already has.
    pub(super) fn check_new_member(
        &self,
        id: u64,
        addr: &str,
        members: &[(u64, String)],
    ) -> Result<(), Status> {
        if id == 0 {
            return Err(Status::invalid_argument("node id 0 is reserved; use 1 or more"));
        }
        if addr.is_empty() || addr.len() > ADDR_BYTES_MAX {
            return Err(Status::invalid_argument(format!(
                "address must be 1..={ADDR_BYTES_MAX} bytes"
            )));
        }
        colony_client::parse_endpoint(addr).map_err(Status::invalid_argument)?;
        for (member, member_addr) in members {
            if *member == id && member_addr != addr {
                return Err(Status::already_exists(format!(
                    "node id {id} is already a member at {member_addr}; pick another id"
                )));
            }
            if *member != id && member_addr == addr {
                return Err(Status::already_exists(format!(
                    "{addr} is already member {member}'s address"
                )));
            }
        }
        Ok(())
    }
}

fn token_to_proto(token: &AclToken) -> pb::AclToken {
    pb::AclToken {
        accessor: token.accessor.clone(),
        role: token.grant.role.to_string(),
        namespaces: token.grant.namespaces.iter().flatten().cloned().collect(),
        description: token.description.clone(),
        created_unix_ms: token.created_unix_ms,
        expires_unix_ms: token.expires_unix_ms,
    }
}
