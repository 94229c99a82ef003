//! The content of new staged files: hashed as it is written, checked
//! against the hash the batch gives it, and, for the many small files of a
//! seed, written on a thread beside the stager.
//!
//! A seed of 100,000 small files made the receiver's one thread the
//! critical path of a push, the sender and ssh waiting on it. About a third
//! of its time per file is the model and the calls that make the file
//! (`openat`, `fstat`); the rest is writing the content (most of it the
//! kernel filling fresh page-cache pages), hashing and checking it, and
//! giving the file its mode. The stager keeps the first part, so that every
//! operation is still checked, and every entry made, in batch order, and
//! hands the rest to the [`Writer`]. What that asks of the stager:
//!
//! - a file handed over has no tree in the model until it is collected:
//!   an operation that reads a staged file's content or tree, or sets a
//!   handed file's metadata, first waits for every handed file
//!   ([`Writer::wait`]);
//! - a failure names the operation that handed the file over, and when the
//!   stager fails later in the batch the earlier failure is the one
//!   reported: errors come in batch order, as when files were written in
//!   line;
//! - the content handed over and not yet written is bounded
//!   ([`IN_FLIGHT_MAX`] bytes), so a hostile batch cannot grow memory
//!   through it.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::sync::mpsc;
use std::thread::JoinHandle;

use nix::sys::stat::{Mode, fchmod};

use super::ApplyError;
use super::fsops::describe;
use crate::batch::{Content, Hash, RelPath};
use crate::tree::{ContentTree, LEAF, TreeBuilder};

/// New files up to this many data bytes are handed to the writer; larger
/// ones are few, and their cost is the bytes, not the file.
const HANDED_MAX: u64 = 1 << 20;

/// New files a batch writes in line before it starts the writer: a batch
/// of a few files does not pay for a thread. The unit tests and the fuzz
/// targets hand over every file, so that the whole applier suite and
/// every fuzzed batch run through the writer (the end-to-end tests, with
/// the real value, through both).
#[cfg(not(any(test, feature = "fuzzing")))]
pub(super) const WRITTEN_IN_LINE: u64 = 64;
#[cfg(any(test, feature = "fuzzing"))]
pub(super) const WRITTEN_IN_LINE: u64 = 0;

/// The most content handed over and not yet written.
const IN_FLIGHT_MAX: u64 = 16 << 20;

/// Zeros to hash for the holes of content written piece by piece.
static ZEROS: [u8; 64 << 10] = [0; 64 << 10];

/// The tree of a staged file's content, hashed as its pieces are written
/// in increasing offsets (the gaps between them are holes, hashed as
/// zeros), so that the file is not read back.
#[derive(Default)]
pub(super) struct Hashed {
    tree: TreeBuilder,
    at: u64,
    /// A piece came before the end of an earlier one: read it back.
    out_of_order: bool,
}

impl Hashed {
    pub fn piece(&mut self, offset: u64, data: &[u8]) {
        if offset < self.at {
            self.out_of_order = true;
            return;
        }
        self.fill_to(offset);
        self.tree.update(data);
        self.at = offset + data.len() as u64;
    }

    fn fill_to(&mut self, offset: u64) {
        while self.at < offset {
            let n = (offset - self.at).min(ZEROS.len() as u64);
            self.tree.update(&ZEROS[..n as usize]);
            self.at += n;
        }
    }

    /// Where the pieces written so far end.
    pub fn end(&self) -> u64 {
        self.at
    }

    /// Whether the pieces came in increasing offsets (so far).
    pub fn in_order(&self) -> bool {
        !self.out_of_order
    }

    /// The tree of content of `size` bytes; `None` if it must be read back.
    fn finish(mut self, size: u64) -> Option<ContentTree> {
        if self.out_of_order || self.at > size {
            return None;
        }
        self.fill_to(size);
        Some(self.tree.finish())
    }
}

/// Sizes the staged file whose data has been written and checks its
/// content (hashed as it was written, or read back) against `result`: its
/// tree, or why not.
pub(super) fn finish_content(
    file: &File,
    size: u64,
    result: Hash,
    content: Hashed,
) -> Result<ContentTree, String> {
    if content.end() != size {
        // A trailing hole (or pieces out of order).
        file.set_len(size)
            .map_err(|e| format!("sizing the staged file: {e}"))?;
    }
    let tree = match content.finish(size) {
        Some(t) => t,
        None => ContentTree::build(size, |i, buf| file.read_exact_at(buf, i * LEAF))
            .map_err(|e| format!("rereading: {e}"))?,
    };
    if tree.root() != result {
        return Err("the content does not match its result hash".into());
    }
    Ok(tree)
}

