//! Length-delimited protobuf frames on QUIC streams: a u32 big-endian length, then the message.

use quinn::{ReadError, ReadExactError, RecvStream, SendStream, WriteError};

/// Largest frame either side accepts: an assignment with its inputs (4 MiB at most), a report
/// with its outputs (1 MiB at most), with room to spare.
pub const FRAME_BYTES_MAX: usize = 8 << 20;

const PREFIX_BYTES: usize = 4;

// The length prefix is a u32, so the limit must fit in one.
const _: () = assert!(FRAME_BYTES_MAX <= u32::MAX as usize);

/// Why a frame could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("stream ended in the middle of a frame")]
    Truncated,
    #[error("frame is not a valid message")]
    Malformed(#[source] prost::DecodeError),
    #[error("cannot read from the stream")]
    Read(#[from] ReadError),
    #[error("cannot write to the stream")]
    Write(#[from] WriteError),
}

/// Writes one frame. A message over [`FRAME_BYTES_MAX`] is refused before anything is written,
/// so the stream stays usable.
pub async fn write_frame<M: prost::Message>(
    send: &mut SendStream,
    message: &M,
) -> Result<(), FrameError> {
    let len = message.encoded_len();
    let too_large = FrameError::TooLarge { len, max: FRAME_BYTES_MAX };
    if len > FRAME_BYTES_MAX {
        return Err(too_large);
    }
    // Cannot fail: FRAME_BYTES_MAX fits in a u32, as asserted above.
    let prefix = u32::try_from(len).map_err(|_| too_large)?;
    // One buffer and one write, so a frame is never split into a lone prefix packet.
    let mut buf = Vec::with_capacity(PREFIX_BYTES + len);
    buf.extend_from_slice(&prefix.to_be_bytes());
    message.encode_raw(&mut buf);
    send.write_all(&buf).await?;
    Ok(())
}

/// Reads one frame. `Ok(None)` on a clean end of stream before any byte of a frame. A length
/// prefix over `bytes_max` is refused without reading or allocating the body.
pub async fn read_frame<M: prost::Message + Default>(
    recv: &mut RecvStream,
    bytes_max: usize,
) -> Result<Option<M>, FrameError> {
    let mut prefix = [0u8; PREFIX_BYTES];
    let mut filled = 0;
    while filled < PREFIX_BYTES {
        match recv.read(&mut prefix[filled..]).await? {
            Some(n) => filled += n,
            None if filled == 0 => return Ok(None),
            None => return Err(FrameError::Truncated),
        }
    }
    // A usize narrower than u32 saturates, which the limit then refuses.
    let len = usize::try_from(u32::from_be_bytes(prefix)).unwrap_or(usize::MAX);
    if len > bytes_max {
        return Err(FrameError::TooLarge { len, max: bytes_max });
    }
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body).await.map_err(|error| match error {
        ReadExactError::FinishedEarly(_) => FrameError::Truncated,
        ReadExactError::ReadError(error) => FrameError::Read(error),
    })?;
    M::decode(body.as_slice()).map(Some).map_err(FrameError::Malformed)
}
