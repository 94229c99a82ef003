//! The seed corpus of the `receive` fuzz target
//! (`fuzz/fuzz_targets/receive.rs`), and the inputs it found, kept as
//! tests.
//!
//! The seeds are real sender streams (messages, and batches as a `ferry
//! push` writes them) for the replica the target makes before each input:
//! `populate` and `keep` of `crate::fuzz_scene`, which the `apply_batch`
//! target shares. The test that writes them serves
//! each one to that tree with [`receive`] and checks what the receiver
//! answers, how it ends, and that the directory beside the replica that
//! `r/out` points to did not change, so that a change to the receiver or
//! the applier that makes a seed go elsewhere shows there first.

use std::fs;
use std::path::Path;

use super::message::{self, GREETING, PROTOCOL, ToReceiver, ToSender};
use super::test_ops::{create, p};
use super::{Received, RemoteError, receive};
use crate::batch::{ANY_REPLICA, BatchHeader, BatchWriter, Chunk, Hash, Op, WriteRange};
use crate::fuzz_scene::{KEPT, RESUMED_HAVE, RESUMED_SIZE, keep, listing, populate, resumed};

/// The source id of the `apply_batch` seeds, which these streams carry.
const SOURCE: [u8; 16] = [0x5e; 16];

/// A batch as `ferry push` writes it (unbounded header counts).
fn seal(from: u64, to: u64, ops: &[Op]) -> Vec<u8> {
    let header = BatchHeader {
        source_id: SOURCE,
        replica_id: ANY_REPLICA,
        from_seq: from,
        to_seq: to,
        expected_state: [0; 32],
        created_unix_ns: 1_700_000_000_000_000_000,
        op_count: u64::MAX,
        content_bytes: u64::MAX,
    };
    let mut w = BatchWriter::new(Vec::new(), header).expect("header");
    for op in ops {
        w.push(op).expect("a well-formed op");
    }
    w.finish().expect("trailer").0
}

/// A sender's stream, message by message.
struct Stream(Vec<u8>);

impl Stream {
    /// Starts with `Hello` for `replica`.
    fn hello(replica: &str) -> Stream {
        Stream(Vec::new()).message(&ToReceiver::Hello {
            protocol: PROTOCOL,
            replica: replica.to_string(),
        })
    }

    fn message(mut self, msg: &ToReceiver) -> Stream {
        message::send(&mut self.0, msg).expect("a message to a Vec");
        self
    }

    /// `Batch`, then `batch`'s bytes.
    fn batch(self, batch: &[u8]) -> Stream {
        let mut s = self.message(&ToReceiver::Batch);
        s.0.extend_from_slice(batch);
        s
    }

    fn done(self) -> Vec<u8> {
        self.message(&ToReceiver::Done).0
    }
}

/// Serves `stream` to the replica `r` (the empty name; any other is
/// refused); returns the receiver's answers and how it ended.
fn serve(r: &Path, stream: &[u8]) -> (Vec<ToSender>, Result<Received, RemoteError>) {
    let mut written = Vec::new();
    let ended = receive(stream, &mut written, |name| {
        if name.is_empty() {
            Ok(r.to_path_buf())
        } else {
            Err(format!("no replica {name:?} here"))
        }
    });
    assert_eq!(written[..GREETING.len()], GREETING);
    let mut rest = &written[GREETING.len()..];
    let mut answers = Vec::new();
    while let Some(m) = message::receive::<ToSender>(&mut rest).expect("a whole answer") {
        answers.push(m);
    }
    (answers, ended)
}

/// An answer as the seeds expect it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    Ready,
    Refused,
    Applied,
    Skipped,
    Failed,
    /// `Failed` with `base_mismatch` naming this op.
    BaseMismatch(u64),
    Released,
}

