//! The receiving end of a connection.

use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use super::RemoteError;
use super::message::{self, GREETING, MAX_KEPT, MAX_WARNINGS, PROTOCOL, ToReceiver, ToSender};
use crate::apply::{ApplyError, ApplyOptions, ApplyReport, Session};
use crate::batch::{BatchReader, OpSource};

/// What a connection did, for the receiver's log.
#[derive(Debug, Clone, Default)]
pub struct Received {
    /// The replica directory.
    pub replica: Option<PathBuf>,
    /// Batches committed (not counting those skipped as already applied).
    pub applied: u64,
    /// The sequence number the replica ended at.
    pub seq: u64,
}

/// Serves one connection: greets, opens the replica `open` names for the
/// sender's `Hello` (a name under the daemon's root, or the ssh command
/// line's path; `open` makes it if need be), and applies the batches the
/// sender sends until it says `Done`. After a `Release` the replica is
/// unlocked and the next `Hello` starts another session on the same
/// connection (a sender keeping its ssh connection between pushes); the
/// stream ending there ends the connection cleanly.
///
/// Every byte from `r` is hostile: messages and batches are bounded
/// before anything is allocated, and a batch is applied only once its
/// trailer has been verified.
pub fn receive<R: Read, W: Write>(
    r: R,
    w: W,
    mut open: impl FnMut(&str) -> Result<PathBuf, String>,
) -> Result<Received, RemoteError> {
    let mut r = BufReader::with_capacity(256 << 10, r);
    let mut w = BufWriter::new(w);
    w.write_all(&GREETING)
        .and_then(|()| w.flush())
        .map_err(RemoteError::io("greeting the sender"))?;
    let mut done = Received::default();
    let mut released = false;
    loop {
        let hello =
            message::receive::<ToReceiver>(&mut r).map_err(RemoteError::io("reading Hello"))?;
        let name = match hello {
            Some(ToReceiver::Hello { protocol, replica }) if protocol == PROTOCOL => replica,
            Some(ToReceiver::Hello { protocol, .. }) => {
                return Err(refuse(
                    &mut w,
                    format!(
                        "the sender speaks protocol {protocol}, this receiver only {PROTOCOL}: \
                         use the same ferry version on both ends"
                    ),
                ));
            }
            Some(other) => {
                return Err(refuse(&mut w, format!("expected Hello, got {other:?}")));
            }
            None if released => return Ok(done),
            None => {
                return Err(RemoteError::Protocol(
                    "the sender closed the connection before Hello".into(),
                ));
            }
        };
        let root = open(&name).map_err(|m| refuse(&mut w, m))?;
        done.replica = Some(root.clone());
        match session(&mut r, &mut w, &root, &mut done)? {
            End::Done => return Ok(done),
            End::Released => released = true,
        }
    }
}

/// How a session on one replica ended.
enum End {
    Done,
    Released,
}

/// Refuses the connection with `message` (best effort: the refusal is also
/// the error returned).
fn refuse<W: Write>(w: &mut BufWriter<W>, message: String) -> RemoteError {
    let _ = message::send(
        w,
        &ToSender::Refused {
            message: message.clone(),
        },
    );
    RemoteError::Refused(message)
}

/// Locks the replica at `root`, says `Ready`, and applies batches until
/// the sender says `Done` or `Release`.
fn session<R: Read, W: Write>(
    r: &mut BufReader<R>,
    w: &mut BufWriter<W>,
    root: &Path,
    done: &mut Received,
) -> Result<End, RemoteError> {
    let mut session =
        Session::open(root).map_err(|e| refuse(w, format!("replica {}: {e}", root.display())))?;
    let ready = session
        .applied()
        .and_then(|applied| Ok((applied, session.kept(MAX_KEPT)?, session.partial()?)));
    let (applied, kept, partial) =
        ready.map_err(|e| refuse(w, format!("replica {}: {e}", root.display())))?;
    done.seq = applied.map_or(0, |a| a.seq);
    message::send(
        w,
        &ToSender::Ready {
            applied,
            kept,
            partial,
        },
    )
    .map_err(RemoteError::io("sending Ready"))?;

    loop {
        let msg =
            message::receive::<ToReceiver>(r).map_err(RemoteError::io("reading a message"))?;
        match msg {
            Some(ToReceiver::Done) => return Ok(End::Done),
            Some(ToReceiver::Release) => {
                drop(session);
                message::send(w, &ToSender::Released)
                    .map_err(RemoteError::io("answering Release"))?;
                return Ok(End::Released);
            }
            Some(ToReceiver::Batch) => {}
            Some(other) => {
                return Err(RemoteError::Protocol(format!(
                    "expected Batch, Release or Done, got {other:?}"
                )));
            }
            None => {
                return Err(RemoteError::Protocol(
                    "the sender closed the connection without Done".into(),
                ));
            }
        }
        let mut reader = match BatchReader::in_stream(&mut *r) {
            Ok(reader) => reader,
            Err(e) => {
                let message = format!("reading the batch: {e}");
                let _ = message::send(
                    w,
                    &ToSender::Failed {
                        message: message.clone(),
                        base_mismatch: None,
                    },
                );
                return Err(RemoteError::Protocol(message));
            }
        };
        let result = session.apply_from(&mut reader, &ApplyOptions::default());
        // The rest of a batch skipped or refused part-way is read, so that
        // the stream is in step for the next message and the sender is
        // not left blocked writing it.
        let in_step = drain(&mut reader);
        let reply = match result {
            Ok(report) => {
                if !report.skipped {
                    done.applied += 1;
                }
                done.seq = done.seq.max(report.to_seq);
                ToSender::Applied(bounded(report))
            }
            Err(e) => ToSender::Failed {
                base_mismatch: match e {
                    ApplyError::BaseMismatch { index, .. } => Some(index),
                    _ => None,
                },
                message: e.to_string(),
            },
        };
        if !in_step {
            let _ = message::send(w, &reply);
            return Err(RemoteError::Protocol(match reply {
                ToSender::Failed { message, .. } => message,
                _ => "the batch stream broke after the batch".into(),
            }));
        }
        message::send(w, &reply).map_err(RemoteError::io("answering a batch"))?;
    }
}

/// Reads the batch to its trailer; whether that worked (the stream is in
/// step).
fn drain(reader: &mut impl OpSource) -> bool {
    loop {
        match reader.next_op() {
            Ok(Some(_)) => {}
            Ok(None) => return true,
            Err(_) => return false,
        }
    }
}

/// The report with at most `MAX_WARNINGS` warnings, so that it fits a
/// message.
fn bounded(mut report: ApplyReport) -> ApplyReport {
    if report.warnings.len() > MAX_WARNINGS {
        let more = report.warnings.len() - (MAX_WARNINGS - 1);
        report.warnings.truncate(MAX_WARNINGS - 1);
        report.warnings.push(format!("and {more} more warnings"));
    }
    for w in &mut report.warnings {
        if w.len() > 1024 {
            let mut end = 1024;
            while !w.is_char_boundary(end) {
                end -= 1;
            }
            w.truncate(end);
        }
    }
    report
}