/// Writes the whole content of a new, empty staged file, checks it against
/// `result` and gives the file `mode`: its tree, or why not.
pub(super) fn write_new_file(
    file: &File,
    content: &Content,
    mode: u32,
    result: Hash,
) -> Result<ContentTree, String> {
    let mut hashed = Hashed::default();
    content
        .for_each_piece(|off, piece| {
            file.write_all_at(piece, off)?;
            hashed.piece(off, piece);
            Ok(())
        })
        .map_err(|e| format!("writing the staged file: {e}"))?;
    let tree = finish_content(file, content.size(), result, hashed)?;
    fchmod(file.as_fd(), Mode::from_bits_retain(mode))
        .map_err(|e| format!("setting the mode: {}", describe(e)))?;
    Ok(tree)
}

/// A new file handed to the writer: its staged file, made and installed in
/// the model by the stager, and what `write_new_file` needs.
pub(super) struct Job {
    pub id: u32,
    pub file: File,
    pub content: Content,
    pub mode: u32,
    pub result: Hash,
    /// The `CreateFile` that made it (frame number, path), for errors.
    pub index: u64,
    pub path: RelPath,
}

/// A handed file, written (its tree) or not (why).
struct Done {
    id: u32,
    bytes: u64,
    tree: Result<ContentTree, ApplyError>,
}

/// The thread that writes handed files, in the order they were handed.
pub(super) struct Writer {
    jobs: Option<mpsc::Sender<Job>>,
    done: mpsc::Receiver<Done>,
    thread: Option<JoinHandle<()>>,
    /// Files handed over and not yet collected, and their data bytes.
    handed: HashSet<u32>,
    bytes: u64,
}

impl Writer {
    /// The writer's thread, or `None` if the system refuses one (files are
    /// then written in line).
    pub fn start() -> Option<Writer> {
        let (jobs, todo) = mpsc::channel::<Job>();
        let (finished, done) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("ferry-new-files".into())
            .spawn(move || {
                for job in todo {
                    let bytes = job.content.data_len();
                    let tree = write_new_file(&job.file, &job.content, job.mode, job.result)
                        .map_err(|reason| ApplyError::Op {
                            index: job.index,
                            op: "CreateFile",
                            path: job.path.to_string(),
                            reason,
                        });
                    if finished
                        .send(Done {
                            id: job.id,
                            bytes,
                            tree,
                        })
                        .is_err()
                    {
                        return;
                    }
                }
            })
            .ok()?;
        Some(Writer {
            jobs: Some(jobs),
            done,
            thread: Some(thread),
            handed: HashSet::new(),
            bytes: 0,
        })
    }

    /// Whether the writer takes a file of this content.
    pub fn takes(content: &Content) -> bool {
        content.data_len() <= HANDED_MAX
    }

    /// Whether staged file `id` was handed over and is not collected yet.
    pub fn holds(&self, id: u32) -> bool {
        self.handed.contains(&id)
    }

    /// Hands `job` over, first collecting written files (waiting for them
    /// while too much is in flight) into `trees`, by staged id.
    pub fn hand(
        &mut self,
        job: Job,
        trees: &mut HashMap<u32, ContentTree>,
    ) -> Result<(), ApplyError> {
        let bytes = job.content.data_len();
        self.collect(trees, |w| w.bytes + bytes > IN_FLIGHT_MAX)?;
        self.handed.insert(job.id);
        self.bytes += bytes;
        let jobs = self.jobs.as_ref().expect("only dropped when the writer is");
        if jobs.send(job).is_err() {
            self.raise_panic();
        }
        Ok(())
    }

    /// Collects every file handed over into `trees`, waiting for those not
    /// yet written; the first failure among them is returned, after all
    /// are collected.
    pub fn wait(&mut self, trees: &mut HashMap<u32, ContentTree>) -> Result<(), ApplyError> {
        self.collect(trees, |w| !w.handed.is_empty())
    }

    /// Collects written files, waiting while `more` holds; stops at the
    /// first failure unless waiting for all.
    fn collect(
        &mut self,
        trees: &mut HashMap<u32, ContentTree>,
        more: impl Fn(&Writer) -> bool,
    ) -> Result<(), ApplyError> {
        let mut failed = None;
        loop {
            let done = if more(self) {
                match self.done.recv() {
                    Ok(d) => d,
                    Err(mpsc::RecvError) => self.raise_panic(),
                }
            } else {
                match self.done.try_recv() {
                    Ok(d) => d,
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => self.raise_panic(),
                }
            };
            self.handed.remove(&done.id);
            self.bytes -= done.bytes;
            match done.tree {
                Ok(tree) => {
                    trees.insert(done.id, tree);
                }
                Err(e) => {
                    failed.get_or_insert(e);
                    if !more(self) {
                        break;
                    }
                }
            }
        }
        failed.map_or(Ok(()), Err)
    }

    /// The thread ended while it had work: it panicked.
    fn raise_panic(&mut self) -> ! {
        let thread = self.thread.take().expect("joined only here and on drop");
        match thread.join() {
            Err(panic) => std::panic::resume_unwind(panic),
            Ok(()) => unreachable!("the writer's thread ends only when its jobs end"),
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        // Its loop ends once the jobs are done and the channel closed.
        self.jobs = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
