//! Asking the kernel for the source's new files before the planner reads
//! them.
//!
//! The planner reads new files one after another. When they are not in the
//! page cache (the first copy of a tree usually finds them on disk), each
//! read waits for the disk, which then serves one small read at a time:
//! a seed over ssh of 100,000 small files from a cold cache took 12.5 s
//! against rsync's 10.3 to 11.4 s (4.5 to 4.9 s with this, against 8.5 to
//! 9.3 s; docs/BENCHMARKS.md). A thread walks the same steps ahead of the planner and asks for
//! the content of the next new files (`posix_fadvise(WILLNEED)` starts
//! their reads without waiting for them; opening the file reads its
//! inode), at most [`AHEAD`] steps ahead, so that the disk has many reads
//! queued and the planner finds the pages there.
//!
//! It only asks: what it opens is never read by it, changes nothing (the
//! source's atime stays where `O_NOATIME` is permitted, and `WILLNEED` does
//! not move it anyway), and an error just skips the file.

use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex};

use journal::{FileId, FileKind, InodeKey, NsStep};

use super::source::Source;

/// How many steps the reads run ahead of the planner.
const AHEAD: usize = 512;

/// Larger files are read ahead by the kernel as the planner reads them;
/// asking for all of one at once would only fill memory.
const LARGEST: u64 = 4 << 20;

/// The planner tells the read-ahead every this many steps where it is
/// (waking a thread is a system call).
const TELL_EVERY: usize = 64;

/// Where the planner is, shared with the thread reading ahead.
#[derive(Default)]
pub(super) struct Planner {
    /// The step the planner is at, and whether it stopped.
    at: Mutex<(usize, bool)>,
    moved: Condvar,
}

impl Planner {
    /// The planner is at step `i`.
    pub fn at(&self, i: usize) {
        if i.is_multiple_of(TELL_EVERY) {
            self.tell(|at| at.0 = i);
        }
    }

    /// The planner is past its last step (or failed): the read-ahead ends.
    pub fn stop(&self) {
        self.tell(|at| at.1 = true);
    }

    fn tell(&self, f: impl FnOnce(&mut (usize, bool))) {
        let mut at = self.at.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut at);
        self.moved.notify_all();
    }

    /// Waits until step `i` is within reach; false once the planner stopped.
    fn reach(&self, i: usize) -> bool {
        let mut at = self.at.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            match *at {
                (_, true) => return false,
                (planner, false) if i < planner + AHEAD => return true,
                _ => at = self.moved.wait(at).unwrap_or_else(|p| p.into_inner()),
            }
        }
    }
}

/// Asks for the content of each new regular file of `steps`, in order,
/// keeping within [`AHEAD`] steps of `planner`, until it stops; `locate`
/// is where a file is in the source now (`Journal::locate`).
pub(super) fn run(
    steps: &[NsStep],
    locate: impl Fn(FileId) -> Option<(PathBuf, Option<InodeKey>)>,
    source: &Source,
    planner: &Planner,
) {
    for (i, step) in steps.iter().enumerate() {
        let NsStep::Create {
            id,
            kind: FileKind::File,
            ..
        } = step
        else {
            continue;
        };
        if !planner.reach(i) {
            return;
        }
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
    let open = |extra: i32| {
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | extra)
            .open(path)
    };
    let file: File = match open(libc::O_NOATIME) {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => match open(0) {
            Ok(f) => f,
            Err(_) => return,
        },
        Ok(f) => f,
        Err(_) => return,
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
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::MetadataExt;

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
        run(&steps, locate, &source, &Planner::default());
        for id in (0..40).filter(|id| ![7, 9].contains(id)) {
            let f = dir.path().join(format!("f{id}"));
            assert!(cached(&f), "f{id} was not read ahead");
        }
        assert!(!cached(&dir.path().join("f7")));
    }

    #[test]
    fn the_read_ahead_keeps_within_reach_of_the_planner_and_ends_with_it() {
        let planner = Planner::default();
        assert!(planner.reach(AHEAD - 1));
        std::thread::scope(|s| {
            let far = s.spawn(|| planner.reach(AHEAD + 2 * TELL_EVERY));
            let never = s.spawn(|| planner.reach(10 * AHEAD));
            // Between two tellings nothing is told; the next one moves it.
            planner.at(TELL_EVERY + 1);
            planner.at(3 * TELL_EVERY);
            assert!(far.join().unwrap(), "reached once the planner moved");
            planner.stop();
            assert!(!never.join().unwrap(), "ended with the planner");
        });
        assert!(!planner.reach(0), "the planner stopped");
    }
}
