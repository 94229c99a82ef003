//! The receiving end of the protocol on a hostile sender: whatever bytes a
//! sender writes, `replicator::remote::receive` must return (an error or
//! not) without panicking or hanging, must never change anything outside
//! the replica root, and must leave the replica as it was unless it
//! committed a batch.
//!
//! The input is the whole stream a sender writes to a receiver (messages,
//! and the batches that follow `Batch`). Each input gets a fresh temporary
//! directory (under `TMPDIR`) holding the replica `r/` of the `apply_batch`
//! target (the same tree: see [`populate`]) and a sibling `outside/` that
//! `r/out` points to. The replica's state also holds what earlier
//! connections that failed left in `kept/` (see [`keep`]): a complete file
//! (for `CreateFromKept`) and the start of a file a connection was cut off
//! in (for `ResumeFile`). The receiver serves the input with `r/` as the
//! replica of the empty name (any other name is refused, as the daemon
//! refuses a replica it does not serve), and then:
//!
//! - `outside/` is exactly as before (names, types, modes, owners, sizes,
//!   link counts, times but atime, contents, symlink targets, xattrs), and
//!   nothing but `r/`, `outside/` and the state dir `.r.ferry/` exists in the
//!   temporary directory;
//! - `staging/` is empty and no commit log or marker is left, whatever the
//!   outcome: a batch refused part way leaves nothing staged (the complete
//!   files it staged go to `kept/`), and a commit step that fails after
//!   staging accepted the batch is a finding, as in `apply_batch`;
//! - if the replica's `applied` state is what it was (no batch was
//!   committed), the replica is exactly as before, whether the receiver
//!   returned an error or not; once a batch was committed, only the checks
//!   above hold (the replica has changed, as it should); what `kept/`
//!   holds is state, not replica, and may change either way;
//! - if the receiver returned `Ok`, the sequence number it reports is the
//!   one in `applied`;
//! - what the receiver wrote back is its greeting and then well-formed
//!   messages, nothing else.
//!
//! **Resealing.** Frame checks and the trailer hash would stop almost
//! every mutation of a batch at the decoder, so the target rewrites the
//! stream before serving it: each message at the start of the input is
//! decoded (its four length bytes are skipped, whatever they say, and one
//! `ToReceiver` value is taken from what follows) and written again with
//! its true length; the batch after each `Batch` is written again with
//! `BatchWriter` as `apply_batch` does (header and every operation that
//! decodes; checks, counts and trailer computed). From the first point
//! where the input stops being messages and batches (a message that does
//! not decode, a batch frame cut off or refused by the writer) the input's
//! bytes follow as they are. A well-formed stream comes out as it went in
//! (checked on the first input). A message whose length field lies is
//! therefore only reached past that point; the message framing is small
//! and the unit tests of `replicator::remote` cover it.
//!
//! **Device nodes.** The fuzzer runs as root: the `rdev` of character and
//! block device nodes is rewritten to 0 (no device) before serving, so
//! that a bug cannot write to a real device (see `apply_batch`).
//!
//! The seed corpus (`corpus/receive/`) is made by the ignored test
//! `write_receive_fuzz_seed_corpus` in `replicator/src/remote/fuzz_seeds.rs`,
//! for the tree [`populate`] makes: keep the two in step.
#![no_main]

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use replicator::apply::{Partial, read_applied};
use replicator::batch::{
    BatchHeader, BatchReader, BatchWriter, Hash, MAGIC, NodeKind, Op, RelPath,
};
use replicator::remote::{GREETING, MAX_MESSAGE, PROTOCOL, ToReceiver, ToSender, receive};

/// The replica's content: `populate` of `apply_batch` (and of the test
/// that writes this target's seeds).
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

/// Makes in `dir` the tree of `apply_batch`'s `populate` (change both
/// together):
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

/// A complete file a batch that failed had staged, kept by its hash.
const KEPT: &[u8] = b"kept from a batch that failed\n";
/// `resumed.bin`: the file a connection was cut off in; the replica kept
/// its first `RESUMED_HAVE` bytes.
const RESUMED_SIZE: u64 = 50_000;
const RESUMED_HAVE: u64 = 20_000;

fn resumed() -> Vec<u8> {
    (0..RESUMED_SIZE).map(|i| (i * 7 % 256) as u8).collect()
}

