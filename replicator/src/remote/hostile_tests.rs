//! The attacks behind rsync's 2024-2026 security fixes, made against
//! ferry's receiver through the protocol (and one against its sender),
//! each shown refused: a sender that makes the receiver write through a
//! symlink (one it sent, or one the replica holds), that swaps a parent
//! directory for a symlink while its batch is under way, that names paths
//! out of the root, that sends oversized or "negative" lengths, offsets
//! and sizes, hash fields of the wrong length, more than its header
//! declares, or deltas that read beyond their base; and a receiver that
//! answers with oversized messages. Every test checks that nothing outside
//! the replica root changed (every entry's bytes, mode, owner, times, link
//! count and xattrs) and, where the attack is refused, that the replica did
//! not change either. docs/SECURITY.md maps each test to the class it
//! shows.
//!
//! The applier's own tests (`apply::tests`) show most of these against
//! `apply` directly; these show them end to end, through the stream a
//! hostile sender controls. One ignored test records a gap these tests
//! found: the receiver's memory grows with the number of operations in a
//! batch.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

use super::message::{self, GREETING, MAX_KEPT, MAX_MESSAGE, PROTOCOL, ToReceiver, ToSender};
use super::test_ops::{self, create, p};
use super::{Connection, Received, RemoteError, receive};
use crate::batch::limits::{MAX_FILE_SIZE, MAX_HEADER_PAYLOAD, MAX_OP_PAYLOAD};
use crate::batch::{
    BatchHeader, BatchWriter, Chunk, Content, Extent, Hash, MAGIC, NodeKind, Op, RelPath,
    Timestamp, VERSION, WriteRange,
};
use crate::fuzz_scene::{Seen, snapshot};

const SOURCE: [u8; 16] = [5; 16];

/// What `outside/keep` holds.
const KEEP: &[u8] = b"outside\n";

fn header(from: u64, to: u64) -> BatchHeader {
    test_ops::header(SOURCE, from, to)
}

fn write_ranges(path: &str, base: &[u8], offset: u64, data: &[u8]) -> Op {
    let mut after = base.to_vec();
    let end = offset as usize + data.len();
    if after.len() < end {
        after.resize(end, 0);
    }
    after[offset as usize..end].copy_from_slice(data);
    Op::WriteRanges {
        path: p(path),
        ranges: vec![WriteRange {
            offset,
            data: data.to_vec(),
        }],
        base: Hash::of(base),
        result: Hash::of(&after),
    }
}

/// A librsync delta: the magic, `commands`, and the end command.
fn delta(commands: &[u8]) -> Vec<u8> {
    [&[0x72, 0x73, 0x02, 0x36][..], commands, &[0]].concat()
}

/// A delta that turns any base into `data` (one literal command).
fn literal(data: &[u8]) -> Vec<u8> {
    assert!((1..=64).contains(&data.len()));
    delta(&[&[data.len() as u8][..], data].concat())
}

// ---- the scene: a replica, and beside it what must never change ----

/// A temporary directory holding the replica `r/` and, beside it,
/// `outside/` (`keep`, with an xattr where the filesystem takes one, and
/// `nested/n`): the files an attack would reach.
struct Scene {
    _dir: tempfile::TempDir,
    base: PathBuf,
    replica: PathBuf,
    outside: PathBuf,
    /// `outside/` as it was made.
    before: BTreeMap<PathBuf, Seen>,
}

fn scene() -> Scene {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().to_path_buf();
    let replica = base.join("r");
    let outside = base.join("outside");
    fs::create_dir(&replica).unwrap();
    fs::create_dir_all(outside.join("nested")).unwrap();
    fs::write(outside.join("keep"), KEEP).unwrap();
    fs::set_permissions(outside.join("keep"), fs::Permissions::from_mode(0o644)).unwrap();
    fs::write(outside.join("nested/n"), b"nested\n").unwrap();
    let _ = xattr::set(outside.join("keep"), "user.mark", b"1");
    let before = snapshot(&outside);
    Scene {
        _dir: dir,
        base,
        replica,
        outside,
        before,
    }
}

impl Scene {
    /// `outside/` as an absolute symlink target.
    fn outside_target(&self) -> Vec<u8> {
        self.outside.as_os_str().as_encoded_bytes().to_vec()
    }

    /// Nothing outside the replica root changed, and nothing was made
    /// beside it but its state directory.
    fn assert_outside_unchanged(&self, what: &str) {
        assert_eq!(
            snapshot(&self.outside),
            self.before,
            "{what}: outside/ changed"
        );
        let mut names: Vec<_> = fs::read_dir(&self.base)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert!(
            names
                .iter()
                .all(|n| [".r.ferry", "outside", "r"].contains(&n.as_str())),
            "{what}: something was made beside the replica: {names:?}"
        );
    }

    fn replica_now(&self) -> BTreeMap<PathBuf, Seen> {
        snapshot(&self.replica)
    }
}

// ---- a receiver, and a well-behaved sender ----

type Receiver = JoinHandle<Result<Received, RemoteError>>;

/// A receiver serving `replica` on one end of a socket pair, reading its
/// input through `input`.
fn serve<R: Read + Send + 'static>(
    replica: &Path,
    input: impl FnOnce(UnixStream) -> R + Send + 'static,
) -> (UnixStream, Receiver) {
    let (ours, theirs) = UnixStream::pair().unwrap();
    let replica = replica.to_path_buf();
    let handle = std::thread::spawn(move || {
        let w = theirs.try_clone().unwrap();
        receive(input(theirs), w, move |name| {
            if name.is_empty() {
                Ok(replica.clone())
            } else {
                Err(format!("no replica {name}"))
            }
        })
    });
    (ours, handle)
}

/// A sender that makes its batches with `BatchWriter` (so every batch is
/// well formed: the attack is in what it asks for), one sequence number
/// each.
struct Push {
    conn: Connection<UnixStream, UnixStream>,
    receiver: Receiver,
    seq: u64,
}

impl Push {
    fn open(replica: &Path) -> Push {
        let (stream, receiver) = serve(replica, |s| s);
        let (conn, ready) = Connection::open(stream.try_clone().unwrap(), stream, "").unwrap();
        Push {
            conn,
            receiver,
            seq: ready.applied.map_or(0, |a| a.seq),
        }
    }

    /// Sends `ops` as the next batch; the receiver's answer.
    fn send(&mut self, ops: &[Op]) -> ToSender {
        let mut w = self.conn.batch(header(self.seq, self.seq + 1)).unwrap();
        for op in ops {
            w.push(op).unwrap();
        }
        w.finish().unwrap();
        let reply = self.conn.outcome().unwrap();
        if let ToSender::Applied(r) = &reply {
            self.seq = r.to_seq;
        }
        reply
    }

