//! The one on-disk framing for everything this crate persists: a version byte, a checksum, a body.
//!
//! A frame is `[FORMAT_VERSION: u8][crc32 of the body: u32 LE][body]`, where the body is the
//! serde value encoded with bincode 2 (`bincode::config::standard()`). Decoding checks the version
//! and the checksum before it looks at the body, so a flipped bit is reported as corruption and is
//! never decoded into a plausible-looking value, nor mistaken for "nothing stored".

use serde::de::DeserializeOwned;
use serde::Serialize;

/// The format version written by this build. Bump it (and keep a reader for the old one) whenever
/// the body encoding of any persisted type changes.
///
/// - 2: TLS and ACLs (version 1 frames are refused by name: nothing of a cluster without them
///   carries over).
/// - 3: retention. Only the state machine's body changed (see `colony_core::StateMachineV2`); a
///   version 2 frame of anything else (a log entry, a vote, a log id) has the same body and is
///   read as it is. The state machine store reads version 2 snapshots through the old layout.
/// - 4: workflows. The state machine's body changed (see `colony_core::StateMachineV3`); commands
///   and attempt statuses only gained variants at their ends, so a version 2 or 3 log entry still
///   reads as it is.
/// - 5: messages. The state machine's body gained the topics (see `colony_core::StateMachineV4`);
///   commands only gained variants at their end, so older log entries read as they are.
/// - 6: discovery. Agent specs gained a port and a health check, and the agents a registry (see
///   `colony_core::StateMachineV5`); format 5's `RunAgent` is read as `Command::RunAgentV5`, and
///   the new `RunAgent` and the health report are variants at their ends.
pub const FORMAT_VERSION: u8 = 6;
/// The oldest format version this build reads.
pub const OLDEST_READABLE: u8 = 2;
/// The most a decoded value may claim (lengths are checked against it before anything is
/// allocated), so even a frame whose checksum matches cannot ask for an absurd allocation.
const DECODE_BYTES_MAX: usize = 16 << 30;

/// Bytes before the body: the version byte and the crc32.
pub const HEADER_LEN: usize = 5;

/// Why a frame could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("frame is {len} bytes, shorter than its {HEADER_LEN}-byte header")]
    Truncated { len: usize },
    #[error("unknown format version {found} (this build reads versions {OLDEST_READABLE} to {FORMAT_VERSION})")]
    UnknownVersion { found: u8 },
    #[error("checksum mismatch: header says crc32 {stored:#010x}, body has {computed:#010x}")]
    ChecksumMismatch { stored: u32, computed: u32 },
    #[error("body does not decode: {0}")]
    Decode(#[from] bincode::error::DecodeError),
    #[error("body has {extra} bytes after the encoded value")]
    TrailingBytes { extra: usize },
    #[error("value does not encode: {0}")]
    Encode(#[from] bincode::error::EncodeError),
}

/// Encodes `value` as one frame. The body's size is counted first, so the frame is allocated once
/// at its length: a snapshot is tens of MiB, and growing a vector to it (then copying it behind a
/// header) held three times that at the peak.
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, CodecError> {
    let config = bincode::config::standard();
    let mut size = bincode::enc::write::SizeWriter::default();
    bincode::serde::encode_into_writer(value, &mut size, config)?;
    let mut frame = Vec::with_capacity(HEADER_LEN + size.bytes_written);
    frame.push(FORMAT_VERSION);
    frame.extend_from_slice(&[0; HEADER_LEN - 1]);
    bincode::serde::encode_into_std_write(value, &mut frame, config)?;
    let crc = crc32fast::hash(&frame[HEADER_LEN..]);
    frame[..HEADER_LEN].copy_from_slice(&header(crc));
    Ok(frame)
}

/// The length of `value`'s body (its frame is [`HEADER_LEN`] bytes longer), counted without
/// encoding it into memory.
pub fn body_len<T: Serialize + ?Sized>(value: &T) -> Result<usize, CodecError> {
    let mut size = bincode::enc::write::SizeWriter::default();
    bincode::serde::encode_into_writer(value, &mut size, bincode::config::standard())?;
    Ok(size.bytes_written)
}

/// Encodes `value`'s body into `out` as it goes, never holding it whole, and returns a hasher
/// over the bytes written: the frame's checksum (`finalize`) and a part of any checksum over it
/// (`crc32fast::Hasher::combine`). The caller writes the header, which comes first but depends
/// on the checksum known only at the end.
pub fn write_body<T: Serialize + ?Sized>(
    out: &mut impl std::io::Write,
    value: &T,
) -> Result<(usize, crc32fast::Hasher), CodecError> {
    let mut hashing = Hashing { out, crc: crc32fast::Hasher::new(), written: 0 };
    // bincode writes a field at a time; buffered, the checksum runs over large chunks.
    let mut buffered = std::io::BufWriter::with_capacity(256 << 10, &mut hashing);
    bincode::serde::encode_into_std_write(value, &mut buffered, bincode::config::standard())?;
    let flushed = std::io::Write::flush(&mut buffered);
    let index = buffered.get_ref().written;
    flushed.map_err(|inner| bincode::error::EncodeError::Io { inner, index })?;
    drop(buffered);
    Ok((hashing.written, hashing.crc))
}

/// A frame's header for a body whose checksum is `crc`.
pub fn header(crc: u32) -> [u8; HEADER_LEN] {
    let crc = crc.to_le_bytes();
    [FORMAT_VERSION, crc[0], crc[1], crc[2], crc[3]]
}

/// A writer that checksums and counts what passes through it.
struct Hashing<'a, W> {
    out: &'a mut W,
    crc: crc32fast::Hasher,
    written: usize,
}