/// Makes the state beside `r/` hold what connections that failed leave
/// behind (as `Stager::keep_complete` and `keep_partial` write it; the
/// test that writes the seeds does the same):
///
/// ```text
/// .r.ferry/kept/<blake3 of KEPT>  KEPT
/// .r.ferry/kept/partial           the first 20,000 bytes of resumed()
/// .r.ferry/kept/partial.meta      Partial { resumed.bin, 50,000, 20,000 }
/// ```
fn keep(state: &Path) {
    let kept = state.join("kept");
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&kept)
        .expect("mkdir kept");
    fs::write(kept.join(Hash::of(KEPT).to_string()), KEPT).expect("write a kept file");
    fs::write(kept.join("partial"), &resumed()[..RESUMED_HAVE as usize])
        .expect("write the partial file");
    let partial = Partial {
        path: RelPath::parse(b"resumed.bin").expect("a path"),
        size: RESUMED_SIZE,
        have: RESUMED_HAVE,
    };
    let meta = postcard::to_stdvec(&partial).expect("a Partial serializes");
    fs::write(kept.join("partial.meta"), meta).expect("write the partial's description");
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

/// Writes `msg` as the protocol frames it: `[len: u32 LE][postcard]`.
fn frame_message(out: &mut Vec<u8>, msg: &ToReceiver) {
    let payload = postcard::to_stdvec(msg).expect("a message always serializes");
    let len = u32::try_from(payload.len()).expect("a small message");
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&payload);
}

/// The input as a stream the receiver's checks let through as far as it
/// is one (see the module docs): messages framed with their true length,
/// batches written again with `BatchWriter`; from the first point where
/// it stops being a stream of messages and batches, the input's bytes as
/// they are.
fn reseal(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 64);
    let mut rest = data;
    // Four length bytes, whatever they say, then one message.
    while let Some((msg, after)) = rest
        .get(4..)
        .and_then(|p| postcard::take_from_bytes::<ToReceiver>(p).ok())
    {
        frame_message(&mut out, &msg);
        rest = after;
        if msg == ToReceiver::Batch {
            let (after, whole) = reseal_batch(&mut out, rest);
            rest = after;
            if !whole {
                break;
            }
        }
    }
    out.extend_from_slice(rest);
    out
}

/// Writes the batch at the start of `data` to `out` again (see
/// `apply_batch`'s `reseal`): its header and the operations that decode,
/// with `BatchWriter`. Returns the bytes after it and whether it was
/// whole (its trailer written); when it was not, the bytes returned are
/// those from the point where it stopped being a batch, and `out` holds
/// what was written up to there.
fn reseal_batch<'a>(out: &mut Vec<u8>, data: &'a [u8]) -> (&'a [u8], bool) {
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
    let Some((header, mut rest)) = header else {
        return (data, false);
    };
    let Ok(mut writer) = BatchWriter::new(&mut *out, header) else {
        return (data, false);
    };
    while let Some((kind, payload, after)) = next_frame(rest) {
        match kind {
            OP => {
                let Ok((mut op, [])) = postcard::take_from_bytes::<Op>(payload) else {
                    return (rest, false);
                };
                defuse(&mut op);
                if writer.push(&op).is_err() {
                    return (rest, false);
                }
            }
            TRAILER => {
                return match writer.finish() {
                    Ok(_) => (after, true),
                    Err(_) => (rest, false),
                };
            }
            _ => return (rest, false),
        }
        rest = after;
    }
    (rest, false)
}

/// `reseal` must track the protocol and the batch format: a stream a
/// sender writes comes out as it went in, and one with a wrong message
/// length or a damaged trailer is repaired. Checked once, on the first
/// input: a change of either that `reseal` does not follow would
/// otherwise only make every input stop early, silently.
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
        let mut stream = Vec::new();
        frame_message(
            &mut stream,
            &ToReceiver::Hello {
                protocol: PROTOCOL,
                replica: String::new(),
            },
        );
        frame_message(&mut stream, &ToReceiver::Batch);
        let at = stream.len();
        stream.extend_from_slice(&batch);
        frame_message(&mut stream, &ToReceiver::Done);
        assert_eq!(
            reseal(&stream),
            stream,
            "reseal changed a well-formed stream"
        );
        let mut damaged = stream.clone();
        damaged[0] ^= 0x40; // Hello's length
        let end = at + batch.len();
        damaged[end - 1] ^= 1; // the trailer's check
        damaged[end - 20] ^= 1; // the trailer's hash
        assert_eq!(reseal(&damaged), stream, "reseal did not repair a stream");
    });
}