    /// Sends `ops`, which the receiver must refuse; its message.
    fn refused(&mut self, ops: &[Op]) -> String {
        match self.send(ops) {
            ToSender::Failed {
                message,
                base_mismatch,
            } => {
                assert_eq!(base_mismatch, None, "{message}");
                message
            }
            other => panic!("not refused: {ops:?}: {other:?}"),
        }
    }

    /// Says `Done`; the receiver must end well (the refusals kept the
    /// stream in step, and nothing panicked).
    fn close(self) -> Received {
        self.conn.close().unwrap();
        self.receiver
            .join()
            .expect("the receiver does not panic")
            .unwrap()
    }
}

// ---- crafting what `BatchWriter` refuses to write (docs/FORMAT.md) ----

fn varint(mut n: u64, out: &mut Vec<u8>) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

/// A frame whose length field says `len`, whatever the payload's length:
/// `[kind][len: u32 LE][payload][XXH3-64(kind ‖ len ‖ payload), LE]`.
fn frame_claiming(kind: u8, len: u32, payload: &[u8]) -> Vec<u8> {
    let mut head = vec![kind];
    head.extend_from_slice(&len.to_le_bytes());
    let check = xxhash_rust::xxh3::xxh3_64(&[&head[..], payload].concat());
    [&head[..], payload, &check.to_le_bytes()].concat()
}

fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
    frame_claiming(kind, payload.len() as u32, payload)
}

/// The magic, the version and the header frame.
fn preamble(h: &BatchHeader) -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend(frame(1, &postcard::to_stdvec(h).unwrap()));
    out
}

/// A batch around op payloads the writer would not make, each correctly
/// framed and checksummed, with a trailer whose counts and hash are right:
/// what a sender who knows the format can send.
fn crafted(h: &BatchHeader, payloads: &[Vec<u8>]) -> Vec<u8> {
    let content = payloads
        .iter()
        .filter_map(|p| postcard::from_bytes::<Op>(p).ok())
        .map(|op| op.data_len())
        .fold(0, u64::saturating_add);
    crafted_with_trailer(h, payloads, payloads.len() as u64, content)
}

/// As `crafted`, with the trailer's counts given.
fn crafted_with_trailer(
    h: &BatchHeader,
    payloads: &[Vec<u8>],
    op_count: u64,
    content_bytes: u64,
) -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(&VERSION.to_le_bytes());
    // The trailer's hash: the preamble, then each frame's head and check.
    let mut chain = blake3::Hasher::new();
    chain.update(&out);
    let header = frame(1, &postcard::to_stdvec(h).unwrap());
    for f in std::iter::once(header).chain(payloads.iter().map(|p| frame(2, p))) {
        chain.update(&f[..5]);
        chain.update(&f[f.len() - 8..]);
        out.extend(f);
    }
    let mut trailer = Vec::new();
    varint(op_count, &mut trailer);
    varint(content_bytes, &mut trailer);
    trailer.extend_from_slice(chain.finalize().as_bytes());
    out.extend(frame(3, &trailer));
    out
}

/// A path on the wire: its component count, then each component's length
/// and bytes, whatever they are.
fn raw_path(components: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    varint(components.len() as u64, &mut out);
    for c in components {
        varint(c.len() as u64, &mut out);
        out.extend_from_slice(c);
    }
    out
}

/// `op` as postcard encodes it, with the placeholder paths `@0` (and
/// `@1`) it names replaced by the raw paths `raw`: paths no `RelPath`
/// constructor makes. (An operation's paths come before its hashes and
/// data, so the first match is the placeholder path.)
fn with_raw_paths(op: &Op, raw: &[&[&[u8]]]) -> Vec<u8> {
    let mut payload = postcard::to_stdvec(op).unwrap();
    for (i, components) in raw.iter().enumerate() {
        let placeholder = postcard::to_stdvec(&p(&format!("@{i}"))).unwrap();
        let at = payload
            .windows(placeholder.len())
            .position(|w| w == placeholder)
            .expect("the op names the placeholder");
        payload.splice(at..at + placeholder.len(), raw_path(components));
    }
    payload
}

fn framed<T: serde::Serialize>(msg: &T) -> Vec<u8> {
    let mut out = Vec::new();
    message::send(&mut out, msg).unwrap();
    out
}

fn hello() -> Vec<u8> {
    framed(&ToReceiver::Hello {
        protocol: PROTOCOL,
        replica: String::new(),
    })
}

/// What a sender writes to send `batch` as its only batch: `Hello`,
/// `Batch`, the batch, `Done`.
fn wire(batch: &[u8]) -> Vec<u8> {
    [
        hello(),
        framed(&ToReceiver::Batch),
        batch.to_vec(),
        framed(&ToReceiver::Done),
    ]
    .concat()
}

/// Runs a receiver and writes it `bytes` as the sender; returns what it
/// answered after its greeting, and how it ended.
fn feed(replica: &Path, bytes: &[u8]) -> (Vec<ToSender>, Result<Received, RemoteError>) {
    let (mut ours, receiver) = serve(replica, |s| s);
    let mut greeting = [0u8; 8];
    ours.read_exact(&mut greeting).unwrap();
    assert_eq!(greeting, GREETING);
    // The receiver may stop reading early: a failed write is part of the
    // test, not an error of it.
    let _ = ours.write_all(bytes);
    let _ = ours.shutdown(Shutdown::Write);
    let mut replies = Vec::new();
    while let Ok(Some(m)) = message::receive::<ToSender>(&mut ours) {
        replies.push(m);
    }
    let ended = receiver.join().expect("the receiver does not panic");
    (replies, ended)
}

/// Feeds `batch` to a receiver of `s`'s replica and checks that it was
/// refused with a message containing `want`, that the receiver ended the
/// connection (the stream cannot be trusted to be in step), and that
/// neither the replica nor anything outside it changed.
fn assert_batch_refused(s: &Scene, what: &str, batch: &[u8], want: &str) {
    let replica = s.replica_now();
    let (replies, ended) = feed(&s.replica, &wire(batch));
    match replies.as_slice() {
        [ToSender::Ready { .. }, ToSender::Failed { message, .. }] => {
            assert!(message.contains(want), "{what}: {message}");
        }
        other => panic!("{what}: {other:?} ({ended:?})"),
    }
    let err = ended.expect_err(what);
    assert!(matches!(err, RemoteError::Protocol(_)), "{what}: {err}");
    assert_eq!(s.replica_now(), replica, "{what}: the replica changed");
    s.assert_outside_unchanged(what);
}

// ---- symlinks ----

/// The symlink targets an attack goes through: out of the root (absolute,
/// relative, through a directory inside, to `/`), to the root itself, and
/// into a directory inside. The applier never looks at a target, so the
/// shapes that got past rsync's `--safe-links` check are no different.
fn targets(s: &Scene) -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("abs", s.outside_target()),
        ("rel", b"../outside".to_vec()),
        ("via", b"sub/../../outside".to_vec()),
        ("top", b"../../../../../../../../../..".to_vec()),
        ("self", b".".to_vec()),
        ("in", b"sub".to_vec()),
    ]
}

