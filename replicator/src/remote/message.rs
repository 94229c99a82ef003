//! The protocol's messages and their framing: `[len: u32 LE][payload]`,
//! the payload one postcard value. Every message from the other end is
//! hostile: its length is checked before anything is allocated, and the
//! buffer grows only as bytes arrive.

use std::io::{self, Read, Write};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::apply::{Applied, ApplyReport, Partial};
use crate::batch::Hash;

/// What a receiver writes first, before any message: a sender that reads
/// anything else is not talking to `ferry receive` (a remote shell that
/// prints a banner, a wrong `--ferry-path`).
pub const GREETING: [u8; 8] = *b"FERRYRX\n";

/// The protocol version this code speaks (and the only one it accepts).
/// 2: `Release`, and a `Hello` again after it.
pub const PROTOCOL: u32 = 2;

/// Largest message payload.
pub const MAX_MESSAGE: u32 = 16 << 20;

/// Most kept hashes a receiver lists (8 MiB of them); more are sent again.
pub const MAX_KEPT: usize = 1 << 18;

/// Most warnings an `Applied` carries (the rest are counted in the last).
pub const MAX_WARNINGS: usize = 1000;

/// Sender to receiver.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToReceiver {
    /// The first message: the protocol version and the replica wanted (a
    /// name under the daemon's root; empty over ssh, whose command line
    /// names the replica).
    Hello { protocol: u32, replica: String },
    /// A batch follows in the stream, in the batch format.
    Batch,
    /// The sender is done; the receiver closes.
    Done,
    /// The sender is done for now but keeps the connection for a later
    /// push: the receiver unlocks the replica, answers `Released`, and
    /// waits for the next `Hello` (or for the stream to end, which then
    /// ends it cleanly).
    Release,
}

/// Receiver to sender.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToSender {
    /// The replica is open and locked for this connection: its applied
    /// state, the content it kept from transfers cut off before their
    /// commit (by hash), and the start of the file one was cut off in.
    Ready {
        applied: Option<Applied>,
        kept: Vec<Hash>,
        partial: Option<Partial>,
    },
    /// The connection cannot go on (the replica cannot be opened, the
    /// versions differ).
    Refused { message: String },
    /// The batch was applied (or skipped as already applied).
    Applied(ApplyReport),
    /// The batch was not applied; nothing on the replica changed, unless
    /// a step of its commit failed (then its log is kept, and the next
    /// apply or connection finishes it before anything else).
    /// `base_mismatch` is the operation whose base did not match, when
    /// that was the cause (the sender then sends that file whole).
    Failed {
        message: String,
        base_mismatch: Option<u64>,
    },
    /// The answer to `Release`: the replica is unlocked.
    Released,
}

/// Writes one message and flushes.
pub fn send<T: Serialize>(w: &mut impl Write, msg: &T) -> io::Result<()> {
    let payload = postcard::to_stdvec(msg).expect("a message always serializes");
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|&n| n <= MAX_MESSAGE)
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("a message of {} bytes is over the limit", payload.len()),
            )
        })?;
    w.write_all(&len.to_le_bytes())?;
    w.write_all(&payload)?;
    w.flush()
}

/// Reads one message; `Ok(None)` when the stream ends before its first
/// byte.
pub fn receive<T: DeserializeOwned>(r: &mut impl Read) -> io::Result<Option<T>> {
    let mut len = [0u8; 4];
    let n = crate::batch::read_full(r, &mut len)?;
    if n == 0 {
        return Ok(None);
    }
    if n < len.len() {
        return Err(truncated());
    }
    let len = u32::from_le_bytes(len);
    if len > MAX_MESSAGE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a message of {len} bytes is over the limit of {MAX_MESSAGE}"),
        ));
    }
    let mut buf = Vec::new();
    r.take(u64::from(len)).read_to_end(&mut buf)?;
    if buf.len() < len as usize {
        return Err(truncated());
    }
    match postcard::take_from_bytes(&buf) {
        Ok((msg, [])) => Ok(Some(msg)),
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "bytes left over after a message",
        )),
        Err(e) => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("an undecodable message: {e}"),
        )),
    }
}

fn truncated() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "the stream ends inside a message",
    )
}
