//! Asking the kernel for the source's new files before the planner reads
//! them.
//!
//! The planner reads new files one after another. When they are not in the
//! page cache (the first copy of a tree usually finds them on disk), each
//! read waits for the disk, which then serves one small read at a time:
//! a seed over ssh of 100,000 small files from a cold cache took 12.5 s
//! against rsync's 10.3 to 11.4 s (4.4 to 4.6 s with this, against 9.5 to
//! 10.9 s; docs/BENCHMARKS.md). The planner's first read of each file
//! does not wait (`preadv2(RWF_NOWAIT)`, `source::read_cached`); when it
//! would have, a thread walks the steps after it and asks for the content
//! of their new files (`posix_fadvise(WILLNEED)` starts the reads without
//! waiting for them; opening the file reads its inode), [`AHEAD`] steps
//! beyond the read that waited, so that the disk has many reads queued and
//! the planner finds the pages there.
//!
//! It only asks: what it opens is never read by it, changes nothing (the
//! source's atime stays where `O_NOATIME` is permitted, and `WILLNEED` does
//! not move it anyway), and an error just skips the file.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex};

use journal::{FileId, FileKind, InodeKey, NsStep};

use super::source::{Source, open_for_reading};

/// How many steps the reads run ahead of the planner's last read that
/// waited.
const AHEAD: usize = 512;

/// Larger files are read ahead by the kernel as the planner reads them;
/// asking for all of one at once would only fill memory.
const LARGEST: u64 = 4 << 20;

/// The steps the planner wants read ahead: from `from` up to `until`.
#[derive(Default)]
struct Wanted {
    from: usize,
    until: usize,
    stopped: bool,
}

/// What the planner tells the thread reading ahead. The thread works only
/// after a read of the planner's waited for the disk, on the next
/// [`AHEAD`] steps: when the files are in the page cache it asks for
/// nothing (asking costs an `lstat` and an `open` per file, a tenth of the
/// planner's own time per small file).
#[derive(Default)]
pub(super) struct Planner {
    wanted: Mutex<Wanted>,
    moved: Condvar,
}

impl Planner {
    /// The planner's read of step `i` waited for the disk: the files of the
    /// steps after it are asked for.
    pub fn missed(&self, i: usize) {
        self.tell(|w| {
            w.from = w.from.max(i + 1);
            w.until = w.until.max(i + 1 + AHEAD);
        });
    }

    /// Stops the read-ahead when dropped, however the planner ends (the
    /// scope it runs in waits for the thread).
    pub fn stopping(&self) -> Stopping<'_> {
        Stopping(self)
    }

    fn tell(&self, f: impl FnOnce(&mut Wanted)) {
        let mut wanted = self.wanted.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut wanted);
        self.moved.notify_all();
    }

    /// The first step from `next` on that is wanted, once there is one;
    /// `None` once the planner stopped.
    fn next(&self, next: usize) -> Option<usize> {
        let mut wanted = self.wanted.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if wanted.stopped {
                return None;
            }
            let i = next.max(wanted.from);
            if i < wanted.until {
                return Some(i);
            }
            wanted = self.moved.wait(wanted).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// Stops the read-ahead of a [`Planner`] when dropped.
pub(super) struct Stopping<'p>(&'p Planner);

impl Drop for Stopping<'_> {
    fn drop(&mut self) {
        self.0.tell(|w| w.stopped = true);
    }
}

/// Asks for the content of the new regular files of the steps `planner`
/// wants, in order, until it stops; `locate` is where a file is in the
/// source now (`Journal::locate`).
pub(super) fn run(
    steps: &[NsStep],
    locate: impl Fn(FileId) -> Option<(PathBuf, Option<InodeKey>)>,
    source: &Source,
    planner: &Planner,
) {
    let mut next = 0;
    while let Some(i) = planner.next(next) {
        let Some(step) = steps.get(i) else {
            return;
        };
        next = i + 1;
        let NsStep::Create {
            id,
            kind: FileKind::File,
            ..
        } = step
        else {
            continue;
        };
        let Some((path, key)) = locate(*id) else {
            continue;
        };
        // Only a regular file that is still the one the journal knows: an
        // open of a device node could do something.
        match source.stat(&path, key) {
            Ok(Some(md)) if md.is_file() && (1..=LARGEST).contains(&md.len()) => {
                ask(&source.path(&path), md.len());
            }
            _ => {}
        }
    }
}