/// Every operation that creates, changes or reads an entry, aimed below
/// the symlink `l`, at `l/evil` (new) or `l/keep` (which `outside/keep`
/// is for most targets). Base hashes are those of `outside/keep`, so that
/// only confinement stands in the way.
fn through(l: &str) -> Vec<Vec<Op>> {
    let at = |name: &str| format!("{l}/{name}");
    let keep = at("keep");
    vec![
        vec![create(&at("evil"), b"evil")],
        vec![Op::Mkdir {
            path: p(&at("evil")),
            mode: 0o755,
        }],
        vec![Op::Symlink {
            path: p(&at("evil")),
            target: b"/etc/passwd".to_vec(),
        }],
        vec![Op::Mknod {
            path: p(&at("evil")),
            kind: NodeKind::Fifo,
            mode: 0o644,
            rdev: 0,
        }],
        vec![
            Op::BeginFile {
                path: p(&at("evil")),
                mode: 0o644,
                size: 4,
            },
            Op::FileData {
                offset: 0,
                data: Chunk::Raw(b"evil".to_vec()),
            },
            Op::EndFile {
                result: Hash::of(b"evil"),
            },
        ],
        vec![Op::CreateFromKept {
            path: p(&at("evil")),
            mode: 0o644,
            result: Hash::of(b"evil"),
        }],
        vec![write_ranges(&keep, KEEP, 0, b"X")],
        vec![Op::Truncate {
            path: p(&keep),
            size: 0,
        }],
        vec![Op::Delta {
            path: p(&keep),
            base: Hash::of(KEEP),
            delta: literal(b"evil"),
            result: Hash::of(b"evil"),
        }],
        vec![Op::Unlink { path: p(&keep) }],
        vec![Op::Rmdir {
            path: p(&at("nested")),
        }],
        vec![Op::Chmod {
            path: p(&keep),
            mode: 0o777,
        }],
        vec![Op::Chown {
            path: p(&keep),
            uid: 1,
            gid: 1,
        }],
        vec![Op::Utimes {
            path: p(&keep),
            atime: Timestamp { sec: 1, nsec: 0 },
            mtime: Timestamp { sec: 1, nsec: 0 },
        }],
        vec![Op::SetXattr {
            path: p(&keep),
            name: b"user.evil".to_vec(),
            value: b"1".to_vec(),
        }],
        vec![Op::RemoveXattr {
            path: p(&keep),
            name: b"user.mark".to_vec(),
        }],
    ]
}

/// CVE-2024-12087's class: a sender makes a symlink, then sends entries
/// "inside" it. Refused in the batch that makes the symlink and in every
/// later batch, whatever the target.
#[test]
fn a_symlink_the_sender_made_is_never_followed_by_later_operations() {
    let s = scene();
    fs::create_dir(s.replica.join("sub")).unwrap();
    let mut push = Push::open(&s.replica);
    let empty = s.replica_now();

    // In the batch that makes it.
    for (name, target) in targets(&s) {
        for attack in through(name) {
            let mut ops = vec![Op::Symlink {
                path: p(name),
                target: target.clone(),
            }];
            ops.extend(attack);
            // Below a symlink the batch makes, nothing exists.
            let message = push.refused(&ops);
            assert!(
                message.contains("symlink") || message.contains("does not exist"),
                "{ops:?}: {message}"
            );
            assert_eq!(s.replica_now(), empty, "{ops:?}");
            s.assert_outside_unchanged(&format!("{ops:?}"));
        }
    }

    // In later batches, once the symlinks are on the replica.
    let links: Vec<Op> = targets(&s)
        .into_iter()
        .map(|(name, target)| Op::Symlink {
            path: p(name),
            target,
        })
        .collect();
    assert!(matches!(push.send(&links), ToSender::Applied(_)));
    let seeded = s.replica_now();
    for (name, _) in targets(&s) {
        for ops in through(name) {
            let message = push.refused(&ops);
            assert!(message.contains("symlink"), "{ops:?}: {message}");
            assert_eq!(s.replica_now(), seeded, "{ops:?}");
            s.assert_outside_unchanged(&format!("{ops:?}"));
        }
    }
    assert_eq!(push.close().seq, 1);
}

/// A rename or a hard link through a symlink the replica holds (made by
/// an earlier batch, or by anyone with access to the replica): into it
/// (moving a replica entry out of the root), out of it (pulling an
/// outside file in), exchanged with something in it, and a delta's basis
/// read through it.
#[test]
fn renames_links_and_delta_bases_through_a_symlink_the_replica_holds_are_refused() {
    let s = scene();
    fs::create_dir_all(s.replica.join("sub/d")).unwrap();
    fs::write(s.replica.join("f"), b"file").unwrap();
    fs::write(s.replica.join("sub/b"), b"b").unwrap();
    symlink("../outside", s.replica.join("out")).unwrap();
    symlink(&s.outside, s.replica.join("abs")).unwrap();
    symlink("sub", s.replica.join("in")).unwrap();
    let mut push = Push::open(&s.replica);
    let replica = s.replica_now();
    let rename = |from: &str, to: &str, exchange| Op::Rename {
        from: p(from),
        to: p(to),
        exchange,
    };
    let link = |existing: &str, new: &str| Op::Link {
        existing: p(existing),
        new: p(new),
    };
    let from_delta = |path: &str, basis: &str| Op::CreateFromDelta {
        path: p(path),
        basis: p(basis),
        base: Hash::of(KEEP),
        delta: literal(b"stolen"),
        mode: 0o644,
        result: Hash::of(b"stolen"),
    };
    let mut attacks = Vec::new();
    for l in ["out", "abs", "in"] {
        let at = |name: &str| format!("{l}/{name}");
        attacks.extend([
            rename("f", &at("f"), false),
            rename("sub/d", &at("d"), false),
            rename(&at("keep"), "stolen", false),
            rename(&at("b"), "stolen", false),
            rename("f", &at("keep"), true),
            rename(&at("nested"), "sub/d", true),
            link(&at("keep"), "stolen"),
            link("f", &at("f")),
            from_delta("stolen", &at("keep")),
            from_delta(&at("new"), "f"),
        ]);
    }
    for op in attacks {
        let message = push.refused(std::slice::from_ref(&op));
        assert!(message.contains("symlink"), "{op:?}: {message}");
        assert_eq!(s.replica_now(), replica, "{op:?}");
        s.assert_outside_unchanged(&format!("{op:?}"));
    }
    push.close();
}

