//! The applier on hostile batches: whatever a batch holds, applying it to a
//! replica must not panic or hang, must never change anything outside the
//! replica root (not even through the symlinks the replica holds), and must
//! leave the replica and its state as the protocol promises.
//!
//! Each input gets a fresh temporary directory (under `TMPDIR`) holding a
//! replica `r/` with a small fixed tree (see [`populate`]) and a sibling
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
//! the tree [`populate`] makes: keep the two in step.
#![no_main]

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use replicator::apply::{ApplyError, ApplyOptions, apply, read_applied};
use replicator::batch::{BatchHeader, BatchReader, BatchWriter, MAGIC, NodeKind, Op, RelPath};

/// The replica's content, as `write_apply_fuzz_seed_corpus` expects it.
const A_TXT: &[u8] = b"hello, replica\n";
const B_TXT: &[u8] = b"world\n";
const C_TXT: &[u8] = b"deep\n";
const CANARY: &[u8] = b"canary: must never change\n";
const NESTED: &[u8] = b"nested outside\n";
/// `big.bin`: more than two 16 KiB leaves.
const BIG_LEN: usize = 40_000;

fn big() -> Vec<u8> {
    (0..BIG_LEN).map(|i| (i % 251) as u8).collect()
}

fn write(path: &Path, data: &[u8], mode: u32) {
    fs::write(path, data).expect("write a fixture file");
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod a fixture file");
}

/// Makes in `dir`:
///
/// ```text
/// r/a.txt          "hello, replica\n", 0644, xattr user.fuzz=1 (if supported)
/// r/a.link         hard link to a.txt
/// r/big.bin        40,000 bytes (i % 251), 0644
/// r/sub/           0755
/// r/sub/b.txt      "world\n", 0600
/// r/sub/deep/      0755
/// r/sub/deep/c.txt "deep\n", 0644
/// r/empty/         0755
/// r/out  ->        ../outside (out of the root)
/// r/in   ->        sub (a directory inside)
/// outside/canary   "canary: must never change\n", 0644
/// outside/nested/n.txt
/// ```
///
/// and returns `(r, outside)`.
fn populate(dir: &Path) -> (PathBuf, PathBuf) {
    let r = dir.join("r");
    let outside = dir.join("outside");
    for d in [&r, &r.join("sub"), &r.join("sub/deep"), &r.join("empty")] {
        fs::create_dir(d).expect("mkdir");
        fs::set_permissions(d, fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    fs::create_dir_all(outside.join("nested")).expect("mkdir outside");
    write(&r.join("a.txt"), A_TXT, 0o644);
    // Not every filesystem takes user xattrs; the seeds do not depend on it.
    let _ = xattr::set(r.join("a.txt"), "user.fuzz", b"1");
    fs::hard_link(r.join("a.txt"), r.join("a.link")).expect("link");
    write(&r.join("big.bin"), &big(), 0o644);
    write(&r.join("sub/b.txt"), B_TXT, 0o600);
    write(&r.join("sub/deep/c.txt"), C_TXT, 0o644);
    symlink("../outside", r.join("out")).expect("symlink out");
    symlink("sub", r.join("in")).expect("symlink in");
    write(&outside.join("canary"), CANARY, 0o644);
    write(&outside.join("nested/n.txt"), NESTED, 0o644);
    (r, outside)
}

/// What is observable of one entry, without following symlinks (atime
/// aside: reading a file moves it).
#[derive(Debug, PartialEq, Eq)]
struct Seen {
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    nlink: u64,
    ino: u64,
    rdev: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
    content: Option<Vec<u8>>,
    target: Option<PathBuf>,
    xattrs: Vec<(OsString, Option<Vec<u8>>)>,
}

/// Every entry below `root` (and `root` itself, as ""), by relative path.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, Seen> {
    fn walk(root: &Path, rel: PathBuf, out: &mut BTreeMap<PathBuf, Seen>) {
        let path = root.join(&rel);
        let md = fs::symlink_metadata(&path).expect("lstat");
        let ft = md.file_type();
        let mut xattrs: Vec<_> = xattr::list(&path)
            .map(|names| {
                names
                    .map(|n| {
                        let v = xattr::get(&path, &n).ok().flatten();
                        (n, v)
                    })
                    .collect()
            })
            .unwrap_or_default();
        xattrs.sort();
        // Only regular files are read: opening a FIFO would block, a
        // device node must not be opened at all.
        let content = ft
            .is_file()
            .then(|| fs::read(&path).expect("read a regular file"));
        let target = ft
            .is_symlink()
            .then(|| fs::read_link(&path).expect("readlink"));
        out.insert(
            rel.clone(),
            Seen {
                mode: md.mode(),
                uid: md.uid(),
                gid: md.gid(),
                size: md.size(),
                nlink: md.nlink(),
                ino: md.ino(),
                rdev: md.rdev(),
                mtime: (md.mtime(), md.mtime_nsec()),
                ctime: (md.ctime(), md.ctime_nsec()),
                content,
                target,
                xattrs,
            },
        );
        if ft.is_dir() {
            for e in fs::read_dir(&path).expect("readdir") {
                walk(root, rel.join(e.expect("dir entry").file_name()), out);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, PathBuf::new(), &mut out);
    out
}

/// The frame kinds (docs/FORMAT.md, "Frames").
const HEADER: u8 = 1;
const OP: u8 = 2;
const TRAILER: u8 = 3;

/// The next frame of `rest`, as the format lays frames out (`kind`, `len`
/// as u32 LE, the payload, an 8-byte check): its kind, its payload, and
/// what follows it. `None` if `rest` does not start with a whole frame of
/// a known kind.
fn next_frame(rest: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let kind = *rest.first()?;
    let len = u32::from_le_bytes(rest.get(1..5)?.try_into().expect("4 bytes")) as usize;
    let payload = rest.get(5..5 + len)?;
    let after = rest.get(5 + len + 8..)?;
    (HEADER..=TRAILER)
        .contains(&kind)
        .then_some((kind, payload, after))
}

/// A device node's number is set to 0 (no device): see the module docs.
fn defuse(op: &mut Op) {
    if let Op::Mknod {
        kind: NodeKind::Char | NodeKind::Block,
        rdev,
        ..
    } = op
    {
        *rdev = 0;
    }
}

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
