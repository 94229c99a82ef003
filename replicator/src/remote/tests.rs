//! The protocol judged from both ends over real byte streams (socket
//! pairs), with hand-made batches: what a receiver answers, what it keeps
//! of a batch cut off, and how it treats a sender that breaks the rules.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

use super::message::{self, GREETING, MAX_MESSAGE, PROTOCOL, ToReceiver, ToSender};
use super::test_ops::{self, create, p};
use super::{Connection, Received, RemoteError, receive};
use crate::batch::{BatchHeader, Hash, Op};

const SOURCE: [u8; 16] = [3; 16];

fn header(from: u64, to: u64) -> BatchHeader {
    test_ops::header(SOURCE, from, to)
}

/// A receiver serving `replica` on one end of a socket pair.
fn serve(replica: &Path) -> (UnixStream, JoinHandle<Result<Received, RemoteError>>) {
    let (ours, theirs) = UnixStream::pair().unwrap();
    let replica = replica.to_path_buf();
    let handle = std::thread::spawn(move || {
        let w = theirs.try_clone().unwrap();
        receive(theirs, w, move |name| {
            if name.is_empty() {
                Ok(replica.clone())
            } else {
                Err(format!("no replica {name}"))
            }
        })
    });
    (ours, handle)
}

fn connect(
    replica: &Path,
) -> (
    Connection<UnixStream, UnixStream>,
    super::Ready,
    JoinHandle<Result<Received, RemoteError>>,
) {
    let (stream, handle) = serve(replica);
    let (conn, ready) = Connection::open(stream.try_clone().unwrap(), stream, "").unwrap();
    (conn, ready, handle)
}

fn send_batch(
    conn: &mut Connection<UnixStream, UnixStream>,
    from: u64,
    to: u64,
    ops: &[Op],
) -> ToSender {
    let mut w = conn.batch(header(from, to)).unwrap();
    for op in ops {
        w.push(op).unwrap();
    }
    w.finish().unwrap();
    conn.outcome().unwrap()
}

struct Dirs {
    _dir: tempfile::TempDir,
    replica: PathBuf,
}

fn dirs() -> Dirs {
    let dir = tempfile::tempdir().unwrap();
    let replica = dir.path().join("r");
    std::fs::create_dir(&replica).unwrap();
    Dirs { replica, _dir: dir }
}

#[test]
fn batches_apply_skip_and_refuse_with_the_stream_kept_in_step() {
    let d = dirs();
    let (mut conn, ready, handle) = connect(&d.replica);
    assert_eq!(ready.applied, None);
    assert!(ready.kept.is_empty());

    let ToSender::Applied(r) = send_batch(&mut conn, 0, 5, &[create("a", b"hello")]) else {
        panic!("the first batch was not applied");
    };
    assert_eq!((r.to_seq, r.skipped), (5, false));
    assert_eq!(std::fs::read(d.replica.join("a")).unwrap(), b"hello");

    // The same batch again: skipped, and its bytes are read past.
    let ToSender::Applied(r) = send_batch(&mut conn, 0, 5, &[create("a", b"hello")]) else {
        panic!("a batch already applied was not skipped");
    };
    assert!(r.skipped);

    // A base that does not match: refused, its op named, nothing changed;
    // the rest of the batch is read, so the next batch still goes.
    let wrong = Op::WriteRanges {
        path: p("a"),
        ranges: vec![crate::batch::WriteRange {
            offset: 0,
            data: b"J".to_vec(),
        }],
        base: Hash::of(b"not what the replica holds"),
        result: Hash::of(b"Jello"),
    };
    let reply = send_batch(
        &mut conn,
        5,
        9,
        &[create("b", b"b"), wrong, create("c", b"c")],
    );
    let ToSender::Failed {
        base_mismatch,
        message,
    } = reply
    else {
        panic!("a wrong base was applied");
    };
    assert_eq!(base_mismatch, Some(2), "{message}");
    assert!(!d.replica.join("b").exists());

    // A gap: refused with a message that names the missing seqs.
    let ToSender::Failed { message, .. } = send_batch(&mut conn, 7, 9, &[create("x", b"x")]) else {
        panic!("a gap was applied");
    };
    assert!(message.contains("seq 6 to 7"), "{message}");

    let ToSender::Applied(r) = send_batch(&mut conn, 5, 9, &[create("b", b"b")]) else {
        panic!("the corrected batch was not applied");
    };
    assert_eq!(r.to_seq, 9);
    conn.close().unwrap();
    let received = handle.join().unwrap().unwrap();
    assert_eq!((received.applied, received.seq), (2, 9));
}