/// Operations on a symlink itself (the last component of their path) act
/// on the link or refuse, and never reach what it points to: metadata
/// calls do not follow it, content operations need a regular file, and a
/// new file, or a rename, replaces the link.
#[test]
fn operations_on_a_symlink_itself_never_reach_its_target() {
    let s = scene();
    fs::write(s.replica.join("f"), b"file").unwrap();
    let keep = s.outside.join("keep");
    symlink(&keep, s.replica.join("lf")).unwrap();
    symlink(&s.outside, s.replica.join("ld")).unwrap();
    let mut push = Push::open(&s.replica);
    let mut ops = Vec::new();
    for l in ["lf", "ld"] {
        ops.extend([
            Op::Chmod {
                path: p(l),
                mode: 0o777,
            },
            Op::Chown {
                path: p(l),
                uid: 1,
                gid: 1,
            },
            Op::Utimes {
                path: p(l),
                atime: Timestamp { sec: 1, nsec: 0 },
                mtime: Timestamp { sec: 1, nsec: 0 },
            },
            Op::SetXattr {
                path: p(l),
                name: b"user.evil".to_vec(),
                value: b"1".to_vec(),
            },
            Op::RemoveXattr {
                path: p(l),
                name: b"user.mark".to_vec(),
            },
        ]);
    }
    let refused = [
        write_ranges("lf", KEEP, 0, b"X"),
        Op::Truncate {
            path: p("lf"),
            size: 0,
        },
        Op::Delta {
            path: p("lf"),
            base: Hash::of(KEEP),
            delta: literal(b"evil"),
            result: Hash::of(b"evil"),
        },
        Op::CreateFromDelta {
            path: p("new"),
            basis: p("lf"),
            base: Hash::of(KEEP),
            delta: literal(b"stolen"),
            mode: 0o644,
            result: Hash::of(b"stolen"),
        },
    ];
    for op in refused {
        let message = push.refused(std::slice::from_ref(&op));
        assert!(message.contains("not a regular file"), "{op:?}: {message}");
        s.assert_outside_unchanged(&format!("{op:?}"));
    }
    // Metadata on the links: applied to the links (or reported, where the
    // filesystem refuses it), never to their targets.
    for op in ops {
        let reply = push.send(std::slice::from_ref(&op));
        assert!(matches!(reply, ToSender::Applied(_)), "{op:?}: {reply:?}");
        s.assert_outside_unchanged(&format!("{op:?}"));
    }
    // A new file and a rename replace the links.
    let reply = push.send(&[
        create("lf", b"new"),
        Op::Rename {
            from: p("f"),
            to: p("ld"),
            exchange: false,
        },
    ]);
    assert!(matches!(reply, ToSender::Applied(_)), "{reply:?}");
    assert_eq!(fs::read(s.replica.join("lf")).unwrap(), b"new");
    assert_eq!(fs::read(s.replica.join("ld")).unwrap(), b"file");
    s.assert_outside_unchanged("replacing the links");
    push.close();
}

/// CVE-2024-12086's class: a receiver that compares a sender's checksum
/// with a file the sender names leaks that file a guess at a time. A base
/// hash names a file only beneath the root: for a file reached through a
/// symlink, the right guess and a wrong one get the same answer. (Inside
/// the replica a wrong base is reported, as it must be for the sender to
/// send the file whole.)
#[test]
fn an_outside_file_cannot_be_probed_through_base_hashes() {
    let s = scene();
    fs::write(s.replica.join("f"), KEEP).unwrap();
    symlink("../outside", s.replica.join("out")).unwrap();
    let mut push = Push::open(&s.replica);
    let probes = |path: &str, guess: &[u8]| {
        vec![
            Op::WriteRanges {
                path: p(path),
                ranges: vec![WriteRange {
                    offset: 0,
                    data: b"o".to_vec(),
                }],
                base: Hash::of(guess),
                result: Hash::of(b"outside\n"),
            },
            Op::Delta {
                path: p(path),
                base: Hash::of(guess),
                delta: literal(b"x"),
                result: Hash::of(b"x"),
            },
            Op::CreateFromDelta {
                path: p("new"),
                basis: p(path),
                base: Hash::of(guess),
                delta: literal(b"x"),
                mode: 0o644,
                result: Hash::of(b"x"),
            },
        ]
    };
    for (right, wrong) in probes("out/keep", KEEP)
        .into_iter()
        .zip(probes("out/keep", b"a wrong guess"))
    {
        let a = push.send(std::slice::from_ref(&right));
        let b = push.send(std::slice::from_ref(&wrong));
        let ToSender::Failed {
            message,
            base_mismatch: None,
        } = &a
        else {
            panic!("{right:?}: {a:?}");
        };
        assert!(message.contains("symlink"), "{message}");
        assert_eq!(a, b, "the answer depends on the outside file's content");
    }
    for op in probes("f", b"a wrong guess") {
        let reply = push.send(std::slice::from_ref(&op));
        assert!(
            matches!(
                reply,
                ToSender::Failed {
                    base_mismatch: Some(1),
                    ..
                }
            ),
            "{op:?}: {reply:?}"
        );
    }
    s.assert_outside_unchanged("probing");
    push.close();
}

// ---- paths ----

/// Path traversal: `..`, absolute paths, `/` or NUL inside a component,
/// empty components, over-long names and paths, the root where an entry
/// is needed, in every field that holds a path, hand-encoded after a valid
/// operation. The decoder refuses each before the applier sees it; the
/// operation before it, already staged, is not applied.
#[test]
fn paths_that_leave_the_root_or_break_the_rules_are_refused() {
    let s = scene();
    fs::write(s.replica.join("f"), b"file").unwrap();
    let long = vec![b'x'; 256];
    let name = vec![b'x'; 255];
    let deep: Vec<&[u8]> = std::iter::repeat_n(&name[..], 17).collect();
    let unlink = Op::Unlink { path: p("@0") };
    let cases: Vec<(Op, Vec<&[u8]>, &str)> = vec![
        (unlink.clone(), vec![b".."], "\"..\""),
        (
            unlink.clone(),
            vec![b"a", b"..", b"..", b"outside"],
            "\"..\"",
        ),
        (unlink.clone(), vec![b"."], "\"..\""),
        (
            create("@0", b"evil"),
            vec![b"", b"tmp", b"evil"],
            "empty path component",
        ),
        (unlink.clone(), vec![b"a", b""], "empty path component"),
        (
            Op::Mkdir {
                path: p("@0"),
                mode: 0o755,
            },
            vec![b"/tmp/evil"],
            "'/'",
        ),
        (
            Op::Symlink {
                path: p("@0"),
                target: b"x".to_vec(),
            },
            vec![b"../outside/evil"],
            "'/'",
        ),
        (unlink.clone(), vec![b"evil\0"], "NUL"),
        (unlink.clone(), vec![&long[..]], "256 bytes"),
        (unlink.clone(), deep, "longer than 4096"),
        (unlink.clone(), vec![], "replica root"),
        (
            Op::Rename {
                from: p("f"),
                to: p("@0"),
                exchange: false,
            },
            vec![b"..", b"outside", b"f"],
            "\"..\"",
        ),
        (
            Op::Link {
                existing: p("@0"),
                new: p("stolen"),
            },
            vec![b"..", b"outside", b"keep"],
            "\"..\"",
        ),
        (
            Op::CreateFromDelta {
                path: p("stolen"),
                basis: p("@0"),
                base: Hash::of(KEEP),
                delta: literal(b"x"),
                mode: 0o644,
                result: Hash::of(b"x"),
            },
            vec![b"..", b"outside", b"keep"],
            "\"..\"",
        ),
        (
            Op::BeginFile {
                path: p("@0"),
                mode: 0o644,
                size: 1,
            },
            vec![b"..", b"evil"],
            "\"..\"",
        ),
    ];
    let first = postcard::to_stdvec(&create("first", b"staged first")).unwrap();
    for (op, path, want) in cases {
        let what = format!("{} {:?}", op.name(), path);
        let batch = crafted(
            &header(0, 1),
            &[first.clone(), with_raw_paths(&op, &[&path])],
        );
        assert_batch_refused(&s, &what, &batch, want);
    }
    // The same batch crafted without the hostile operation applies: the
    // refusals above are the paths'.
    let (replies, ended) = feed(&s.replica, &wire(&crafted(&header(0, 1), &[first])));
    assert!(
        matches!(
            replies.as_slice(),
            [ToSender::Ready { .. }, ToSender::Applied(_)]
        ),
        "{replies:?}"
    );
    assert_eq!(ended.unwrap().seq, 1);
    assert_eq!(fs::read(s.replica.join("first")).unwrap(), b"staged first");
    s.assert_outside_unchanged("the control");
}

