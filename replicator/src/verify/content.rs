//! Hashing file content with blake3, the replica's copy alongside the
//! source's.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

use super::VerifyError;
use super::entry::Entry;

/// Read size: large enough that a big file costs few syscalls.
const BUF_SIZE: usize = 1 << 20;

/// Files at least this large are hashed on two threads, one per side: the
/// two copies are often on different disks, and blake3 on one core is
/// slower than a fast disk.
const PARALLEL_MIN: u64 = 4 << 20;

/// Reusable read buffers, one per side, so that hashing many small files
/// does not allocate for each.
pub(super) struct Hashers {
    source: Vec<u8>,
    replica: Vec<u8>,
}

/// One file to hash: its path and what `lstat` said about it.
pub(super) struct Target<'a> {
    pub path: &'a Path,
    pub entry: &'a Entry,
}

type HashResult = Result<blake3::Hash, VerifyError>;

impl Hashers {
    pub fn new() -> Hashers {
        Hashers {
            source: Vec::new(),
            replica: Vec::new(),
        }
    }

    /// Hashes both files; each result stands alone (one side's error does
    /// not hide the other's).
    pub fn hash_pair(
        &mut self,
        source: Target<'_>,
        replica: Target<'_>,
    ) -> (HashResult, HashResult) {
        let (sbuf, rbuf) = (&mut self.source, &mut self.replica);
        if source.entry.size >= PARALLEL_MIN {
            std::thread::scope(|s| {
                let other = s.spawn(|| hash_file(&replica, rbuf));
                let mine = hash_file(&source, sbuf);
                // A panic on the other thread is a bug: pass it on.
                let theirs = other
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
                (mine, theirs)
            })
        } else {
            (hash_file(&source, sbuf), hash_file(&replica, rbuf))
        }
    }
}

/// The blake3 hash of the regular file `target`. Fails with
/// [`VerifyError::Changed`] when the file opened is not the one `lstat`
/// saw, or its length changed while it was read.
fn hash_file(target: &Target<'_>, buf: &mut Vec<u8>) -> HashResult {
    let path = target.path;
    let mut file = open(path).map_err(VerifyError::io("opening", path))?;
    let meta = file
        .metadata()
        .map_err(VerifyError::io("reading metadata of", path))?;
    if meta.dev() != target.entry.dev || meta.ino() != target.entry.ino || !meta.is_file() {
        return Err(VerifyError::Changed {
            path: path.to_path_buf(),
        });
    }
    if buf.len() < BUF_SIZE {
        buf.resize(BUF_SIZE, 0);
    }
    let mut hasher = blake3::Hasher::new();
    let mut total = 0u64;
    loop {
        let n = match file.read(buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(VerifyError::io("reading", path)(e)),
        };
        hasher.update(&buf[..n]);
        total += n as u64;
    }
    if total != target.entry.size {
        return Err(VerifyError::Changed {
            path: path.to_path_buf(),
        });
    }
    Ok(hasher.finalize())
}

/// Opens for reading without following a symlink, and without blocking
/// should the entry have been replaced by a FIFO since it was examined.
/// O_NOATIME keeps verify from touching atimes (allowed to the owner and to
/// root; anyone else opens without it).
fn open(path: &Path) -> io::Result<File> {
    let flags = libc::O_NOFOLLOW | libc::O_NONBLOCK;
    let opened = File::options()
        .read(true)
        .custom_flags(flags | libc::O_NOATIME)
        .open(path);
    match opened {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
            File::options().read(true).custom_flags(flags).open(path)
        }
        other => other,
    }
}