#[test]
fn a_batch_cut_off_keeps_its_complete_files_for_the_next_connection() {
    let d = dirs();
    let big: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i * 7 + i / 1000) as u8)
        .collect();
    let small = b"small file".to_vec();
    {
        let (mut conn, _, handle) = connect(&d.replica);
        let mut w = conn.batch(header(0, 4)).unwrap();
        w.push(&create("dir-less-big", &big)).unwrap();
        w.push(&create("small", &small)).unwrap();
        w.push(&Op::BeginFile {
            path: p("streamed"),
            mode: 0o600,
            size: 10 << 20,
        })
        .unwrap();
        // Cut off inside the streamed file: the connection drops.
        drop(w);
        drop(conn);
        let err = handle.join().unwrap().unwrap_err();
        assert!(matches!(err, RemoteError::Protocol(_)), "{err}");
    }
    assert!(
        std::fs::read_dir(&d.replica).unwrap().next().is_none(),
        "a cut-off batch changed the replica"
    );

    let (mut conn, ready, handle) = connect(&d.replica);
    let expected: std::collections::HashSet<Hash> = [Hash::of(&big), Hash::of(&small)].into();
    assert_eq!(ready.kept, expected, "the complete files were not kept");
    let kept = |path: &str, data: &[u8]| Op::CreateFromKept {
        path: p(path),
        mode: 0o640,
        result: Hash::of(data),
    };
    let reply = send_batch(
        &mut conn,
        0,
        4,
        &[
            kept("big", &big),
            kept("small", &small),
            create("new", b"n"),
        ],
    );
    let ToSender::Applied(r) = reply else {
        panic!("kept content was not taken: {reply:?}");
    };
    assert_eq!(r.to_seq, 4);
    assert_eq!(std::fs::read(d.replica.join("big")).unwrap(), big);
    assert_eq!(std::fs::read(d.replica.join("small")).unwrap(), small);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(d.replica.join("big"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o7777, 0o640);

    // Kept content is gone once a batch commits: naming it again fails
    // and changes nothing.
    let ToSender::Failed { message, .. } = send_batch(&mut conn, 4, 5, &[kept("again", &small)])
    else {
        panic!("kept content was used twice");
    };
    assert!(message.contains("kept no content"), "{message}");
    conn.close().unwrap();
    handle.join().unwrap().unwrap();
}

/// Runs a receiver and feeds it `bytes` as the sender; returns what it
/// answered (after its greeting) and how it ended.
fn hostile(replica: &Path, bytes: &[u8]) -> (Vec<ToSender>, Result<Received, RemoteError>) {
    let (mut ours, handle) = serve(replica);
    let mut greeting = [0u8; 8];
    ours.read_exact(&mut greeting).unwrap();
    assert_eq!(greeting, GREETING);
    // The receiver may stop reading early: a failed write is part of the
    // test, not an error of it.
    let _ = ours.write_all(bytes);
    let _ = ours.shutdown(std::net::Shutdown::Write);
    let mut replies = Vec::new();
    while let Ok(Some(m)) = message::receive::<ToSender>(&mut ours) {
        replies.push(m);
    }
    (replies, handle.join().unwrap())
}

fn framed<T: serde::Serialize>(msg: &T) -> Vec<u8> {
    let mut out = Vec::new();
    message::send(&mut out, msg).unwrap();
    out
}

