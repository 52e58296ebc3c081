//! Encoding of openraft messages inside `RaftMessage.payload`: a format version byte, then bincode.

use serde::de::DeserializeOwned;
use serde::Serialize;

const WIRE_VERSION: u8 = 1;
/// The most a decoded message may claim (lengths are checked against it before anything is
/// allocated): a forged length prefix is an error, never a huge allocation.
const DECODE_BYTES_MAX: usize = 256 << 20;

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
    let config = bincode::config::standard().with_limit::<DECODE_BYTES_MAX>();
    let (value, _) = bincode::serde::decode_from_slice(body, config)
        .map_err(|e| WireError::Decode(e.to_string()))?;
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_forged_length_prefix_is_an_error_not_an_allocation() {
        // Version, then a varint length of 2^50 for a byte string: bincode's u64 marker 253 and
        // eight little-endian bytes.
        let mut forged = vec![WIRE_VERSION, 253];
        forged.extend_from_slice(&(1u64 << 50).to_le_bytes());
        let decoded = decode::<Vec<u8>>(&forged);
        assert!(matches!(decoded, Err(WireError::Decode(_))), "{decoded:?}");
        let decoded = decode::<String>(&forged);
        assert!(matches!(decoded, Err(WireError::Decode(_))), "{decoded:?}");
        assert!(matches!(decode::<u8>(&[]), Err(WireError::Empty)));
        assert!(matches!(decode::<u8>(&[9, 0]), Err(WireError::Version(9))));
        let round = encode(&vec![1u8, 2, 3]).map(|bytes| decode::<Vec<u8>>(&bytes));
        assert!(matches!(round, Ok(Ok(ref v)) if v == &[1, 2, 3]));
    }
}