// ---- lengths, offsets, sizes ----

/// Oversized frame lengths, and lengths, offsets and sizes at or beyond
/// 2^63 (negative as an `off_t`) or at `u64::MAX` (where adding anything
/// wraps), in every operation that has them; byte-string and sequence
/// lengths that claim far more than was sent; a varint longer than a u64.
/// Each is refused before anything is allocated for it or written.
#[test]
fn oversized_and_negative_lengths_offsets_and_sizes_are_refused() {
    let s = scene();
    fs::write(s.replica.join("f"), b"file").unwrap();
    let h = header(0, 1);
    let first = postcard::to_stdvec(&create("first", b"staged first")).unwrap();
    let negative = 1u64 << 63;
    let too_big = "ends beyond 9223372036854775807";
    let op = |op: Op| postcard::to_stdvec(&op).unwrap();
    let ranges = |offset: u64, data: &[u8]| {
        op(Op::WriteRanges {
            path: p("f"),
            ranges: vec![WriteRange {
                offset,
                data: data.to_vec(),
            }],
            base: Hash::of(b"file"),
            result: Hash::default(),
        })
    };
    let begin = |size: u64| {
        op(Op::BeginFile {
            path: p("big"),
            mode: 0o644,
            size,
        })
    };
    let file_data = |offset: u64| {
        op(Op::FileData {
            offset,
            data: Chunk::Raw(b"data".to_vec()),
        })
    };
    let sparse = |size: u64, offset: u64| {
        op(Op::CreateFile {
            path: p("sparse"),
            mode: 0o644,
            content: Content::Sparse {
                size,
                extents: vec![Extent {
                    offset,
                    data: Chunk::Raw(b"data".to_vec()),
                }],
            },
            result: Hash::default(),
        })
    };
    // CreateFile "f2", mode 0o644, Raw content claiming 2^64 - 1 bytes.
    let mut huge_bytes = vec![7];
    huge_bytes.extend(raw_path(&[b"f2"]));
    varint(0o644, &mut huge_bytes);
    huge_bytes.push(0);
    varint(u64::MAX, &mut huge_bytes);
    huge_bytes.extend_from_slice(b"only this");
    // Truncate "f" to a size given by eleven varint bytes.
    let mut long_varint = vec![9];
    long_varint.extend(raw_path(&[b"f"]));
    long_varint.extend_from_slice(&[0xff; 10]);
    long_varint.push(0x01);
    // WriteRanges "f" claiming 2^40 ranges, and an Unlink whose path claims
    // 2^40 components.
    let mut many_ranges = vec![8];
    many_ranges.extend(raw_path(&[b"f"]));
    varint(1 << 40, &mut many_ranges);
    let mut many_components = vec![5];
    varint(1 << 40, &mut many_components);
    let zstd = |len: u64| {
        op(Op::CreateFile {
            path: p("z"),
            mode: 0o644,
            content: Content::Zstd {
                len,
                bytes: zstd::bulk::compress(&[0u8; 1000], 3).unwrap(),
            },
            result: Hash::default(),
        })
    };

    let cases: Vec<(&str, Vec<Vec<u8>>, &str)> = vec![
        (
            "WriteRanges at 2^64 - 1",
            vec![ranges(u64::MAX, b"x")],
            too_big,
        ),
        ("WriteRanges at 2^63", vec![ranges(negative, b"x")], too_big),
        (
            "WriteRanges ending at 2^63",
            vec![ranges(negative - 1, b"xy")],
            too_big,
        ),
        (
            "Truncate to 2^64 - 1",
            vec![op(Op::Truncate {
                path: p("f"),
                size: u64::MAX,
            })],
            too_big,
        ),
        (
            "Truncate to 2^63",
            vec![op(Op::Truncate {
                path: p("f"),
                size: negative,
            })],
            too_big,
        ),
        ("BeginFile of 2^63", vec![begin(negative)], too_big),
        ("BeginFile of 2^64 - 1", vec![begin(u64::MAX)], too_big),
        (
            "FileData at 2^64 - 2",
            vec![begin(MAX_FILE_SIZE), file_data(u64::MAX - 1)],
            too_big,
        ),
        (
            "FileData at 2^63",
            vec![begin(MAX_FILE_SIZE), file_data(negative)],
            too_big,
        ),
        (
            "FileData beyond its file",
            vec![begin(10), file_data(8)],
            "beyond the file's size 10",
        ),
        (
            "a sparse file of 2^63",
            vec![sparse(negative, 0)],
            "invalid",
        ),
        (
            "a sparse extent at 2^64 - 2",
            vec![sparse(MAX_FILE_SIZE, u64::MAX - 1)],
            "invalid",
        ),
        ("zstd of 2^64 - 1 bytes", vec![zstd(u64::MAX)], "chunk of"),
        (
            "content of 2^64 - 1 bytes",
            vec![huge_bytes],
            "does not decode",
        ),
        ("an 11-byte varint", vec![long_varint], "does not decode"),
        ("2^40 ranges", vec![many_ranges], "does not decode"),
        ("2^40 components", vec![many_components], "does not decode"),
    ];
    for (what, payloads, want) in cases {
        let mut all = vec![first.clone()];
        all.extend(payloads);
        assert_batch_refused(&s, what, &crafted(&h, &all), want);
    }

    // Frame lengths: over the op limit (up to u32::MAX) after a valid op,
    // over the header's limit, and within the limit but far beyond the
    // bytes sent (the buffer grows only as bytes arrive).
    let mut op_frame = preamble(&h);
    op_frame.extend(frame(2, &first));
    for len in [u32::MAX, MAX_OP_PAYLOAD + 1] {
        let mut batch = op_frame.clone();
        batch.push(2);
        batch.extend_from_slice(&len.to_le_bytes());
        batch.extend_from_slice(&[0; 64]);
        assert_batch_refused(
            &s,
            &format!("op frame of {len}"),
            &batch,
            "exceeds the limit",
        );
    }
    let mut batch = MAGIC.to_vec();
    batch.extend_from_slice(&VERSION.to_le_bytes());
    batch.push(1);
    batch.extend_from_slice(&(MAX_HEADER_PAYLOAD + 1).to_le_bytes());
    batch.extend_from_slice(&[0; 64]);
    assert_batch_refused(&s, "header frame", &batch, "exceeds the limit");
    let mut batch = op_frame.clone();
    batch.push(2);
    batch.extend_from_slice(&MAX_OP_PAYLOAD.to_le_bytes());
    batch.extend_from_slice(&[0; 100]);
    assert_batch_refused(&s, "a frame length that lies", &batch, "truncated");
}

