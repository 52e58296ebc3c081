//! `colony acl`: the first management token, and ACL tokens for people and programs.

use crate::output::{self, OutputFormat};
use crate::GlobalArgs;
use anyhow::{Context, Result};
use clap::Subcommand;
use colony_proto::pb;
use serde::Serialize;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Subcommand)]
pub enum AclCommand {
    /// Create the first management token (role admin, every namespace); a second call is refused
    ///
    /// Prints the token (the one value COLONY_TOKEN needs). The server is verified against the
    /// cluster CA: its certificate file from the bootstrap server's data directory, or its
    /// SHA-256 (the server logs it at bootstrap).
    ///   colony acl bootstrap --endpoint 127.0.0.1:7101 --ca-file d1/tls/ca.pem
    #[command(verbatim_doc_comment)]
    Bootstrap {
        /// The cluster CA's certificate (PEM), e.g. DATA_DIR/tls/ca.pem of the bootstrap server.
        #[arg(long, conflicts_with = "ca_fingerprint", required_unless_present = "ca_fingerprint")]
        ca_file: Option<PathBuf>,
        /// The cluster CA's SHA-256 (64 hex digits).
        #[arg(long)]
        ca_fingerprint: Option<String>,
    },
    /// ACL tokens: create, list, revoke.
    #[command(subcommand)]
    Token(AclTokenCommand),
}

#[derive(Debug, Subcommand)]
pub enum AclTokenCommand {
    /// Create a token; prints its secret once (the cluster keeps only a hash).
    Create {
        /// admin, operator, submitter, reader, learner or executor.
        #[arg(long)]
        role: String,
        /// A namespace the token covers (repeat for more); none covers every namespace.
        #[arg(long = "namespace")]
        namespaces: Vec<String>,
        /// How long it lives (e.g. 30d, at most 366d); none: it never expires.
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
        /// For people reading `acl token list`.
        #[arg(long, default_value = "")]
        description: String,
    },
    /// Every token: accessor, role, namespaces, expiry (never a secret).
    List,
    /// Revoke a token by accessor; every server refuses it once it applies the revocation.
    Revoke { accessor: String },
}

#[derive(Debug, Serialize)]
struct TokenJson {
    accessor: String,
    role: String,
    namespaces: Vec<String>,
    description: String,
    created_unix_ms: u64,
    expires_unix_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    secret: Option<String>,
}

impl TokenJson {
    fn new(token: Option<pb::AclToken>, secret: Option<String>) -> TokenJson {
        let t = token.unwrap_or_default();
        TokenJson {
            accessor: t.accessor,
            role: t.role,
            namespaces: t.namespaces,
            description: t.description,
            created_unix_ms: t.created_unix_ms,
            expires_unix_ms: t.expires_unix_ms,
            secret,
        }
    }
}

pub async fn run(command: AclCommand, global: &GlobalArgs) -> Result<()> {
    match command {
        AclCommand::Bootstrap { ca_file, ca_fingerprint } => {
            let trust = match (ca_file, ca_fingerprint) {
                (Some(path), _) => colony_quic::Trust::Ca(
                    std::fs::read_to_string(&path)
                        .with_context(|| format!("cannot read {}", path.display()))?,
                ),
                (None, Some(hex_text)) => {
                    let mut fingerprint = [0u8; 32];
                    hex::decode_to_slice(hex_text.trim(), &mut fingerprint)
                        .context("--ca-fingerprint must be 64 hex digits")?;
                    colony_quic::Trust::Pinned(fingerprint)
                }
                (None, None) => anyhow::bail!("pass --ca-file or --ca-fingerprint"),
            };
            let response =
                colony_client::bootstrap_acl(&global.endpoint, trust, global.timeout).await?;
            print_created(response.token, response.secret, global.output, "management token")
        }
        AclCommand::Token(command) => {
            let client = global.client()?;
            match command {
                AclTokenCommand::Create { role, namespaces, ttl, description } => {
                    let ttl_ms =
                        ttl.map_or(0, |t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX));
                    let request =
                        pb::CreateAclTokenRequest { role, namespaces, ttl_ms, description };
                    let response = client
                        .call("create token", |mut c| {
                            let request = request.clone();
                            async move { c.create_acl_token(request).await }
                        })
                        .await?;
                    print_created(response.token, response.secret, global.output, "token")
                }
                AclTokenCommand::List => {
                    let response = client
                        .call("list tokens", |mut c| async move {
                            c.list_acl_tokens(pb::ListAclTokensRequest {}).await
                        })
                        .await?;
                    let tokens: Vec<TokenJson> = response
                        .tokens
                        .into_iter()
                        .map(|t| TokenJson::new(Some(t), None))
                        .collect();
                    match global.output {
                        OutputFormat::Json => output::print_json(&tokens),
                        OutputFormat::Table => {
                            let mut table = output::table([
                                "ACCESSOR",
                                "ROLE",
                                "NAMESPACES",
                                "EXPIRES",
                                "DESCRIPTION",
                            ]);
                            for t in &tokens {
                                table.add_row(vec![
                                    t.accessor.clone(),
                                    t.role.clone(),
                                    if t.namespaces.is_empty() {
                                        "*".to_owned()
                                    } else {
                                        t.namespaces.join(",")
                                    },
                                    t.expires_unix_ms
                                        .map_or_else(|| "never".to_owned(), output::format_unix_ms),
                                    t.description.clone(),
                                ]);
                            }
                            output::print_table(table)
                        }
                    }
                }
                AclTokenCommand::Revoke { accessor } => {
                    let request = pb::RevokeAclTokenRequest { accessor: accessor.clone() };
                    client
                        .call("revoke token", |mut c| {
                            let request = request.clone();
                            async move { c.revoke_acl_token(request).await }
                        })
                        .await?;
                    match global.output {
                        OutputFormat::Json => {
                            output::print_json(&serde_json::json!({ "revoked": accessor }))
                        }
                        OutputFormat::Table => output::out(format!("revoked {accessor}")),
                    }
                }
            }
        }
    }
}

/// A new token: the secret alone on stdout (for `$(...)`), the rest on stderr; or JSON.
fn print_created(
    token: Option<pb::AclToken>,
    secret: String,
    format: OutputFormat,
    what: &str,
) -> Result<()> {
    let json = TokenJson::new(token, Some(secret.clone()));
    match format {
        OutputFormat::Json => output::print_json(&json),
        OutputFormat::Table => {
            output::out(&secret)?;
            eprintln!(
                "{what} {} (role {}); it is shown only this once. Use it with: export COLONY_TOKEN=<the line above>",
                json.accessor, json.role
            );
            Ok(())
        }
    }
}
