//! The receiving end of the protocol on a hostile sender: whatever bytes a
//! sender writes, `replicator::remote::receive` must return (an error or
//! not) without panicking or hanging, must never change anything outside
//! the replica root, and must leave the replica as it was unless it
//! committed a batch.
//!
//! The input is the whole stream a sender writes to a receiver (messages,
//! and the batches that follow `Batch`). Each input gets a fresh temporary
//! directory (under `TMPDIR`) holding the replica `r/` of the `apply_batch`
//! target (the same tree: `replicator::fuzz_scene::populate`) and a sibling `outside/` that
//! `r/out` points to. The replica's state also holds what earlier
//! connections that failed left in `kept/` (`fuzz_scene::keep`): a complete file
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
//! for the same tree and state.
#![no_main]

use std::fs;
use std::path::Path;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use replicator::apply::read_applied;
use replicator::batch::{BatchHeader, BatchReader, BatchWriter, MAGIC, Op, RelPath};
use replicator::fuzz_scene::{HEADER, OP, TRAILER, defuse, keep, next_frame, populate, snapshot};
use replicator::remote::{GREETING, MAX_MESSAGE, PROTOCOL, ToReceiver, ToSender, receive};

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