// ---- hash fields ----

/// rsync's checksum-length overflows (CVE-2024-12084, -12085) came from a
/// checksum whose length the peer chose. A ferry hash is always 32 bytes,
/// with no length on the wire, inside a frame whose length and check fix
/// where it ends: a hash field one byte short or long (at the end of an
/// op, in the middle of one, in the trailer or the header), or a frame
/// that claims one byte less than it carries, is refused; parsing cannot
/// run into the next frame. The same operation whole applies.
#[test]
fn a_hash_field_one_byte_short_or_long_is_refused() {
    let s = scene();
    fs::write(s.replica.join("f"), b"file").unwrap();
    let h = header(0, 1);
    let ranges = postcard::to_stdvec(&write_ranges("f", b"file", 0, b"F")).unwrap();
    let d = Op::Delta {
        path: p("f"),
        base: Hash::of(b"file"),
        delta: literal(b"new"),
        result: Hash::of(b"new"),
    };
    let delta = postcard::to_stdvec(&d).unwrap();
    // The Delta's base ends after its tag and path ("f").
    let base_end = 1 + 3 + 32;
    let short = |v: &[u8]| v[..v.len() - 1].to_vec();
    let long = |v: &[u8]| [v, &[0][..]].concat();
    let short_base = [&delta[..base_end - 1], &delta[base_end..]].concat();
    let long_base = [&delta[..base_end], &[0][..], &delta[base_end..]].concat();
    for (what, payload, want) in [
        ("result short", short(&ranges), "does not decode"),
        ("result long", long(&ranges), "unused bytes"),
        ("base short", short_base, "does not decode"),
        ("base long", long_base, "unused bytes"),
    ] {
        assert_batch_refused(&s, what, &crafted(&h, &[payload]), want);
    }

    // A frame claiming one byte less than its payload: its check is taken
    // from the payload's last byte on, and fails.
    let mut batch = preamble(&h);
    batch.extend(frame_claiming(2, ranges.len() as u32 - 1, &ranges));
    assert_batch_refused(&s, "a frame one byte short", &batch, "checksum");

    // The trailer's hash and the header's expected state.
    let body = crafted(&h, std::slice::from_ref(&ranges));
    let trailer_at = body.len() - (5 + 1 + 1 + 32 + 8);
    let payload = body[trailer_at + 5..body.len() - 8].to_vec();
    for (what, t, want) in [
        ("trailer hash short", short(&payload), "does not decode"),
        ("trailer hash long", long(&payload), "unused bytes"),
    ] {
        let mut batch = body[..trailer_at].to_vec();
        batch.extend(frame(3, &t));
        assert_batch_refused(&s, what, &batch, want);
    }
    let header_payload = postcard::to_stdvec(&h).unwrap();
    // source_id, replica_id, from_seq (1 byte), to_seq (1 byte), then
    // expected_state.
    let state_end = 16 + 16 + 1 + 1 + 32;
    for (what, hp) in [
        (
            "expected state short",
            [
                &header_payload[..state_end - 1],
                &header_payload[state_end..],
            ]
            .concat(),
        ),
        (
            "expected state long",
            [
                &header_payload[..state_end],
                &[0][..],
                &header_payload[state_end..],
            ]
            .concat(),
        ),
    ] {
        let mut batch = MAGIC.to_vec();
        batch.extend_from_slice(&VERSION.to_le_bytes());
        batch.extend(frame(1, &hp));
        assert_batch_refused(&s, what, &batch, "header frame");
    }

    // The same operations whole apply.
    let mut push = Push::open(&s.replica);
    assert!(matches!(
        push.send(&[write_ranges("f", b"file", 0, b"F")]),
        ToSender::Applied(_)
    ));
    let whole = Op::Delta {
        path: p("f"),
        base: Hash::of(b"File"),
        delta: literal(b"new"),
        result: Hash::of(b"new"),
    };
    assert!(matches!(push.send(&[whole]), ToSender::Applied(_)));
    assert_eq!(fs::read(s.replica.join("f")).unwrap(), b"new");
    push.close();
    s.assert_outside_unchanged("hash fields");
}

// ---- the header's bounds ----

/// A batch may not carry more operations or content bytes than its header
/// declares (the writer never makes one), nor end with a trailer whose
/// counts are not what came: refused at the first operation beyond the
/// bound, or at the trailer, with nothing applied.
#[test]
fn the_headers_op_count_and_content_bytes_bound_the_batch() {
    let s = scene();
    let a = postcard::to_stdvec(&create("a", b"12345")).unwrap();
    let b = postcard::to_stdvec(&create("b", b"6")).unwrap();
    let bounded = |op_count, content_bytes| BatchHeader {
        op_count,
        content_bytes,
        ..header(0, 1)
    };
    let cases = [
        (
            "op_count 1, two ops",
            crafted(&bounded(1, 100), &[a.clone(), b.clone()]),
            "more operations than the header's bound of 1",
        ),
        (
            "op_count 0, one op",
            crafted(&bounded(0, 100), std::slice::from_ref(&a)),
            "more operations than the header's bound of 0",
        ),
        (
            "content_bytes 5, six bytes",
            crafted(&bounded(2, 5), &[a.clone(), b.clone()]),
            "more content bytes than the header's bound of 5",
        ),
        (
            "a trailer counting one op",
            crafted_with_trailer(&bounded(2, 6), &[a.clone(), b.clone()], 1, 6),
            "operation count is 1",
        ),
        (
            "a trailer counting five content bytes",
            crafted_with_trailer(&bounded(2, 6), &[a.clone(), b.clone()], 2, 5),
            "content byte count is 5",
        ),
    ];
    for (what, batch, want) in cases {
        assert_batch_refused(&s, what, &batch, want);
    }
    s.assert_outside_unchanged("bounds");
}

// ---- deltas ----

