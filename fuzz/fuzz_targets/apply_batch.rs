//! The applier on hostile batches: whatever a batch holds, applying it to a
//! replica must not panic or hang, must never change anything outside the
//! replica root (not even through the symlinks the replica holds), and must
//! leave the replica and its state as the protocol promises.
//!
//! Each input gets a fresh temporary directory (under `TMPDIR`) holding a
//! replica `r/` with a small fixed tree (`replicator::fuzz_scene::populate`,
//! with the `fuzzing` feature) and a sibling
//! `outside/` that `r/out` points to. The input is applied as a batch to
//! `r/`, and then:
//!
//! - `outside/` is exactly as before (names, types, modes, owners, sizes,
//!   link counts, times but atime, contents, symlink targets, xattrs), and
//!   nothing but `r/`, `outside/` and the state dir `.r.ferry/` exists in the
//!   temporary directory;
//! - if the apply succeeded: `staging/` is empty, no commit log or marker is
//!   left, `applied` holds the batch's `to_seq`, and applying the same batch
//!   again is skipped and changes nothing;
//! - if the batch was refused (a damaged batch, an operation that does not
//!   fit the replica, a base mismatch, a sequence mismatch): the replica is
//!   exactly as before and `staging/` is empty ("nothing was applied");
//! - a commit step that fails after staging accepted the batch, or a state
//!   error, is a finding: the model of the replica the stager keeps let
//!   through something the filesystem refused, and the replica is left
//!   half-committed.
//!
//! **Resealing.** Every frame of a batch carries a check and the
//! trailer a hash of the whole batch, so almost every mutation of a real
//! batch would be refused by the decoder before the applier sees it (the
//! decoder itself is `batch_decode`'s to fuzz). The target therefore walks
//! the input's frames and writes the header and every operation that
//! decodes again with `BatchWriter`, which computes the checks, the counts
//! and the trailer: a mutated operation reaches the applier. From the first
//! frame that does not make a batch on, the input's bytes follow as they
//! are (a truncated batch stays truncated, a bad operation stays bad). On
//! its first input the target checks that a well-formed batch comes out of
//! this unchanged, so that a change of the format it does not follow is a
//! crash rather than a fuzzer that silently only reaches the decoder.
//!
//! **Device nodes.** The fuzzer runs as root, so a `Mknod` of a character
//! or block device would make a real device node (a disk, `/dev/mem`) in
//! the temporary directory, and an applier bug that wrote to it would write
//! to the device. The target rewrites the `rdev` of such nodes to 0 (no
//! device) before applying.
//!
//! The seed corpus (`corpus/apply_batch/`) is made by the ignored test
//! `write_apply_fuzz_seed_corpus` in `replicator/src/batch/tests.rs`, for
//! the same tree.
#![no_main]

use std::fs;
use std::path::Path;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use replicator::apply::{ApplyError, ApplyOptions, apply, read_applied};
use replicator::batch::{BatchHeader, BatchReader, BatchWriter, MAGIC, Op, RelPath};
use replicator::fuzz_scene::{HEADER, OP, TRAILER, defuse, next_frame, populate, snapshot};

/// The input as a batch the decoder's checks let through (see the module
/// docs): its header and the operations that decode are written again with
/// `BatchWriter`, so the preamble, every frame check and the trailer are
/// right, however the format's current version computes them. Where the
/// input stops being a batch (a frame cut off, one that does not decode,
/// one that breaks a rule the writer checks as the reader does), its bytes
/// from there on follow as they are: the applier gets a batch that goes
/// wrong at that point. A well-formed batch comes out as it went in.
fn reseal(data: &[u8]) -> Vec<u8> {
    let header = data
        .get(..8)
        .filter(|m| *m == MAGIC)
        .and_then(|_| next_frame(data.get(12..)?))
        .filter(|(kind, _, _)| *kind == HEADER)
        .and_then(|(_, payload, rest)| {
            let (h, []) = postcard::take_from_bytes::<BatchHeader>(payload).ok()? else {
                return None;
            };
            Some((h, rest))
        });
    let Some((header, rest)) = header else {
        return data.to_vec();
    };
    let mut out = Vec::new();
    let rest = match BatchWriter::new(&mut out, header) {
        Ok(writer) => rewrite(writer, rest),
        Err(_) => return data.to_vec(),
    };
    out.extend_from_slice(rest);
    out
}

/// Writes the frames at the start of `rest` again with `writer` for as
/// long as they make a batch; returns the bytes left over (those after the
/// trailer, once it is written).
fn rewrite<'a>(mut writer: BatchWriter<&mut Vec<u8>>, mut rest: &'a [u8]) -> &'a [u8] {
    while let Some((kind, payload, after)) = next_frame(rest) {
        match kind {
            OP => {
                let Ok((mut op, [])) = postcard::take_from_bytes::<Op>(payload) else {
                    return rest;
                };
                defuse(&mut op);
                if writer.push(&op).is_err() {
                    return rest;
                }
            }
            TRAILER => return if writer.finish().is_ok() { after } else { rest },
            _ => return rest,
        }
        rest = after;
    }
    rest
}