fn answer(m: &ToSender) -> Answer {
    match m {
        ToSender::Ready { .. } => Answer::Ready,
        ToSender::Refused { .. } => Answer::Refused,
        ToSender::Applied(r) if r.skipped => Answer::Skipped,
        ToSender::Applied(_) => Answer::Applied,
        ToSender::Failed {
            base_mismatch: Some(i),
            ..
        } => Answer::BaseMismatch(*i),
        ToSender::Failed { .. } => Answer::Failed,
        ToSender::Released => Answer::Released,
    }
}

/// A seed of the `apply_batch` target (a batch from seq 0 to 1).
fn apply_seed(name: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus/apply_batch")
        .join(name);
    fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (write the apply_batch seeds first)",
            path.display()
        )
    })
}

/// Writes the `receive` target's seed corpus when asked (a relative
/// directory is taken from the workspace root):
/// `FERRY_FUZZ_CORPUS=fuzz/corpus/receive cargo test -p ferry-replicator --lib -- --ignored write_receive_fuzz_seed_corpus`
///
/// The streams take their batches from the `apply_batch` seeds (written
/// by `write_apply_fuzz_seed_corpus`: run that first when the batch
/// format changes) and from the few made here.
#[test]
#[ignore = "writes files; run explicitly to refresh the receive fuzz corpus"]
fn write_receive_fuzz_seed_corpus() {
    use Answer::*;

    let Some(corpus) = std::env::var_os("FERRY_FUZZ_CORPUS") else {
        return;
    };
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(corpus);
    fs::create_dir_all(&corpus).expect("create corpus dir");

    // A second batch, for a replica the "mkdir" seed took to seq 1.
    let second = seal(
        1,
        2,
        &[
            create("new/inner/f", b"second batch\n"),
            Op::Rename {
                from: p("a.txt"),
                to: p("new/a.txt"),
                exchange: false,
            },
            Op::Chmod {
                path: p("sub/z"),
                mode: 0o700,
            },
        ],
    );
    // An in-place change whose base is not a.txt's content: the replica's
    // copy changed behind ferry's back, as far as the sender can tell.
    let edited = b"Jello, replica\n";
    let wrong_base = Op::WriteRanges {
        path: p("a.txt"),
        ranges: vec![WriteRange {
            offset: 0,
            data: b"J".to_vec(),
        }],
        base: Hash::of(b"hello, replica, as the sender saw it\n"),
        result: Hash::of(edited),
    };
    const STAGED: &[u8] = b"staged before the base mismatch, kept after it\n";
    let every_op = apply_seed("every-op");
    // The rest of the file the replica kept the start of, as a sender
    // told of it in `Ready` sends it.
    let resumed = resumed();
    let resume = seal(
        0,
        1,
        &[
            Op::ResumeFile {
                path: p("resumed.bin"),
                mode: 0o644,
                size: RESUMED_SIZE,
                from: RESUMED_HAVE,
            },
            Op::FileData {
                offset: RESUMED_HAVE,
                data: Chunk::Raw(resumed[RESUMED_HAVE as usize..].to_vec()),
            },
            Op::EndFile {
                result: Hash::of(&resumed),
            },
        ],
    );

    let seeds: Vec<(&str, Vec<u8>, &[Answer], bool)> = vec![
        ("hello-done", Stream::hello("").done(), &[Ready], true),
        (
            "unknown-replica",
            Stream::hello("elsewhere").done(),
            &[Refused],
            false,
        ),
        (
            "one-mkdir",
            Stream::hello("").batch(&apply_seed("mkdir")).done(),
            &[Ready, Applied],
            true,
        ),
        (
            "one-create-plain",
            Stream::hello("").batch(&apply_seed("create-plain")).done(),
            &[Ready, Applied],
            true,
        ),
        (
            "one-delta",
            Stream::hello("").batch(&apply_seed("delta")).done(),
            &[Ready, Applied],
            true,
        ),
        (
            "one-streamed",
            Stream::hello("").batch(&apply_seed("streamed")).done(),
            &[Ready, Applied],
            true,
        ),
        (
            "one-every-op",
            Stream::hello("").batch(&every_op).done(),
            &[Ready, Applied],
            true,
        ),
        (
            "one-escape-create",
            Stream::hello("").batch(&apply_seed("escape-create")).done(),
            &[Ready, Failed],
            true,
        ),
        (
            "two-batches",
            Stream::hello("")
                .batch(&apply_seed("mkdir"))
                .batch(&second)
                .done(),
            &[Ready, Applied, Applied],
            true,
        ),
        // A kept connection: released after a batch, opened again for
        // the next push, released, and ended.
        (
            "release-and-reopen",
            Stream(
                Stream::hello("")
                    .batch(&apply_seed("mkdir"))
                    .message(&ToReceiver::Release)
                    .0,
            )
            .message(&ToReceiver::Hello {
                protocol: PROTOCOL,
                replica: String::new(),
            })
            .batch(&second)
            .message(&ToReceiver::Release)
            .0,
            &[Ready, Applied, Released, Ready, Applied, Released],
            true,
        ),
        (
            "again-skipped",
            Stream::hello("")
                .batch(&apply_seed("create-plain"))
                .batch(&apply_seed("create-plain"))
                .done(),
            &[Ready, Applied, Skipped],
            true,
        ),
        (
            "cut-mid-batch",
            Stream::hello("").batch(&every_op[..every_op.len() / 2]).0,
            &[Ready, Failed],
            false,
        ),
        (
            "wrong-base",
            Stream::hello("")
                .batch(&seal(0, 1, std::slice::from_ref(&wrong_base)))
                .done(),
            &[Ready, BaseMismatch(1)],
            true,
        ),
        // The sender sends the batch again with the file whole. The new
        // file staged before the mismatch is kept, and taken from `kept/`
        // (a sender only sends `CreateFromKept` for what a `Ready` listed,
        // on a later connection; the receiver takes it in this one too).
        (
            "wrong-base-then-whole",
            Stream::hello("")
                .batch(&seal(0, 1, &[create("k.txt", STAGED), wrong_base.clone()]))
                .batch(&seal(
                    0,
                    1,
                    &[
                        Op::CreateFromKept {
                            path: p("k.txt"),
                            mode: 0o644,
                            result: Hash::of(STAGED),
                        },
                        create("a.txt", edited),
                    ],
                ))
                .done(),
            &[Ready, BaseMismatch(2), Applied],
            true,
        ),
        (
            "from-kept",
            Stream::hello("")
                .batch(&seal(
                    0,
                    1,
                    &[Op::CreateFromKept {
                        path: p("sub/k.txt"),
                        mode: 0o600,
                        result: Hash::of(KEPT),
                    }],
                ))
                .done(),
            &[Ready, Applied],
            true,
        ),
        (
            "resume",
            Stream::hello("").batch(&resume).done(),
            &[Ready, Applied],
            true,
        ),
        // Cut again, inside the rest of the resumed file.
        (
            "resume-cut",
            Stream::hello("").batch(&resume[..resume.len() - 10_000]).0,
            &[Ready, Failed],
            false,
        ),
    ];

    for (name, stream, expected, ok) in seeds {
        let dir = tempfile::tempdir().expect("tempdir");
        let (r, outside) = populate(dir.path());
        keep(&dir.path().join(".r.ferry"));
        let outside_before = listing(&outside);
        let (answers, ended) = serve(&r, &stream);
        let got: Vec<Answer> = answers.iter().map(answer).collect();
        assert_eq!(got, expected, "{name}: {answers:?} {ended:?}");
        assert_eq!(ended.is_ok(), ok, "{name}: {ended:?}");
        assert_eq!(
            listing(&outside),
            outside_before,
            "{name}: outside/ changed"
        );
        fs::write(corpus.join(name), &stream).expect("write seed");
    }
}