/// CVE-2024-12085's class, in the delta: a command that copies from
/// beyond the end of its base (which would read memory that is not the
/// base), with offsets and lengths whose sum wraps, a literal longer than
/// the delta, an empty copy. Refused, in place and as a new file's delta;
/// the file stays as it was.
#[test]
fn a_delta_that_reads_outside_its_base_is_refused() {
    let s = scene();
    let base = b"0123456789";
    fs::write(s.replica.join("doc"), base).unwrap();
    let mut push = Push::open(&s.replica);
    let replica = s.replica_now();
    let n8 = |x: u64| x.to_be_bytes();
    let copy8 = |offset: u64, len: u64| [&[0x54][..], &n8(offset), &n8(len)].concat();
    let deltas = [
        delta(&[0x45, 5, 100]),
        delta(&[0x45, 10, 1]),
        delta(&copy8(1 << 63, 1 << 63)),
        delta(&copy8(u64::MAX, u64::MAX)),
        delta(&copy8(2, u64::MAX - 1)),
        delta(&[&[0x44][..], &n8(u64::MAX), b"short"].concat()),
        delta(&[0x45, 0, 0]),
    ];
    for d in deltas {
        for op in [
            Op::Delta {
                path: p("doc"),
                base: Hash::of(base),
                delta: d.clone(),
                result: Hash::default(),
            },
            Op::CreateFromDelta {
                path: p("new"),
                basis: p("doc"),
                base: Hash::of(base),
                delta: d.clone(),
                mode: 0o644,
                result: Hash::default(),
            },
        ] {
            let message = push.refused(std::slice::from_ref(&op));
            assert!(
                message.contains("the delta does not apply"),
                "{d:?}: {message}"
            );
            assert_eq!(s.replica_now(), replica, "{d:?}");
        }
    }
    push.close();
    s.assert_outside_unchanged("deltas");
}

// ---- a directory swapped for a symlink during the transfer ----

/// The replica's `d/keep` holds what `outside/keep` holds, so that a base
/// hash would match through the symlink too.
fn swap_scene() -> Scene {
    let s = scene();
    fs::create_dir(s.replica.join("d")).unwrap();
    fs::write(s.replica.join("d/keep"), KEEP).unwrap();
    s
}

/// Someone with write access to the replica swaps `d` for a symlink to
/// `outside/` (keeping the directory as `d.moved`).
fn swap(s: &Scene) -> impl FnOnce() + Send + 'static {
    let (d, outside) = (s.replica.join("d"), s.outside.clone());
    move || {
        fs::rename(&d, d.with_extension("moved")).unwrap();
        symlink(&outside, &d).unwrap();
    }
}

/// What the swap left: `d` a symlink, the directory as it was.
fn assert_swapped_and_unchanged(s: &Scene, what: &str) {
    assert!(
        fs::symlink_metadata(s.replica.join("d"))
            .unwrap()
            .file_type()
            .is_symlink(),
        "{what}: the swap did not happen"
    );
    assert_eq!(fs::read(s.replica.join("d.moved/keep")).unwrap(), KEEP);
    let names: Vec<_> = fs::read_dir(s.replica.join("d.moved")).unwrap().collect();
    assert_eq!(names.len(), 1, "{what}: d.moved/ changed");
    s.assert_outside_unchanged(what);
}

/// The batch of the swap tests: content written in place under `d`, new
/// entries made there, metadata changed there.
fn swap_batch() -> Vec<Op> {
    vec![
        create("d/new", b"new"),
        Op::Mkdir {
            path: p("d/dir"),
            mode: 0o755,
        },
        Op::Chmod {
            path: p("d/keep"),
            mode: 0o600,
        },
        write_ranges("d/keep", KEEP, 0, b"X"),
    ]
}

/// The swap between the receiver's `Ready` and the batch: the batch is
/// checked against the replica as it is when it arrives.
#[test]
fn a_directory_swapped_for_a_symlink_before_the_batch_arrives_is_refused() {
    let s = swap_scene();
    let mut push = Push::open(&s.replica);
    swap(&s)();
    let message = push.refused(&swap_batch());
    assert!(message.contains("symlink"), "{message}");
    assert_swapped_and_unchanged(&s, "swapped before the batch");
    push.close();
}

/// The receiver's input, which runs `hook` once, when the receiver first
/// asks for the byte at offset `at` of the stream. A read never crosses
/// `at`, so no buffer holds the bytes after it early: when the hook runs,
/// the receiver has read every byte before `at` and acted on it.
struct Gate<R> {
    inner: R,
    pos: u64,
    at: u64,
    hook: Option<Box<dyn FnOnce() + Send>>,
}

impl<R: Read> Read for Gate<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos == self.at
            && let Some(hook) = self.hook.take()
        {
            hook();
        }
        let room = match self.at.checked_sub(self.pos) {
            Some(left) if left > 0 => buf.len().min(usize::try_from(left).unwrap_or(usize::MAX)),
            _ => buf.len(),
        };
        let n = self.inner.read(&mut buf[..room])?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// Sends `ops` as one batch to a receiver of `s`'s replica, running
/// `swap` once the receiver has staged every operation and before it
/// reads the trailer (so before anything is committed); the receiver's
/// answer. The receiver must end well: a refusal keeps the stream in step.
fn swap_while_staged(s: &Scene, ops: &[Op]) -> String {
    let mut w = BatchWriter::new(Vec::new(), header(0, 1)).unwrap();
    for op in ops {
        w.push(op).unwrap();
    }
    let before_trailer = w.bytes_written();
    let batch = w.finish().unwrap().0;
    let (hello, announce) = (hello(), framed(&ToReceiver::Batch));
    let at = (hello.len() + announce.len()) as u64 + before_trailer;
    let hook = Box::new(swap(s));
    let (mut ours, receiver) = serve(&s.replica, move |stream| Gate {
        inner: stream,
        pos: 0,
        at,
        hook: Some(hook),
    });
    let mut greeting = [0u8; 8];
    ours.read_exact(&mut greeting).unwrap();
    ours.write_all(&[hello, announce, batch, framed(&ToReceiver::Done)].concat())
        .unwrap();
    let mut replies = Vec::new();
    while let Some(m) = message::receive::<ToSender>(&mut ours).unwrap() {
        replies.push(m);
    }
    let received = receiver.join().expect("the receiver does not panic");
    received.expect("a refused batch keeps the stream in step");
    match replies.as_slice() {
        [ToSender::Ready { .. }, ToSender::Failed { message, .. }] => message.clone(),
        other => panic!("{other:?}"),
    }
}

