//! The replication protocol: how a sender (`ferry push`) and a receiver
//! (`ferry receive` at the other end of ssh, or a connection of the
//! daemon) talk over any byte stream. docs/FORMAT.md, "Protocol", has it
//! byte by byte.
//!
//! ```text
//! receiver → sender   GREETING (8 bytes)
//! sender → receiver   Hello { protocol, replica }
//! receiver → sender   Ready { applied, kept }   |  Refused { message }
//! then, once per batch (a push makes a second one only to repair a file
//! the replica's copy of which did not match):
//! sender → receiver   Batch, then the batch itself (the batch format)
//! receiver → sender   Applied { report }        |  Failed { message, base_mismatch }
//! and at the end:
//! sender → receiver   Done
//! ```
//!
//! Pipelined: the sender writes a whole batch without waiting for
//! anything, the receiver stages it as it arrives (the stream's own flow
//! control is the only brake), and answers once the batch is committed.
//! A receiver that refuses a batch part-way reads the rest of it before
//! answering, so a sender is never left blocked on a full pipe.
//!
//! The receiver holds its replica open and locked from `Ready` on
//! ([`apply::Session`](crate::apply::Session)): what `Ready` says stays
//! true until the batch arrives, and two pushes to one replica take turns.
//!
//! **Resume**: a batch cut off (the connection dropped, either process
//! killed) changes nothing visible; the receiver keeps the complete files
//! it had staged (by content hash, made durable), lists them in its next
//! `Ready`, and the sender sends `CreateFromKept` for those instead of
//! their content. A commit that had begun is finished when the replica is
//! next opened, and the replica's sequence number then says it is done.

mod connection;
mod message;
mod receive;

#[cfg(test)]
mod fuzz_seeds;
#[cfg(test)]
mod hostile_tests;
#[cfg(test)]
mod test_ops;
#[cfg(test)]
mod tests;

pub use connection::{Connection, Ready};
pub use message::{GREETING, MAX_KEPT, MAX_MESSAGE, MAX_WARNINGS, PROTOCOL, ToReceiver, ToSender};
pub use receive::{Received, receive};

use std::io;

/// Why a connection failed.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        source: io::Error,
    },
    /// The other end broke the protocol.
    #[error("{0}")]
    Protocol(String),
    /// The receiver refused the connection, or the sender's batch.
    #[error("{0}")]
    Refused(String),
}

impl RemoteError {
    fn io(what: &'static str) -> impl FnOnce(io::Error) -> RemoteError {
        move |source| RemoteError::Io { what, source }
    }
}