/// Whether `FERRY_FUZZ_PRINT` is set: then the target prints the messages
/// and the batches (header and operations, as far as they decode) of each
/// resealed input, the receiver's answers and its outcome (how to turn an
/// artifact into a regression test).
fn printing() -> bool {
    static PRINT: OnceLock<bool> = OnceLock::new();
    *PRINT.get_or_init(|| std::env::var_os("FERRY_FUZZ_PRINT").is_some())
}

/// Prints the stream as the receiver will read it (only as far as it is
/// messages and batches).
fn print(stream: &[u8]) {
    if !printing() {
        return;
    }
    let mut rest = stream;
    while let Some(len) = rest.get(..4) {
        let len = u32::from_le_bytes(len.try_into().expect("4 bytes")) as usize;
        let Some(Ok((msg, []))) = rest
            .get(4..4 + len)
            .map(postcard::take_from_bytes::<ToReceiver>)
        else {
            break;
        };
        eprintln!("message {msg:?}");
        rest = &rest[4 + len..];
        if msg != ToReceiver::Batch {
            continue;
        }
        let mut reader = match BatchReader::in_stream(&mut rest) {
            Ok(reader) => reader,
            Err(e) => {
                eprintln!("  {e}");
                break;
            }
        };
        eprintln!("  {:?}", reader.header());
        loop {
            match reader.next_op() {
                Ok(Some(op)) => eprintln!("  {op:?}"),
                Ok(None) => break,
                Err(e) => {
                    eprintln!("  {e}");
                    return;
                }
            }
        }
    }
    if !rest.is_empty() {
        eprintln!("{} bytes that are not a message", rest.len());
    }
}

/// What the receiver wrote back: its greeting, then whole messages each
/// within the limit (a receiver never writes anything else).
fn replies(written: &[u8]) -> Vec<ToSender> {
    assert_eq!(written.get(..8), Some(&GREETING[..]), "no greeting");
    let mut rest = &written[8..];
    let mut out = Vec::new();
    while !rest.is_empty() {
        let len = rest.get(..4).expect("a whole message length");
        let len = u32::from_le_bytes(len.try_into().expect("4 bytes"));
        assert!(
            len <= MAX_MESSAGE,
            "the receiver sent a message of {len} bytes"
        );
        let payload = rest.get(4..4 + len as usize).expect("a whole message");
        let (msg, []) = postcard::take_from_bytes::<ToSender>(payload).expect("a message") else {
            panic!("bytes left over in a message the receiver sent");
        };
        out.push(msg);
        rest = &rest[4 + len as usize..];
    }
    out
}

fn is_empty_dir(path: &Path) -> bool {
    fs::read_dir(path).map_or(true, |mut d| d.next().is_none())
}

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().expect("tempdir");
    let (r, outside) = populate(dir.path());
    let state = dir.path().join(".r.ferry");
    keep(&state);
    let outside_before = snapshot(&outside);
    let replica_before = snapshot(&r);
    let applied_before = fs::read(state.join("applied")).ok();
    check_reseal();
    let stream = reseal(data);
    print(&stream);

    let mut written = Vec::new();
    let result = receive(&stream[..], &mut written, |name| {
        if name.is_empty() {
            Ok(r.clone())
        } else {
            Err(format!("no replica {name:?} here"))
        }
    });
    let answers = replies(&written);
    if printing() {
        for a in &answers {
            eprintln!("answer {a:?}");
        }
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
    assert!(
        is_empty_dir(&state.join("staging")),
        "staging/ left behind: {result:?}"
    );
    assert!(
        is_empty_dir(&state.join("commit")),
        "a commit log left behind: {result:?} {answers:?}"
    );
    let applied_after = fs::read(state.join("applied")).ok();
    if applied_after == applied_before {
        assert!(
            snapshot(&r) == replica_before,
            "the replica changed but no batch was committed: {result:?} {answers:?}"
        );
    }
    if let Ok(received) = &result {
        let applied = read_applied(&r).expect("read applied");
        assert_eq!(
            received.seq,
            applied.map_or(0, |a| a.seq),
            "{received:?} {answers:?}"
        );
        assert_eq!(received.replica.as_deref(), Some(r.as_path()));
    }
});
