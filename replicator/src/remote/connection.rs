//! The sending end of a connection.

use std::collections::HashSet;
use std::io::{BufReader, BufWriter, Read, Write};

use super::RemoteError;
use super::message::{self, GREETING, MAX_KEPT, PROTOCOL, ToReceiver, ToSender};
use crate::apply::{Applied, Partial};
use crate::batch::{BatchError, BatchHeader, BatchWriter, Hash};

/// What the receiver said when the connection opened.
#[derive(Debug, Clone, Default)]
pub struct Ready {
    /// The replica's applied state (`None` for a replica never applied to).
    pub applied: Option<Applied>,
    /// Content the replica kept from a transfer cut off before its commit.
    pub kept: HashSet<Hash>,
    /// The start of the file such a transfer was cut off in.
    pub partial: Option<Partial>,
}

/// A connection to a receiver, past its `Ready`.
pub struct Connection<R: Read, W: Write> {
    r: BufReader<R>,
    w: BufWriter<W>,
}

impl<R: Read, W: Write> Connection<R, W> {
    /// Reads the receiver's greeting, asks for `replica` (a name under the
    /// daemon's root; empty over ssh) and reads its `Ready`.
    pub fn open(r: R, w: W, replica: &str) -> Result<(Self, Ready), RemoteError> {
        let mut conn = Connection {
            r: BufReader::with_capacity(64 << 10, r),
            w: BufWriter::with_capacity(256 << 10, w),
        };
        let mut greeting = [0u8; GREETING.len()];
        let n = crate::batch::read_full(&mut conn.r, &mut greeting)
            .map_err(RemoteError::io("reading the receiver's greeting"))?;
        if n == 0 {
            return Err(RemoteError::Protocol(
                "the connection closed before the receiver greeted".into(),
            ));
        }
        if greeting[..n] != GREETING[..n] || n < GREETING.len() {
            // A remote shell printing something, or another program.
            let mut more = Vec::new();
            let _ = (&mut conn.r).take(200).read_to_end(&mut more);
            let mut seen = greeting[..n].to_vec();
            seen.extend_from_slice(&more);
            return Err(RemoteError::Protocol(format!(
                "the remote end is not `ferry receive`: it sent {:?} (is the remote shell's \
                 startup quiet, and --ferry-path right?)",
                String::from_utf8_lossy(&seen)
            )));
        }
        let ready = conn.hello(replica)?;
        Ok((conn, ready))
    }

    /// Starts another session on a connection [`release`](Self::release)d
    /// by an earlier push: asks for `replica` and reads its `Ready`.
    pub fn reopen(&mut self, replica: &str) -> Result<Ready, RemoteError> {
        self.hello(replica)
    }

    fn hello(&mut self, replica: &str) -> Result<Ready, RemoteError> {
        message::send(
            &mut self.w,
            &ToReceiver::Hello {
                protocol: PROTOCOL,
                replica: replica.to_string(),
            },
        )
        .map_err(RemoteError::io("sending Hello"))?;
        match self.reply("waiting for Ready")? {
            ToSender::Ready { kept, .. } if kept.len() > MAX_KEPT => {
                Err(RemoteError::Protocol(format!(
                    "the receiver lists {} kept files, more than the {MAX_KEPT} allowed",
                    kept.len()
                )))
            }
            ToSender::Ready {
                applied,
                kept,
                partial,
            } => Ok(Ready {
                applied,
                kept: kept.into_iter().collect(),
                partial,
            }),
            ToSender::Refused { message } => Err(RemoteError::Refused(message)),
            other => Err(RemoteError::Protocol(format!(
                "expected Ready, got {}",
                describe(&other)
            ))),
        }
    }

    /// Announces a batch and starts writing it into the stream.
    pub fn batch(
        &mut self,
        header: BatchHeader,
    ) -> Result<BatchWriter<&mut BufWriter<W>>, RemoteError> {
        let w = &mut self.w;
        message::send(w, &ToReceiver::Batch).map_err(RemoteError::io("announcing a batch"))?;
        BatchWriter::new(w, header).map_err(|e: BatchError| RemoteError::Io {
            what: "writing the batch header",
            source: std::io::Error::other(e.to_string()),
        })
    }

    /// The receiver's answer to a batch: `Applied` or `Failed`.
    pub fn outcome(&mut self) -> Result<ToSender, RemoteError> {
        match self.reply("waiting for the replica's answer")? {
            reply @ (ToSender::Applied(_) | ToSender::Failed { .. }) => Ok(reply),
            other => Err(RemoteError::Protocol(format!(
                "expected the answer to a batch, got {}",
                describe(&other)
            ))),
        }
    }

    /// Tells the receiver the sender is done.
    pub fn close(mut self) -> Result<(), RemoteError> {
        message::send(&mut self.w, &ToReceiver::Done).map_err(RemoteError::io("sending Done"))
    }

    /// Tells the receiver the sender is done for now: it unlocks the
    /// replica and waits for a [`reopen`](Self::reopen) (or for the stream
    /// to end).
    pub fn release(&mut self) -> Result<(), RemoteError> {
        message::send(&mut self.w, &ToReceiver::Release)
            .map_err(RemoteError::io("sending Release"))?;
        match self.reply("waiting for Released")? {
            ToSender::Released => Ok(()),
            other => Err(RemoteError::Protocol(format!(
                "expected Released, got {}",
                describe(&other)
            ))),
        }
    }

    fn reply(&mut self, what: &'static str) -> Result<ToSender, RemoteError> {
        message::receive(&mut self.r)
            .map_err(RemoteError::io(what))?
            .ok_or_else(|| {
                RemoteError::Protocol(format!("the receiver closed the connection ({what})"))
            })
    }
}

/// A message named for an error, without its (possibly long) contents.
fn describe(m: &ToSender) -> &'static str {
    match m {
        ToSender::Ready { .. } => "Ready",
        ToSender::Refused { .. } => "Refused",
        ToSender::Applied(_) => "Applied",
        ToSender::Failed { .. } => "Failed",
        ToSender::Released => "Released",
    }
}
