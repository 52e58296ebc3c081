//! Joining the cluster: a fresh key and certificate signing request, the join token sent over a
//! connection that trusts only the CA the token pins, and the certificate that comes back.

use crate::dial::{self, describe, Backoff, RoundEnd, Step};
use crate::identity::Credentials;
use colony_core::ExecutorId;
use colony_proto::pb;
use colony_quic::Token;
use quinn::{ClientConfig, Endpoint};

/// Why joining failed for good.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error("invalid join token")]
    Token(#[source] colony_quic::TokenError),
    #[error("cannot create the executor's key")]
    Key(#[source] colony_quic::PkiError),
    #[error("cannot configure TLS for joining")]
    Tls(#[source] colony_quic::PkiError),
    #[error("join rejected by {0}")]
    Rejected(String),
    #[error("could not join after {rounds} rounds over the servers; last: {last}")]
    GaveUp { rounds: u32, last: String },
}

/// Joins through `servers` (following redirects to the leader), retrying with backoff for at
/// most `rounds_max` rounds, or forever when it is `None`.
pub(crate) async fn join(
    endpoint: &Endpoint,
    servers: &[String],
    token: &str,
    name: &str,
    rounds_max: Option<u32>,
) -> Result<Credentials, JoinError> {
    let token = token.trim();
    let parsed: Token = token.parse().map_err(JoinError::Token)?;
    let (key_pem, csr_pem) = colony_quic::new_key_and_csr().map_err(JoinError::Key)?;
    let config = colony_quic::join_client_config(parsed.ca_fingerprint).map_err(JoinError::Tls)?;
    let mut backoff = Backoff::new();
    let mut announced: Option<String> = None;
    let mut rounds = 0;
    let (config, csr_pem) = (&config, csr_pem.as_str());
    loop {
        rounds += 1;
        let end = dial::round(servers, |addr| async move {
            try_join(endpoint, config, &addr, token, csr_pem, name).await
        })
        .await;
        match end {
            RoundEnd::Done(accepted, addr) => {
                let executor_id = ExecutorId(accepted.executor_id);
                tracing::info!(executor_id = %executor_id, server = %addr, "joined the cluster");
                return Ok(Credentials {
                    executor_id,
                    key_pem,
                    cert_pem: accepted.cert_pem,
                    ca_pem: accepted.ca_pem,
                });
            }
            RoundEnd::Fatal(reason) => return Err(JoinError::Rejected(reason)),
            RoundEnd::Exhausted(last) => {
                if rounds_max.is_some_and(|max| rounds >= max) {
                    return Err(JoinError::GaveUp { rounds, last });
                }
                if announced.as_ref() != Some(&last) {
                    tracing::warn!(reason = %last, "cannot join yet; retrying with backoff");
                    announced = Some(last);
                }
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
    }
}

/// True for a refusal that retrying cannot change: the token (malformed, from another cluster,
/// unknown or expired) or the certificate request. Anything else, a proposal that did not
/// commit during a leader change for one, is worth another round.
fn is_permanent_refusal(message: &str) -> bool {
    let message = message.to_ascii_lowercase();
    message.contains("token") || message.contains("certificate request")
}

async fn try_join(
    endpoint: &Endpoint,
    config: &ClientConfig,
    addr: &str,
    token: &str,
    csr_pem: &str,
    name: &str,
) -> Step<pb::JoinAccepted> {
    let mut stream = match dial::open(endpoint, config, addr).await {
        Ok(stream) => stream,
        Err(e) => return Step::Failed(describe(&e)),
    };
    let join =
        pb::Join { token: token.to_owned(), csr_pem: csr_pem.to_owned(), name: name.to_owned() };
    let step = match dial::request(&mut stream, pb::executor_message::Body::Join(join)).await {
        Ok(pb::server_message::Body::JoinAccepted(accepted)) => Step::Done(accepted),
        Ok(pb::server_message::Body::Redirect(redirect)) if redirect.leader_address.is_empty() => {
            Step::NoLeader
        }
        Ok(pb::server_message::Body::Redirect(redirect)) => Step::Redirect(redirect.leader_address),
        Ok(pb::server_message::Body::Error(error)) if is_permanent_refusal(&error.message) => {
            Step::Fatal(format!("{addr}: {}", error.message))
        }
        Ok(pb::server_message::Body::Error(error)) => {
            Step::Failed(format!("refused: {}", error.message))
        }
        Ok(_) => Step::Failed(
            "the server answered Join with something other than JoinAccepted".to_owned(),
        ),
        Err(e) => Step::Failed(describe(&e)),
    };
    stream.close("join done");
    step
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_refusals_are_permanent_and_commit_failures_are_not() {
        assert!(is_permanent_refusal("the join token is unknown or has expired"));
        assert!(is_permanent_refusal("invalid join token: a join token starts with \"colony1.\""));
        assert!(is_permanent_refusal("invalid certificate request: cannot parse"));
        assert!(!is_permanent_refusal("has to forward request to: Some(2)"));
    }
}
