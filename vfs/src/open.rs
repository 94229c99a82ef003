//! How an inode is open: through kernel passthrough, or through ferry.
//!
//! The kernel (6.9+) puts a FUSE inode in one io mode at a time: while any
//! open of it uses passthrough, every other open must use passthrough with the
//! same backing file; while any open goes through the server (cached io),
//! passthrough opens are refused. This module decides, per open, which path
//! to take so that the kernel never refuses an open and the journal never
//! misses a change:
//!
//! | open                                   | no opens | passthrough opens | ferry opens |
//! |----------------------------------------|----------|-------------------|-------------|
//! | read-only                              | pass     | pass              | ferry       |
//! | writing anew (created, O_TRUNC, empty) | pass (*) | pass (*)          | ferry (*)   |
//! | writing in place                       | ferry    | pass (*)          | ferry       |
//!
//! (*) the file is marked wholly rewritten in the journal before the open is
//! answered, because writes through passthrough never reach ferry and their
//! ranges cannot be known. Writes through ferry carry their ranges.

use std::any::Any;
use std::fs::File;
use std::sync::Arc;

/// What the FUSE adapter registered with the kernel for passthrough (a
/// `fuser::BackingId`), kept opaque so the filesystem logic does not depend
/// on fuser's types. Dropping the last clone unregisters it.
pub type BackingToken = Arc<dyn Any + Send + Sync>;

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum IoPath {
    /// Reads and writes go straight to the backing file in the kernel.
    Passthrough,
    /// Reads and writes come to ferry, which journals written ranges.
    Journaled,
}

/// The per-inode open bookkeeping. Lives in `Inode::open`, under its mutex.
#[derive(Default)]
pub struct OpenState {
    passthrough: Option<(Arc<File>, BackingToken)>,
    passthrough_handles: u32,
    journaled_handles: u32,
}

impl OpenState {
    /// Chooses the io path of a new open (the table in the module docs).
    pub fn choose(&self, writable: bool, anew: bool) -> IoPath {
        if self.journaled_handles > 0 {
            IoPath::Journaled
        } else if !writable || anew || self.passthrough_handles > 0 {
            IoPath::Passthrough
        } else {
            IoPath::Journaled
        }
    }

    /// The io path of a writer that must go through ferry if the kernel
    /// allows it (one whose writes must clear set-ID bits).
    pub fn choose_in_place(&self) -> IoPath {
        if self.passthrough_handles > 0 {
            IoPath::Passthrough
        } else {
            IoPath::Journaled
        }
    }

    /// The inode's shared passthrough file and its registration, made with
    /// `open_and_register` for the first passthrough open.
    pub fn passthrough(
        &mut self,
        open_and_register: impl FnOnce() -> Result<(Arc<File>, BackingToken), nix::errno::Errno>,
    ) -> Result<(Arc<File>, BackingToken), nix::errno::Errno> {
        if self.passthrough.is_none() {
            self.passthrough = Some(open_and_register()?);
        }
        let (file, token) = self.passthrough.as_ref().expect("set just above");
        Ok((file.clone(), token.clone()))
    }

    pub fn opened(&mut self, path: IoPath) {
        match path {
            IoPath::Passthrough => self.passthrough_handles += 1,
            IoPath::Journaled => self.journaled_handles += 1,
        }
    }

    /// Called at release. The kernel has already left the io mode of the
    /// released file, so our counts are never below the kernel's.
    pub fn released(&mut self, path: IoPath) {
        match path {
            IoPath::Passthrough => {
                self.passthrough_handles = self.passthrough_handles.saturating_sub(1);
                if self.passthrough_handles == 0 {
                    self.passthrough = None;
                }
            }
            IoPath::Journaled => self.journaled_handles = self.journaled_handles.saturating_sub(1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_only_opens_pass_through_unless_ferry_holds_the_inode() {
        let mut s = OpenState::default();
        assert_eq!(s.choose(false, false), IoPath::Passthrough);
        s.opened(IoPath::Journaled);
        assert_eq!(s.choose(false, false), IoPath::Journaled);
        s.released(IoPath::Journaled);
        assert_eq!(s.choose(false, false), IoPath::Passthrough);
    }

    #[test]
    fn in_place_writers_go_through_ferry_unless_passthrough_is_active() {
        let mut s = OpenState::default();
        assert_eq!(s.choose(true, false), IoPath::Journaled);
        assert_eq!(s.choose(true, true), IoPath::Passthrough);
        s.opened(IoPath::Passthrough);
        assert_eq!(s.choose(true, false), IoPath::Passthrough);
    }

    #[test]
    fn the_passthrough_file_lives_while_a_passthrough_handle_does() {
        let mut s = OpenState::default();
        let token: BackingToken = Arc::new(7u32);
        let file = Arc::new(tempfile::tempfile().unwrap());
        s.passthrough(|| Ok((file.clone(), token.clone()))).unwrap();
        s.opened(IoPath::Passthrough);
        let again = s
            .passthrough(|| panic!("must reuse the registered file"))
            .unwrap();
        assert!(Arc::ptr_eq(&again.0, &file));
        s.released(IoPath::Passthrough);
        assert_eq!(
            Arc::strong_count(&token),
            2,
            "only the test and `again` hold it"
        );
    }
}