#[test]
fn a_hostile_sender_is_refused_and_changes_nothing() {
    let d = dirs();
    let hello = framed(&ToReceiver::Hello {
        protocol: PROTOCOL,
        replica: String::new(),
    });
    let mut huge = hello.clone();
    huge.extend_from_slice(&(MAX_MESSAGE + 1).to_le_bytes());
    let mut garbage_batch = hello.clone();
    garbage_batch.extend(framed(&ToReceiver::Batch));
    garbage_batch.extend_from_slice(b"FERRYBT\n\x01\0\0\0\x01\xff\xff\xff\x7fxx");
    let mut no_done = hello.clone();
    no_done.extend(framed(&ToReceiver::Hello {
        protocol: PROTOCOL,
        replica: String::new(),
    }));
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("nothing", Vec::new()),
        (
            "a wrong version",
            framed(&ToReceiver::Hello {
                protocol: 99,
                replica: String::new(),
            }),
        ),
        (
            "another replica",
            framed(&ToReceiver::Hello {
                protocol: PROTOCOL,
                replica: "../x".into(),
            }),
        ),
        ("an oversized message", huge),
        ("not a message", vec![3, 0, 0, 0, 0xff, 0xff, 0xff]),
        ("a length that lies", vec![0xff, 0xff, 0xff, 0x00, 1, 2, 3]),
        ("a batch with a lying frame length", garbage_batch),
        ("a second Hello", no_done),
    ];
    for (what, bytes) in cases {
        let (replies, ended) = hostile(&d.replica, &bytes);
        assert!(ended.is_err(), "{what}: the receiver took it");
        if let Some(ToSender::Refused { message }) = replies.first() {
            assert!(!message.is_empty(), "{what}");
        }
        assert!(
            std::fs::read_dir(&d.replica).unwrap().next().is_none(),
            "{what}: the replica changed"
        );
    }
    let (replies, _) = hostile(
        &d.replica,
        &framed(&ToReceiver::Hello {
            protocol: 99,
            replica: String::new(),
        }),
    );
    let [ToSender::Refused { message }] = &replies[..] else {
        panic!("no refusal: {replies:?}");
    };
    assert!(message.contains("protocol 99"), "{message}");
}

#[test]
fn a_sender_meeting_something_else_than_a_receiver_says_so() {
    let (mut ours, theirs) = UnixStream::pair().unwrap();
    std::thread::spawn(move || {
        let _ = ours.write_all(b"Welcome to the machine!\n");
    });
    let err = Connection::open(theirs.try_clone().unwrap(), theirs, "")
        .err()
        .expect("a banner is not a greeting");
    let msg = err.to_string();
    assert!(
        msg.contains("not `ferry receive`") && msg.contains("Welcome"),
        "{msg}"
    );
}

#[test]
fn two_connections_to_one_replica_take_turns() {
    let d = dirs();
    let (mut first, _, first_handle) = connect(&d.replica);
    let (opened_tx, opened_rx) = std::sync::mpsc::channel();
    let replica = d.replica.clone();
    let second = std::thread::spawn(move || {
        let (conn, ready, handle) = connect(&replica);
        opened_tx.send(ready.applied.map(|a| a.seq)).unwrap();
        (conn, handle)
    });
    let ToSender::Applied(r) = send_batch(&mut first, 0, 5, &[create("a", b"first")]) else {
        panic!("the first connection's batch was not applied");
    };
    assert_eq!(r.to_seq, 5);
    // The second connection waits for the replica while the first holds it.
    assert!(
        opened_rx.try_recv().is_err(),
        "a second connection opened the replica while the first held it"
    );
    first.close().unwrap();
    first_handle.join().unwrap().unwrap();
    // It then sees what the first one left.
    assert_eq!(opened_rx.recv().unwrap(), Some(5));
    let (conn, handle) = second.join().unwrap();
    conn.close().unwrap();
    handle.join().unwrap().unwrap();
}

/// Whether the replica's lock is free right now (no session holds it).
fn lock_is_free(replica: &Path) -> bool {
    use nix::fcntl::{Flock, FlockArg};
    let path = crate::apply::state_dir(replica).unwrap().join("lock");
    let file = std::fs::File::open(path).unwrap();
    Flock::lock(file, FlockArg::LockExclusiveNonblock).is_ok()
}

