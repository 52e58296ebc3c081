//! Colony's wire contract: the generated gRPC code and the one place that converts between proto
//! and colony-core types. Generated types never travel past this crate's callers' edges.

pub mod agent;
pub mod convert;
pub mod link;
pub mod messaging;
pub mod workflow;

/// Generated protobuf and gRPC types for `colony.v1`.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("colony.v1");
}

/// The encoded `FileDescriptorSet` of every Colony proto, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/colony_descriptor.bin"));

pub use convert::ConversionError;

/// Trailer of a `WatchFinishedTasks` stream refused with `OUT_OF_RANGE`: retention removed
/// finished tasks after the caller's cursor; the value is the sequence number to resume after.
pub const RESUME_AFTER_SEQ: &str = "x-colony-resume-after-seq";

/// Trailer of a follower's `FAILED_PRECONDITION` answer to `SaveSnapshot`: where the leader
/// listens.
pub const LEADER_ADDR: &str = "x-colony-leader";
