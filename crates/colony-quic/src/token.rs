//! Tokens: one string that pins the cluster CA and carries a secret. Join tokens let an executor,
//! a server or the learner in once; ACL tokens authenticate every admin call.

use std::fmt;
use std::str::FromStr;

use rand::rngs::OsRng;
use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::pki::{ClusterCa, Fingerprint};

const PREFIX: &str = "colony1";
/// Prefix, CA fingerprint, secret.
const PARTS: usize = 3;
/// Both the fingerprint and the secret are 32 bytes, so 64 hex digits.
const PART_HEX_LEN: usize = 64;

/// `colony1.<CA SHA-256, 64 hex>.<secret, 64 hex>`. The fingerprint lets the holder pin the
/// cluster CA before it has anything else (as kubeadm's discovery hash does); the secret proves
/// to the cluster who let the holder in. The cluster stores only [`Token::secret_hash`].
#[derive(Clone, PartialEq, Eq)]
pub struct Token {
    pub ca_fingerprint: Fingerprint,
    pub secret: [u8; 32],
}

/// Why a string is not a token.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("a token starts with \"{PREFIX}.\"")]
    WrongPrefix,
    #[error("a token has {PARTS} dot-separated parts, this has {found}")]
    PartCount { found: usize },
    #[error("the {part} is {found} characters, not {PART_HEX_LEN}")]
    WrongLength { part: &'static str, found: usize },
    #[error("the {part} is not hexadecimal")]
    BadHex { part: &'static str },
}

impl Token {
    /// A token for `ca` with a fresh secret from the operating system's generator.
    pub fn generate(ca: &ClusterCa) -> Token {
        Token::generate_for(ca.fingerprint())
    }

    /// A token for the CA with this fingerprint, with a fresh secret.
    pub fn generate_for(ca_fingerprint: Fingerprint) -> Token {
        let mut secret = [0u8; 32];
        OsRng.fill_bytes(&mut secret);
        Token { ca_fingerprint, secret }
    }

    /// SHA-256 of the secret: what the cluster stores, so a leaked snapshot admits no one.
    pub fn secret_hash(&self) -> Fingerprint {
        Sha256::digest(self.secret).into()
    }
}

/// Redacts the secret, so a token logged by mistake cannot be replayed.
impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field("ca_fingerprint", &hex::encode(self.ca_fingerprint))
            .field("secret", &"<redacted>")
            .finish()
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}.{}.{}", hex::encode(self.ca_fingerprint), hex::encode(self.secret))
    }
}

impl FromStr for Token {
    type Err = TokenError;

    fn from_str(s: &str) -> Result<Token, TokenError> {
        let parts: Vec<&str> = s.trim().split('.').collect();
        if parts.first() != Some(&PREFIX) {
            return Err(TokenError::WrongPrefix);
        }
        let [_, ca, secret] = parts[..] else {
            return Err(TokenError::PartCount { found: parts.len() });
        };
        Ok(Token {
            ca_fingerprint: decode_part(ca, "CA fingerprint")?,
            secret: decode_part(secret, "secret")?,
        })
    }
}

fn decode_part(text: &str, part: &'static str) -> Result<[u8; 32], TokenError> {
    if text.len() != PART_HEX_LEN {
        return Err(TokenError::WrongLength { part, found: text.len() });
    }
    let mut bytes = [0u8; 32];
    hex::decode_to_slice(text, &mut bytes).map_err(|_| TokenError::BadHex { part })?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_display_and_from_str() -> anyhow::Result<()> {
        let token = Token::generate(&ClusterCa::generate("test")?);
        let text = token.to_string();
        anyhow::ensure!(text.len() == PREFIX.len() + 2 + 2 * PART_HEX_LEN);
        anyhow::ensure!(text.parse::<Token>()? == token);
        anyhow::ensure!(!format!("{token:?}").contains(&hex::encode(token.secret)));
        Ok(())
    }

    #[test]
    fn rejects_each_malformed_shape() {
        let hex64 = "ab".repeat(32);
        let cases = [
            (format!("colony2.{hex64}.{hex64}"), TokenError::WrongPrefix),
            (String::new(), TokenError::WrongPrefix),
            (format!("colony1.{hex64}"), TokenError::PartCount { found: 2 }),
            (format!("colony1.{hex64}.{hex64}.{hex64}"), TokenError::PartCount { found: 4 }),
            (
                format!("colony1.{}.{hex64}", "ab".repeat(31)),
                TokenError::WrongLength { part: "CA fingerprint", found: 62 },
            ),
            (
                format!("colony1.{hex64}.{}", "ab".repeat(33)),
                TokenError::WrongLength { part: "secret", found: 66 },
            ),
            (
                format!("colony1.{}.{hex64}", "zz".repeat(32)),
                TokenError::BadHex { part: "CA fingerprint" },
            ),
            (format!("colony1.{hex64}.{}", "é".repeat(32)), TokenError::BadHex { part: "secret" }),
        ];
        for (text, expected) in cases {
            assert_eq!(text.parse::<Token>(), Err(expected), "{text:?}");
        }
    }
}