impl<W: std::io::Write> std::io::Write for Hashing<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.out.write(buf)?;
        self.crc.update(&buf[..n]);
        self.written += n;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// Writes one frame whose body is `parts` one after another, without joining them in memory:
/// the bytes `encode` would give for a value that encodes as those parts.
pub fn write_frame(out: &mut impl std::io::Write, parts: &[&[u8]]) -> std::io::Result<()> {
    let mut crc = crc32fast::Hasher::new();
    for part in parts {
        crc.update(part);
    }
    out.write_all(&header(crc.finalize()))?;
    for part in parts {
        out.write_all(part)?;
    }
    Ok(())
}

/// Decodes one frame, verifying its version and checksum first. Only for types whose body is the
/// same in every readable version; the state machine's is not (`decode_versioned`).
pub fn decode<T: DeserializeOwned>(frame: &[u8]) -> Result<T, CodecError> {
    let (_, body) = verified_body(frame)?;
    decode_body(body)
}

/// The version and body of a frame whose version is readable and whose checksum is good.
pub fn decode_versioned(frame: &[u8]) -> Result<(u8, &[u8]), CodecError> {
    verified_body(frame)
}

/// Decodes a body taken from a frame by [`decode_versioned`], all of it.
pub fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, CodecError> {
    let config = bincode::config::standard().with_limit::<DECODE_BYTES_MAX>();
    let (value, read) = bincode::serde::decode_from_slice(body, config)?;
    if read != body.len() {
        return Err(CodecError::TrailingBytes { extra: body.len() - read });
    }
    Ok(value)
}

