//! Per-file state shared with the mount: the durable-dirty flag and the
//! pending (not yet recorded) byte ranges. The write hot path touches only
//! this, never the journal's global table lock.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, Ordering};

use parking_lot::{Mutex, RwLock, RwLockReadGuard};

use crate::id::FileId;
use crate::record::ByteRange;

/// The file may change only after a durable `Dirty` (or `Rewritten`).
pub(crate) const CLEAN: u8 = 0;
/// One thread is recording `Dirty` and waiting for it to be durable; others
/// wait for it to finish rather than record it twice.
pub(crate) const MARKING: u8 = 1;
/// The journal durably holds "this file is dirty".
pub(crate) const DIRTY: u8 = 2;

/// Pending ranges are kept sorted and disjoint. Past this many, the two
/// closest are merged: the set may then cover bytes that were not written
/// (harmless: they are re-sent unchanged), and it never grows unbounded.
const MAX_RANGES: usize = 256;

/// The journal's state of one file, shared via `Arc` between the journal and
/// the mount's open handles.
pub struct FileState {
    id: FileId,
    pub(crate) state: AtomicU8,
    /// Rewritten since it was last clean: ranges add nothing.
    pub(crate) rewritten: AtomicBool,
    /// Lock order: taken after the journal's table lock, never before it.
    pub(crate) pending: Mutex<Pending>,
    /// Held shared by every change through the mount, from recording it to
    /// making it (see [`FileState::change_guard`]); held exclusively by a
    /// push while it reads the file (`Journal::freeze`), so what it reads
    /// holds every change recorded so far and none half made.
    /// Lock order: before the table lock.
    pub(crate) changes: Arc<RwLock<()>>,
    /// Open handles that write without ferry seeing the writes (kernel
    /// passthrough): while any is open, a push cannot take the file clean.
    pub(crate) unjournaled_writers: AtomicU32,
}

#[derive(Default)]
pub(crate) struct Pending {
    pub ranges: Vec<ByteRange>,
    /// The file's id sits in the journal's pending queue, so the ranges will
    /// be emitted without queueing it again.
    pub queued: bool,
}

impl FileState {
    pub(crate) fn new(id: FileId, dirty: bool, rewritten: bool) -> FileState {
        FileState {
            id,
            state: AtomicU8::new(if dirty { DIRTY } else { CLEAN }),
            rewritten: AtomicBool::new(rewritten),
            pending: Mutex::new(Pending::default()),
            changes: Arc::new(RwLock::new(())),
            unjournaled_writers: AtomicU32::new(0),
        }
    }

    /// Hold across a change through the mount: from recording it
    /// (`note_write`, `truncate`, `mark_rewritten`) until it is made on the
    /// backing file, and, for an open that will write unseen, until the
    /// handle is counted by [`unjournaled_writer_opened`](Self::unjournaled_writer_opened).
    pub fn change_guard(&self) -> RwLockReadGuard<'_, ()> {
        self.changes.read()
    }

    /// A handle that writes through kernel passthrough was opened.
    pub fn unjournaled_writer_opened(&self) {
        self.unjournaled_writers.fetch_add(1, Ordering::AcqRel);
    }

    /// ... and closed.
    pub fn unjournaled_writer_closed(&self) {
        self.unjournaled_writers.fetch_sub(1, Ordering::AcqRel);
    }

    pub fn id(&self) -> FileId {
        self.id
    }

    /// The journal durably holds that this file is dirty.
    pub fn is_dirty(&self) -> bool {
        self.state.load(Ordering::Acquire) == DIRTY
    }
}

impl std::fmt::Debug for FileState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileState")
            .field("id", &self.id)
            .field("dirty", &self.is_dirty())
            .finish()
    }
}

impl Pending {
    /// Adds a range, merging it with those it overlaps or touches.
    /// Allocates only while the set grows towards `MAX_RANGES`.
    pub fn add(&mut self, r: ByteRange) {
        if r.len == 0 {
            return;
        }
        let (start, end) = (r.offset, r.end());
        // First range that ends at or after our start: it may merge with us.
        let i = self.ranges.partition_point(|x| x.end() < start);
        let mut j = i;
        let (mut lo, mut hi) = (start, end);
        while j < self.ranges.len() && self.ranges[j].offset <= end {
            lo = lo.min(self.ranges[j].offset);
            hi = hi.max(self.ranges[j].end());
            j += 1;
        }
        let merged = ByteRange {
            offset: lo,
            len: hi - lo,
        };
        if i == j {
            self.ranges.insert(i, merged);
        } else {
            self.ranges[i] = merged;
            self.ranges.drain(i + 1..j);
        }
        if self.ranges.len() > MAX_RANGES {
            let k = (0..self.ranges.len() - 1)
                .min_by_key(|&k| self.ranges[k + 1].offset - self.ranges[k].end())
                .expect("more than one range");
            let end = self.ranges[k + 1].end();
            self.ranges[k].len = end - self.ranges[k].offset;
            self.ranges.remove(k + 1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn br(offset: u64, len: u64) -> ByteRange {
        ByteRange { offset, len }
    }

    #[test]
    fn coalesces_overlapping_and_adjacent() {
        let mut p = Pending::default();
        p.add(br(10, 5));
        p.add(br(0, 5));
        p.add(br(5, 5));
        assert_eq!(p.ranges, vec![br(0, 15)]);
        p.add(br(100, 1));
        p.add(br(50, 60));
        assert_eq!(p.ranges, vec![br(0, 15), br(50, 60)]);
    }

    proptest! {
        #[test]
        fn covers_every_written_byte(writes in proptest::collection::vec((0u64..4096, 1u64..64), 1..400)) {
            let mut p = Pending::default();
            for &(o, l) in &writes {
                p.add(br(o, l));
            }
            prop_assert!(p.ranges.len() <= MAX_RANGES);
            for w in p.ranges.windows(2) {
                prop_assert!(w[0].end() < w[1].offset, "sorted and disjoint: {:?}", w);
            }
            for &(o, l) in &writes {
                prop_assert!(p.ranges.iter().any(|r| r.offset <= o && o + l <= r.end()));
            }
        }
    }
}
