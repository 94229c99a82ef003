//! Pushing through a connection to a receiver (`ferry receive` over ssh,
//! or the daemon): the batch is written into the stream as it is planned,
//! and the receiver answers once it has committed it.

use std::io::{Read, Write};
use std::path::Path;

use journal::Journal;

use super::{
    Attempt, Delivered, Destination, Plan, Progress, PushError, PushOptions, PushReport,
    ReplicaState, refused_file,
};
use crate::batch::BatchHeader;
use crate::remote::{Connection, Ready, RemoteError, ToSender};

/// Pushes to the replica at the other end of `conn` (opened, with what it
/// said in `ready`); `name` names it in the journal and in messages. The
/// connection stays open: [`Connection::close`] ends it.
pub fn push_remote<R: Read, W: Write>(
    journal: &Journal,
    source: &Path,
    conn: &mut Connection<R, W>,
    ready: Ready,
    name: &str,
    opts: &PushOptions,
    progress: &mut dyn FnMut(Progress),
) -> Result<PushReport, PushError> {
    let mut remote = Remote {
        conn,
        ready: Some(ready),
        name,
    };
    super::push_to(journal, source, &mut remote, opts, progress)
}

struct Remote<'c, R: Read, W: Write> {
    conn: &'c mut Connection<R, W>,
    ready: Option<Ready>,
    name: &'c str,
}

fn remote_err(name: &str, message: impl ToString) -> PushError {
    PushError::Remote {
        replica: name.to_string(),
        message: message.to_string(),
    }
}

impl<R: Read, W: Write> Destination for Remote<'_, R, W> {
    fn name(&self) -> String {
        self.name.to_string()
    }

    fn state(&mut self) -> Result<ReplicaState, PushError> {
        let ready = self.ready.take().unwrap_or_default();
        Ok(ReplicaState {
            applied: ready.applied,
            kept: ready.kept,
            partial: ready.partial,
        })
    }

    fn compress(&self) -> bool {
        true
    }

    fn send(
        &mut self,
        plan: &Plan<'_>,
        header: BatchHeader,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<Delivered, Attempt> {
        let name = self.name;
        let mut owners = Vec::new();
        let mut out = self
            .conn
            .batch(header)
            .map_err(|e: RemoteError| remote_err(name, e))?;
        let wrote = plan
            .write(&mut out, progress, &mut owners)
            .and_then(|written| {
                let (_, summary) = out.finish()?;
                Ok((written, summary.bytes))
            });
        let (written, bytes) = match wrote {
            Ok(w) => w,
            // The receiver stopped reading: its answer says why.
            Err(PushError::ReplicaStopped) => {
                return Err(Attempt::Failed(match self.conn.outcome() {
                    Ok(ToSender::Failed { message, .. }) => remote_err(name, message),
                    Ok(_) | Err(_) => {
                        remote_err(name, "the connection broke while the batch was being sent")
                    }
                }));
            }
            Err(e) => return Err(Attempt::Failed(e)),
        };
        match self.conn.outcome().map_err(|e| remote_err(name, e))? {
            ToSender::Applied(applied) => Ok(Delivered {
                written,
                bytes,
                applied,
            }),
            ToSender::Failed {
                base_mismatch: Some(index),
                ..
            } => Err(refused_file(&owners, index)),
            ToSender::Failed { message, .. } => Err(Attempt::Failed(remote_err(name, message))),
            _ => unreachable!("Connection::outcome returns Applied or Failed"),
        }
    }
}