#[test]
fn a_released_connection_unlocks_the_replica_and_opens_again() {
    let d = dirs();
    let (mut kept, ready, handle) = connect(&d.replica);
    assert_eq!(ready.applied, None);
    let ToSender::Applied(_) = send_batch(&mut kept, 0, 5, &[create("a", b"first")]) else {
        panic!("the first batch was not applied");
    };
    assert!(
        !lock_is_free(&d.replica),
        "a session did not lock the replica"
    );
    kept.release().unwrap();
    assert!(lock_is_free(&d.replica), "Release left the replica locked");
    let (mut other, ready, other_handle) = connect(&d.replica);
    assert_eq!(ready.applied.map(|a| a.seq), Some(5));
    let ToSender::Applied(_) = send_batch(&mut other, 5, 7, &[create("b", b"other")]) else {
        panic!("the other connection's batch was not applied");
    };
    other.close().unwrap();
    other_handle.join().unwrap().unwrap();

    // The kept connection opens again and sees what the other one did.
    let ready = kept.reopen("").unwrap();
    assert_eq!(ready.applied.map(|a| a.seq), Some(7));
    let ToSender::Applied(_) = send_batch(&mut kept, 7, 9, &[create("c", b"again")]) else {
        panic!("a batch on the reopened connection was not applied");
    };
    kept.release().unwrap();
    // A released connection that simply ends is a clean end.
    drop(kept);
    let received = handle.join().unwrap().unwrap();
    assert_eq!((received.applied, received.seq), (2, 9));
    assert!(lock_is_free(&d.replica));
    for (name, data) in [("a", "first"), ("b", "other"), ("c", "again")] {
        assert_eq!(std::fs::read_to_string(d.replica.join(name)).unwrap(), data);
    }
}

#[test]
fn a_file_cut_off_in_the_middle_is_continued_where_it_stopped() {
    let d = dirs();
    let data: Vec<u8> = (0..12_000_000u32)
        .map(|i| (i % 251) as u8 ^ (i >> 13) as u8)
        .collect();
    let piece = |offset: usize, len: usize| Op::FileData {
        offset: offset as u64,
        data: crate::batch::Chunk::Raw(data[offset..offset + len].to_vec()),
    };
    // A push cut off after the file's first 7 MiB: the rest never comes.
    let cut_off = || {
        let (mut conn, _, handle) = connect(&d.replica);
        let mut w = conn.batch(header(0, 3)).unwrap();
        w.push(&Op::BeginFile {
            path: p("big"),
            mode: 0o600,
            size: data.len() as u64,
        })
        .unwrap();
        w.push(&piece(0, 4 << 20)).unwrap();
        w.push(&piece(4 << 20, 3 << 20)).unwrap();
        drop(w);
        drop(conn);
        assert!(handle.join().unwrap().is_err());
    };
    cut_off();
    let have = 7 << 20;
    let resume = |content: &[u8]| {
        vec![
            Op::ResumeFile {
                path: p("big"),
                mode: 0o640,
                size: data.len() as u64,
                from: have as u64,
            },
            Op::FileData {
                offset: have as u64,
                data: crate::batch::Chunk::Raw(content[have..].to_vec()),
            },
            Op::EndFile {
                result: Hash::of(content),
            },
        ]
    };

    // A sender whose file now starts differently: the replica's start does
    // not match, which the sender hears as a base mismatch (and sends the
    // file whole).
    let (mut conn, ready, handle) = connect(&d.replica);
    let partial = ready.partial.expect("the partial file is listed");
    assert_eq!(
        (partial.path, partial.size, partial.have),
        (p("big"), data.len() as u64, have as u64)
    );
    let mut changed = data.clone();
    changed[100] ^= 1;
    let ToSender::Failed { base_mismatch, .. } = send_batch(&mut conn, 0, 3, &resume(&changed))
    else {
        panic!("a resumed file with another start was applied");
    };
    assert_eq!(base_mismatch, Some(1));
    conn.close().unwrap();
    handle.join().unwrap().unwrap();

    // Cut off again, then continued with the right start.
    cut_off();
    let (mut conn, ready, handle) = connect(&d.replica);
    assert_eq!(ready.partial.map(|p| p.have), Some(have as u64));
    let ToSender::Applied(r) = send_batch(&mut conn, 0, 3, &resume(&data)) else {
        panic!("the resumed file was not applied");
    };
    assert_eq!(r.to_seq, 3);
    assert_eq!(std::fs::read(d.replica.join("big")).unwrap(), data);
    conn.close().unwrap();
    handle.join().unwrap().unwrap();
}