/// CVE-2024-12747's class, on the receiving side: the swap comes after
/// the receiver has staged the batch (checked that `d` is a directory,
/// and `d/keep`'s base hash) and before its trailer, so before the commit,
/// which resolves every path again. New entries and metadata: the commit
/// refuses the symlink at its first step and keeps its log; once the
/// directory is back, the next connection finishes the batch where it
/// belongs. With an in-place write as well: refused all the same.
#[test]
fn a_directory_swapped_for_a_symlink_while_its_batch_is_staged_is_refused() {
    let s = swap_scene();
    let message = swap_while_staged(&s, &swap_batch()[..3]);
    assert!(
        message.contains("commit step 0") && message.contains("symlink"),
        "{message}"
    );
    assert_swapped_and_unchanged(&s, "new entries and metadata");
    fs::remove_file(s.replica.join("d")).unwrap();
    fs::rename(s.replica.join("d.moved"), s.replica.join("d")).unwrap();
    let push = Push::open(&s.replica);
    assert_eq!(push.seq, 1, "the commit was not finished");
    assert_eq!(fs::read(s.replica.join("d/new")).unwrap(), b"new");
    assert!(s.replica.join("d/dir").is_dir());
    let mode = fs::metadata(s.replica.join("d/keep")).unwrap().mode();
    assert_eq!(mode & 0o7777, 0o600);
    push.close();
    s.assert_outside_unchanged("finished");

    let s = swap_scene();
    let message = swap_while_staged(&s, &swap_batch());
    assert!(message.contains("symlink"), "{message}");
    assert_swapped_and_unchanged(&s, "an in-place write");
}

// ---- memory ----

/// Staging holds every operation of a batch until its commit (its model of
/// the replica and its commit log), so a stream of tiny operations would
/// grow the receiver without bound: what a batch holds is counted, and a
/// batch past `ApplyOptions::max_held` (4 GiB by default) is refused
/// before its commit, the replica unchanged. Shown here with a small bound.
#[test]
fn a_batch_of_many_small_operations_is_refused_past_the_memory_bound() {
    let s = scene();
    let ops: Vec<Op> = (0..20_000u32)
        .map(|i| Op::Chmod {
            path: RelPath::root(),
            mode: 0o700 | (i & 1),
        })
        .collect();
    let mut w = BatchWriter::new(Vec::new(), header(0, 1)).unwrap();
    for op in &ops {
        w.push(op).unwrap();
    }
    let (bytes, _) = w.finish().unwrap();
    let before = snapshot(&s.replica);
    let options = crate::apply::ApplyOptions {
        max_held: 1 << 20,
        ..crate::apply::ApplyOptions::default()
    };
    let err = crate::apply::apply(&s.replica, &bytes[..], &options).unwrap_err();
    assert!(
        err.to_string().contains("too large to apply at once"),
        "{err}"
    );
    assert_eq!(snapshot(&s.replica), before);
    // The default bound takes this batch.
    crate::apply::apply(
        &s.replica,
        &bytes[..],
        &crate::apply::ApplyOptions::default(),
    )
    .unwrap();
}

// ---- a hostile receiver ----

/// A receiver that greets, reads the sender's `Hello`, answers `reply`
/// (raw bytes), closes its side and reads until the sender hangs up.
fn fake_receiver(reply: Vec<u8>) -> (UnixStream, JoinHandle<()>) {
    let (ours, mut theirs) = UnixStream::pair().unwrap();
    let handle = std::thread::spawn(move || {
        theirs.write_all(&GREETING).unwrap();
        let hello = message::receive::<ToReceiver>(&mut theirs).unwrap();
        assert!(matches!(hello, Some(ToReceiver::Hello { .. })), "{hello:?}");
        let _ = theirs.write_all(&reply);
        let _ = theirs.shutdown(Shutdown::Write);
        let _ = io::copy(&mut theirs, &mut io::sink());
    });
    (ours, handle)
}

fn open_against(
    reply: Vec<u8>,
) -> Result<(Connection<UnixStream, UnixStream>, super::Ready), RemoteError> {
    let (stream, fake) = fake_receiver(reply);
    let opened = Connection::open(stream.try_clone().unwrap(), stream, "");
    if opened.is_err() {
        fake.join().unwrap();
    }
    opened
}

/// The sender's side: a receiver's message is bounded before anything is
/// allocated for it (its length, the kept list's count), a count that
/// claims more than the message holds fails as the bytes run out, and a
/// message out of turn or with bytes left over is refused.
#[test]
fn a_hostile_receiver_is_refused_by_the_sender() {
    let ready = |kept: usize| {
        framed(&ToSender::Ready {
            applied: None,
            kept: (0..kept as u64)
                .map(|i| {
                    let mut h = [0u8; 32];
                    h[..8].copy_from_slice(&i.to_le_bytes());
                    Hash(h)
                })
                .collect(),
            partial: None,
        })
    };
    let (_, fine) = open_against(ready(MAX_KEPT)).expect("MAX_KEPT hashes are fine");
    assert_eq!(fine.kept.len(), MAX_KEPT);

    let length = |len: u32, payload: &[u8]| [&len.to_le_bytes()[..], payload].concat();
    // Ready { applied: None, kept: 2^60 hashes }, with one hash's bytes.
    let mut claims = vec![0, 0];
    varint(1 << 60, &mut claims);
    claims.extend_from_slice(&[0; 32]);
    let mut left_over = ready(0);
    left_over[0] += 1;
    left_over.push(0);
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "one hash too many",
            ready(MAX_KEPT + 1),
            "kept files, more than",
        ),
        (
            "a message over the limit",
            length(MAX_MESSAGE + 1, b"x"),
            "over the limit",
        ),
        (
            "a length of 2^32 - 1",
            length(u32::MAX, b""),
            "over the limit",
        ),
        (
            "2^60 kept hashes",
            length(claims.len() as u32, &claims),
            "undecodable",
        ),
        (
            "a length that lies",
            length(1 << 20, b"0123456789"),
            "ends inside a message",
        ),
        ("bytes left over", left_over, "left over"),
        (
            "an answer before any batch",
            framed(&ToSender::Failed {
                message: "x".into(),
                base_mismatch: None,
            }),
            "expected Ready",
        ),
    ];
    for (what, reply, want) in cases {
        match open_against(reply) {
            Ok(_) => panic!("{what}: accepted"),
            Err(e) => assert!(e.to_string().contains(want), "{what}: {e}"),
        }
    }

    // After a batch: an answer whose warnings claim 2^60 strings, and a
    // message out of turn.
    let mut applied =
        postcard::to_stdvec(&ToSender::Applied(crate::apply::ApplyReport::default())).unwrap();
    assert_eq!(applied.pop(), Some(0), "the warnings' count comes last");
    varint(1 << 60, &mut applied);
    for (what, answer, want) in [
        (
            "2^60 warnings",
            length(applied.len() as u32, &applied),
            "undecodable",
        ),
        ("Ready again", ready(0), "expected the answer to a batch"),
    ] {
        let (mut conn, _) = open_against([ready(0), answer].concat()).unwrap();
        let w = conn.batch(header(0, 1)).unwrap();
        w.finish().unwrap();
        let err = conn.outcome().expect_err(what);
        assert!(err.to_string().contains(want), "{what}: {err}");
    }
}
