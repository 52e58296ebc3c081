//! Encoding of openraft messages inside `RaftMessage.payload`: a format version byte, then bincode.

use serde::de::DeserializeOwned;
use serde::Serialize;

const WIRE_VERSION: u8 = 1;

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("empty raft payload")]
    Empty,
    #[error("raft payload has wire version {0}; this build speaks version {WIRE_VERSION}")]
    Version(u8),
    #[error("raft payload does not decode: {0}")]
    Decode(String),
    #[error("raft payload does not encode: {0}")]
    Encode(String),
}

pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, WireError> {
    let mut out = vec![WIRE_VERSION];
    bincode::serde::encode_into_std_write(value, &mut out, bincode::config::standard())
        .map_err(|e| WireError::Encode(e.to_string()))?;
    Ok(out)
}

pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, WireError> {
    let (&version, body) = bytes.split_first().ok_or(WireError::Empty)?;
    if version != WIRE_VERSION {
        return Err(WireError::Version(version));
    }
    let (value, _) = bincode::serde::decode_from_slice(body, bincode::config::standard())
        .map_err(|e| WireError::Decode(e.to_string()))?;
    Ok(value)
}