/// The version and body of a frame whose version is readable and whose checksum is good.
fn verified_body(frame: &[u8]) -> Result<(u8, &[u8]), CodecError> {
    let (header, body) = match frame.split_at_checked(HEADER_LEN) {
        Some(parts) => parts,
        None => return Err(CodecError::Truncated { len: frame.len() }),
    };
    if !(OLDEST_READABLE..=FORMAT_VERSION).contains(&header[0]) {
        return Err(CodecError::UnknownVersion { found: header[0] });
    }
    let stored = u32::from_le_bytes([header[1], header[2], header[3], header[4]]);
    let computed = crc32fast::hash(body);
    if stored != computed {
        return Err(CodecError::ChecksumMismatch { stored, computed });
    }
    Ok((header[0], body))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::Applied;
    use colony_core::{Command, Proposal, Resources, RunSpec, TaskSpec};
    use openraft::{CommittedLeaderId, LogId, Vote};
    use std::collections::{BTreeMap, BTreeSet};

    /// Frozen bytes: if this test fails, the on-disk format changed and `FORMAT_VERSION` must be
    /// bumped. A vote's body is the same in versions 2 to 6, so older frames still read.
    #[test]
    fn vote_frame_bytes_are_frozen() {
        let vote = Vote::<u64>::new_committed(3, 1);
        let frame = encode(&vote).unwrap();
        assert_eq!(frame, vec![0x06, 0x9c, 0x66, 0x1b, 0x93, 0x03, 0x01, 0x01]);
        assert_eq!(decode::<Vote<u64>>(&frame).unwrap(), vote);
        for version in [2, 3, 4, 5] {
            let written_before = [version, 0x9c, 0x66, 0x1b, 0x93, 0x03, 0x01, 0x01];
            assert_eq!(decode::<Vote<u64>>(&written_before).unwrap(), vote);
        }
    }

    #[test]
    fn log_id_frame_bytes_are_frozen() {
        let log_id = LogId::new(CommittedLeaderId::new(2, 7), 300);
        let frame = encode(&log_id).unwrap();
        assert_eq!(frame, vec![0x06, 0xcd, 0x5b, 0x92, 0xd6, 0x02, 0x07, 0xfb, 0x2c, 0x01]);
        assert_eq!(decode::<LogId<u64>>(&frame).unwrap(), log_id);
    }

    #[test]
    fn flipped_body_bit_is_a_checksum_mismatch() {
        let mut frame = encode(&LogId::new(CommittedLeaderId::new(2, 7), 300)).unwrap();
        frame[HEADER_LEN] ^= 0x01;
        assert!(matches!(decode::<LogId<u64>>(&frame), Err(CodecError::ChecksumMismatch { .. })));
    }

    #[test]
    fn unknown_version_is_rejected() {
        let mut frame = encode(&7u64).unwrap();
        frame[0] = 1;
        assert!(matches!(decode::<u64>(&frame), Err(CodecError::UnknownVersion { found: 1 })));
        frame[0] = FORMAT_VERSION + 1;
        assert!(matches!(decode::<u64>(&frame), Err(CodecError::UnknownVersion { found: 7 })));
    }

    #[test]
    fn short_frame_is_truncated() {
        assert!(matches!(decode::<u64>(&[]), Err(CodecError::Truncated { len: 0 })));
        assert!(matches!(
            decode::<u64>(&[FORMAT_VERSION, 0, 0]),
            Err(CodecError::Truncated { len: 3 })
        ));
    }

    #[test]
    fn cut_body_does_not_decode() {
        let frame = encode(&(1u64, String::from("colony"))).unwrap();
        let body = &frame[HEADER_LEN..frame.len() - 2];
        let mut cut = vec![FORMAT_VERSION];
        cut.extend_from_slice(&crc32fast::hash(body).to_le_bytes());
        cut.extend_from_slice(body);
        assert!(matches!(decode::<(u64, String)>(&cut), Err(CodecError::Decode(_))));
    }

    /// Every colony-core value the store persists (proposals in log entries, the state machine in
    /// snapshots) must survive bincode, which is not self-describing: serde attributes such as
    /// `skip_serializing_if`, `flatten` and internally tagged enums break it.
    #[test]
    fn colony_core_values_round_trip() {
        let spec = TaskSpec {
            name: "train".to_owned(),
            namespace: "default".to_owned(),
            labels: BTreeMap::new(),
            capabilities: BTreeSet::new(),
            resources: Resources {
                cpu_millis: 500,
                memory_bytes: 64 << 20,
                gpus: 0,
                custom: BTreeMap::new(),
            },
            priority: 10,
            deadline_unix_ms: None,
            timeout_ms: None,
            max_retries: 0,
            dependencies: BTreeSet::new(),
            run: RunSpec::Process {
                program: "/bin/true".to_owned(),
                args: vec![],
                env: BTreeMap::new(),
            },
            idempotency_key: None,
            placement: Default::default(),
            memory_auto: false,
        };
        let proposal = Proposal { now_unix_ms: 5, commands: vec![Command::SubmitTask(spec)] };
        let decoded = encode(&proposal)
            .map_err(|e| e.to_string())
            .and_then(|f| decode(&f).map_err(|e| e.to_string()));
        assert_eq!(decoded, Ok(proposal.clone()), "a proposal submitting a task");

        let mut applied = Applied::default();
        assert!(applied.machine.apply_proposal(&proposal)[0].is_ok());
        let decoded = encode(&applied)
            .map_err(|e| e.to_string())
            .and_then(|f| decode::<Applied>(&f).map_err(|e| e.to_string()))
            .map(|back| back.machine);
        assert_eq!(decoded, Ok(applied.machine), "a state machine holding a task");
    }

    #[test]
    fn trailing_bytes_are_rejected() {
        let body = [0x05u8, 0x06];
        let mut frame = vec![FORMAT_VERSION];
        frame.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
        frame.extend_from_slice(&body);
        assert!(matches!(decode::<u8>(&frame), Err(CodecError::TrailingBytes { extra: 1 })));
    }
}