/// `reseal` must track the format: a batch `BatchWriter` makes comes out
/// as it went in, and one with a damaged frame check or trailer is
/// repaired. Checked once, on the first input: a format change that
/// `reseal` does not follow would otherwise only make every input fail
/// to decode, silently.
fn check_reseal() {
    static CHECKED: OnceLock<()> = OnceLock::new();
    CHECKED.get_or_init(|| {
        let header = BatchHeader {
            from_seq: 0,
            to_seq: 1,
            op_count: 1,
            content_bytes: 0,
            ..BatchHeader::default()
        };
        let mut w = BatchWriter::new(Vec::new(), header).expect("header");
        w.push(&Op::Mkdir {
            path: RelPath::parse(b"d").expect("a path"),
            mode: 0o755,
        })
        .expect("op");
        let batch = w.finish().expect("trailer").0;
        assert_eq!(reseal(&batch), batch, "reseal changed a well-formed batch");
        let mut damaged = batch.clone();
        let n = damaged.len();
        damaged[n - 1] ^= 1; // the trailer's check
        damaged[n - 20] ^= 1; // the trailer's hash
        assert_eq!(reseal(&damaged), batch, "reseal did not repair a batch");
    });
}

fn staging_is_empty(state: &Path) -> bool {
    fs::read_dir(state.join("staging")).map_or(true, |mut d| d.next().is_none())
}

fn commit_is_clean(state: &Path) -> bool {
    fs::read_dir(state.join("commit")).map_or(true, |mut d| d.next().is_none())
}

/// Whether `FERRY_FUZZ_PRINT` is set: then the target prints the header
/// and the operations of each (resealed) input, as far as they decode, and
/// the outcome (how to turn an artifact into a regression test).
fn printing() -> bool {
    static PRINT: OnceLock<bool> = OnceLock::new();
    *PRINT.get_or_init(|| std::env::var_os("FERRY_FUZZ_PRINT").is_some())
}

fn print(batch: &[u8]) {
    if !printing() {
        return;
    }
    match BatchReader::new(batch) {
        Ok(mut reader) => {
            eprintln!("{:?}", reader.header());
            loop {
                match reader.next_op() {
                    Ok(Some(op)) => eprintln!("{op:?}"),
                    Ok(None) => break,
                    Err(e) => {
                        eprintln!("{e}");
                        break;
                    }
                }
            }
        }
        Err(e) => eprintln!("{e}"),
    }
}

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().expect("tempdir");
    let (r, outside) = populate(dir.path());
    let state = dir.path().join(".r.ferry");
    let outside_before = snapshot(&outside);
    let replica_before = snapshot(&r);
    check_reseal();
    let batch = reseal(data);
    print(&batch);

    let result = apply(&r, &batch[..], &ApplyOptions::default());
    if printing() {
        eprintln!("=> {result:?}");
    }

    let mut names: Vec<_> = fs::read_dir(dir.path())
        .expect("readdir")
        .map(|e| e.expect("dir entry").file_name())
        .collect();
    names.sort();
    let allowed = [".r.ferry", "outside", "r"];
    assert!(
        names.iter().all(|n| allowed.iter().any(|a| n == *a)),
        "something was made beside the replica: {names:?} ({result:?})"
    );
    assert!(
        snapshot(&outside) == outside_before,
        "outside/ changed: {result:?}"
    );

    match result {
        Ok(report) => {
            assert!(staging_is_empty(&state), "staging/ left behind: {report:?}");
            assert!(commit_is_clean(&state), "commit/ left behind: {report:?}");
            let applied = read_applied(&r).expect("read applied").expect("applied");
            assert_eq!(applied.seq, report.to_seq, "{report:?}");
            let replica_after = snapshot(&r);
            let again = apply(&r, &batch[..], &ApplyOptions::default())
                .expect("the same batch again is skipped");
            assert!(again.skipped, "the same batch was applied twice: {again:?}");
            assert!(
                snapshot(&r) == replica_after,
                "a skipped batch changed the replica"
            );
            assert!(snapshot(&outside) == outside_before, "outside/ changed");
        }
        // Refused before anything was committed: "nothing was applied".
        Err(
            ref e @ (ApplyError::Batch(_)
            | ApplyError::Op { .. }
            | ApplyError::BaseMismatch { .. }
            | ApplyError::Gap { .. }
            | ApplyError::Overlap { .. }
            | ApplyError::WrongSource { .. }
            | ApplyError::WrongReplica { .. }),
        ) => {
            assert!(
                snapshot(&r) == replica_before,
                "a refused batch changed the replica: {e}"
            );
            assert!(staging_is_empty(&state), "staging/ left behind: {e}");
        }
        Err(e) => panic!("the applier failed after accepting the batch: {e}"),
    }
});
