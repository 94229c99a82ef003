//! The state directory's lock: `state_dir/journal.lock`, held with flock for
//! the life of the journal and holding the owner's pid for the error message.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use crate::error::JournalError;

pub(crate) struct LockFile {
    _lock: Flock<File>,
}

impl LockFile {
    pub fn acquire(state_dir: &Path) -> Result<LockFile, JournalError> {
        let path = state_dir.join("journal.lock");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| JournalError::io(&path, e))?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => {
                let mut f: &File = &lock;
                let pid = format!("{}\n", std::process::id());
                f.set_len(0)
                    .and_then(|()| f.rewind())
                    .and_then(|()| f.write_all(pid.as_bytes()))
                    .map_err(|e| JournalError::io(&path, e))?;
                Ok(LockFile { _lock: lock })
            }
            Err((mut file, Errno::EWOULDBLOCK)) => {
                let mut s = String::new();
                let holder = file
                    .read_to_string(&mut s)
                    .ok()
                    .and_then(|_| s.trim().parse().ok());
                Err(JournalError::Locked {
                    state_dir: state_dir.to_path_buf(),
                    holder,
                })
            }
            Err((_, errno)) => Err(JournalError::io(&path, errno.into())),
        }
    }
}