/// Starts reading the `len` bytes of the file at `path` into the page cache.
fn ask(path: &Path, len: u64) {
    let Ok(file) = open_for_reading(path) else {
        return;
    };
    let _ = nix::fcntl::posix_fadvise(
        file.as_fd(),
        0,
        len as libc::off_t,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_WILLNEED,
    );
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::MetadataExt;

    use super::super::source::read_cached;
    use super::*;

    /// Whether `path` has pages in the page cache, being read or read
    /// (`cachestat(2)`, Linux 6.5; libc has no name for it).
    fn cached(path: &Path) -> bool {
        const SYS_CACHESTAT: libc::c_long = 451;
        let file = File::open(path).unwrap();
        let range = [0u64, 0]; // offset, length: all of it
        let mut stat = [0u64; 5]; // the first field counts the cached pages
        // SAFETY: both pointers are to live arrays of the layout the call takes.
        let rc = unsafe {
            libc::syscall(
                SYS_CACHESTAT,
                file.as_raw_fd(),
                range.as_ptr(),
                stat.as_mut_ptr(),
                0u32,
            )
        };
        assert_eq!(rc, 0, "cachestat: {}", std::io::Error::last_os_error());
        stat[0] > 0
    }

    /// Drops `path`'s pages from the page cache (written back first).
    fn evict(path: &Path) {
        let file = File::open(path).unwrap();
        file.sync_all().unwrap();
        nix::fcntl::posix_fadvise(
            file.as_fd(),
            0,
            0,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        )
        .unwrap();
    }

    fn create(id: u64) -> NsStep {
        NsStep::Create {
            id: FileId(id),
            kind: FileKind::File,
            path: PathBuf::from(format!("f{id}")),
            replaced: None,
        }
    }

    #[test]
    fn the_next_new_files_are_read_into_the_page_cache() {
        // On a disk (tmpfs pages cannot be dropped): /var/tmp, by the FHS.
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let source = Source::new(dir.path());
        let steps: Vec<NsStep> = (0..40).map(create).collect();
        for id in 0..40 {
            std::fs::write(dir.path().join(format!("f{id}")), vec![b'x'; 20_000]).unwrap();
        }
        // f7 is now another file than the journal's, f9 a FIFO: not opened.
        let moved = std::fs::metadata(dir.path().join("f8")).unwrap();
        std::fs::remove_file(dir.path().join("f9")).unwrap();
        nix::unistd::mkfifo(
            &dir.path().join("f9"),
            nix::sys::stat::Mode::from_bits_truncate(0o600),
        )
        .unwrap();
        for id in (0..40).filter(|id| *id != 9) {
            let f = dir.path().join(format!("f{id}"));
            evict(&f);
            assert!(!cached(&f), "f{id} stayed in the page cache");
        }
        let locate = |id: FileId| {
            let path = PathBuf::from(format!("f{}", id.0));
            let key = (id.0 == 7).then_some(InodeKey {
                dev: moved.dev(),
                ino: moved.ino(),
            });
            Some((path, key))
        };
        let planner = Planner::default();
        // The planner's read of f0 waited: the files after it are asked for.
        planner.missed(0);
        run(&steps, locate, &source, &planner);
        for id in (1..40).filter(|id| ![7, 9].contains(id)) {
            let f = dir.path().join(format!("f{id}"));
            assert!(cached(&f), "f{id} was not read ahead");
        }
        for not_asked in ["f0", "f7"] {
            assert!(!cached(&dir.path().join(not_asked)), "{not_asked}");
        }
    }

    #[test]
    fn a_read_of_a_file_not_in_the_page_cache_is_seen_to_wait() {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let f = dir.path().join("f");
        std::fs::write(&f, vec![b'x'; 20_000]).unwrap();
        let file = File::open(&f).unwrap();
        let mut buf = vec![0u8; 30_000];
        assert_eq!(read_cached(&file, &mut buf, 0).unwrap(), Some(20_000));
        evict(&f);
        assert_eq!(read_cached(&file, &mut buf, 0).unwrap(), None);
    }

    #[test]
    fn the_read_ahead_waits_for_a_read_that_waited_and_ends_with_the_planner() {
        let planner = Planner::default();
        std::thread::scope(|s| {
            let first = s.spawn(|| planner.next(0));
            planner.missed(10);
            assert_eq!(first.join().unwrap(), Some(11), "the step after the miss");
            assert_eq!(planner.next(11 + AHEAD - 1), Some(11 + AHEAD - 1));
            let later = s.spawn(|| planner.next(11 + AHEAD));
            planner.missed(100);
            assert_eq!(later.join().unwrap(), Some(11 + AHEAD), "further");
            let never = s.spawn(|| planner.next(101 + AHEAD));
            drop(planner.stopping());
            assert_eq!(never.join().unwrap(), None, "ended with the planner");
        });
    }
}
