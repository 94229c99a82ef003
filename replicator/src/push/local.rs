//! Pushing to a replica directory on this machine: the applier runs on a
//! thread of its own and takes the operations as values (`batch::local`).

use std::path::Path;

use super::{
    Attempt, Delivered, Destination, Plan, Progress, PushError, ReplicaState, refused_file,
};
use crate::apply::{self, ApplyError, ApplyOptions};
use crate::batch::{self, BatchHeader};

pub(super) struct Local<'a> {
    pub replica: &'a Path,
}

impl Local<'_> {
    fn err(&self, source: ApplyError) -> PushError {
        PushError::Apply {
            replica: self.replica.to_path_buf(),
            source,
        }
    }
}

impl Destination for Local<'_> {
    fn name(&self) -> String {
        self.replica.to_string_lossy().into_owned()
    }

    fn state(&mut self) -> Result<ReplicaState, PushError> {
        // A commit an earlier push left half done (it was killed) is
        // finished first: the replica's sequence number is the one after
        // it. Nothing is kept across local pushes: a push cut off here
        // has nothing in transit.
        apply::recover(self.replica).map_err(|e| self.err(e))?;
        let applied = apply::read_applied(self.replica).map_err(|e| self.err(e))?;
        Ok(ReplicaState {
            applied,
            ..ReplicaState::default()
        })
    }

    fn compress(&self) -> bool {
        false
    }

    /// Hands the batch's operations to the applier on its own thread,
    /// which stages them as they come and commits once the batch is
    /// complete.
    fn send(
        &mut self,
        plan: &Plan<'_>,
        header: BatchHeader,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<Delivered, Attempt> {
        let replica = self.replica;
        let (mut sender, mut receiver) = batch::local(header);
        std::thread::scope(|scope| {
            let applier = std::thread::Builder::new()
                .name("ferry-apply".into())
                .spawn_scoped(scope, move || {
                    apply::apply_from(replica, &mut receiver, &ApplyOptions::default())
                })
                .map_err(|e| PushError::Other(format!("starting the applier: {e}")))?;
            // Either way the sender is gone before the join: finished, or
            // dropped so that the applier sees the batch end early and
            // commits nothing.
            let mut owners = Vec::new();
            let wrote = match plan.write(&mut sender, progress, &mut owners) {
                Ok(written) => sender
                    .finish()
                    .map(|bytes| (written, bytes))
                    .map_err(PushError::from),
                Err(e) => {
                    drop(sender);
                    Err(e)
                }
            };
            let applied = applier
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p));
            match (wrote, applied) {
                (Ok((written, bytes)), Ok(applied)) => Ok(Delivered {
                    written,
                    bytes,
                    applied,
                }),
                // The replica refused a base (the planner may still have
                // been sending, and then met the closed channel).
                (_, Err(ApplyError::BaseMismatch { index, .. })) => {
                    Err(refused_file(&owners, index))
                }
                // The replica stopped first: its error is the cause.
                (Err(PushError::ReplicaStopped), Err(e)) | (Ok(_), Err(e)) => {
                    Err(Attempt::Failed(self.err(e)))
                }
                (Err(e), _) => Err(Attempt::Failed(e)),
            }
        })
    }
}
