//! QUIC application close codes, the one definition both ends of the executor link use.

/// Why a connection was closed, as the peer sees it in `ApplicationClose`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseCode {
    /// A normal end: the work is done or the process is stopping.
    Ok,
    /// The peer broke the protocol (a malformed or unexpected message).
    PeerFault,
    /// Go elsewhere or come back later: this server is not (or no longer) the leader, is
    /// shutting down, or a newer connection replaced this one.
    GoingAway,
    /// An executor is stopping: it runs nothing now and takes no work until it starts again.
    Stopping,
}

impl CloseCode {
    pub fn code(self) -> u32 {
        match self {
            CloseCode::Ok => 0,
            CloseCode::PeerFault => 1,
            CloseCode::GoingAway => 2,
            CloseCode::Stopping => 3,
        }
    }

    /// Whether `connection` was closed by its peer with this code.
    pub fn closed_by_peer_with(self, connection: &quinn::Connection) -> bool {
        matches!(
            connection.close_reason(),
            Some(quinn::ConnectionError::ApplicationClosed(close))
                if close.error_code == quinn::VarInt::from(self)
        )
    }

    /// Closes `connection` with this code and `reason`.
    pub fn close(self, connection: &quinn::Connection, reason: &str) {
        connection.close(self.into(), reason.as_bytes());
    }
}

impl From<CloseCode> for quinn::VarInt {
    fn from(code: CloseCode) -> quinn::VarInt {
        quinn::VarInt::from_u32(code.code())
    }
}
