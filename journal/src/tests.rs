//! Tests of the journal as the mount uses it: open, recovery, reconcile,
//! durability, and crash consistency with a simulated disk.

use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use crate::lock::LockFile;
use crate::log::mem::MemStore;
use crate::log::{Frames, LogStore};
use crate::recovery::open_with;
use crate::{
    FileId, FileKind, InodeKey, Journal, JournalError, Op, OpenOptions, Origin, Record, RenameMode,
    read_records, summarize,
};

struct Fixture {
    _tmp: tempfile::TempDir,
    state: std::path::PathBuf,
    src: std::path::PathBuf,
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().expect("tempdir");
    let state = tmp.path().join("state");
    let src = tmp.path().join("src");
    fs::create_dir_all(src.join("d")).expect("mkdir");
    fs::write(src.join("a"), b"alpha").expect("write");
    fs::write(src.join("d/b"), b"beta").expect("write");
    fs::hard_link(src.join("a"), src.join("d/a2")).expect("link");
    fs::create_dir_all(&state).expect("mkdir");
    Fixture {
        _tmp: tmp,
        state,
        src,
    }
}

/// Long timers, so that only explicit syncs and close write durably.
fn quiet() -> OpenOptions {
    OpenOptions {
        sync_interval: Duration::from_secs(3600),
        checkpoint_interval: Duration::from_secs(3600),
        ..OpenOptions::default()
    }
}

fn key_of(p: &Path) -> InodeKey {
    let md = fs::symlink_metadata(p).expect("stat");
    InodeKey {
        dev: md.dev(),
        ino: md.ino(),
    }
}

fn records(state: &Path) -> Vec<Record> {
    read_records(state)
        .expect("read")
        .collect::<Result<Vec<_>, _>>()
        .expect("records")
}

fn assert_gapless(rs: &[Record]) {
    for (i, r) in rs.iter().enumerate() {
        assert_eq!(r.seq.0, i as u64 + 1, "records numbered 1.. without a gap");
    }
}

#[test]
fn fresh_open_records_the_baseline() {
    let f = fixture();
    let (j, rec) = Journal::open(&f.state, &f.src, &quiet()).expect("open");
    assert!(rec.fresh && !rec.unclean);
    assert_eq!(rec.scanned, 4);
    let a = j.lookup(key_of(&f.src.join("a"))).expect("a known");
    assert_eq!(
        j.lookup(key_of(&f.src.join("d/a2"))),
        Some(a),
        "hard links share a FileId"
    );
    assert_eq!(j.path_of(a).expect("path"), Path::new("a"));
    assert_eq!(j.path_of(FileId::ROOT).expect("root"), Path::new(""));
    assert!(
        !j.file_state(a).expect("state").is_dirty(),
        "baseline files are clean"
    );
    let st = j.status();
    assert_eq!((st.files, st.dirty_files), (4, 0));
    j.close().expect("close");

    let rs = records(&f.state);
    assert_gapless(&rs);
    assert!(matches!(rs[0].op, Op::MountStart { recovered: false }));
    assert_eq!(
        rs.iter()
            .filter(|r| matches!(r.op, Op::Exists { .. }))
            .count(),
        4
    );
    assert!(matches!(rs.last().map(|r| &r.op), Some(Op::MountStop)));
    let s = summarize(&f.state).expect("summarize");
    assert_eq!((s.files, s.last_seq), (4, rs.last().expect("last").seq));

    // A clean reopen scans nothing and records only the session.
    let (j, rec) = Journal::open(&f.state, &f.src, &quiet()).expect("reopen");
    assert!(!rec.fresh && !rec.unclean);
    assert_eq!((rec.scanned, rec.reconciled), (0, 0));
    assert_eq!(
        j.lookup(key_of(&f.src.join("d/b")))
            .and_then(|id| j.path_of(id))
            .expect("b"),
        Path::new("d/b")
    );
    j.close().expect("close");
}

#[test]
fn second_open_is_locked_and_other_source_refused() {
    let f = fixture();
    let (j, _) = Journal::open(&f.state, &f.src, &quiet()).expect("open");
    match Journal::open(&f.state, &f.src, &quiet()) {
        Err(JournalError::Locked { holder, .. }) => assert_eq!(holder, Some(std::process::id())),
        other => panic!("expected Locked, got {other:?}"),
    }
    j.close().expect("close");
    let other = f.state.parent().expect("parent").join("other");
    fs::create_dir_all(&other).expect("mkdir");
    match Journal::open(&f.state, &other, &quiet()) {
        Err(e @ JournalError::WrongSource { .. }) => {
            assert!(e.to_string().contains("another state directory"))
        }
        other => panic!("expected WrongSource, got {other:?}"),
    }
}

#[test]
fn file_ids_are_never_reused_across_reopen() {
    let f = fixture();
    let mut seen = Vec::new();
    for round in 0..3 {
        let (j, _) = Journal::open(&f.state, &f.src, &quiet()).expect("open");
        let name = format!("n{round}");
        fs::write(f.src.join(&name), b"x").expect("write");
        let id = j.created(
            FileId::ROOT,
            OsStr::new(&name),
            key_of(&f.src.join(&name)),
            FileKind::File,
        );
        fs::remove_file(f.src.join(&name)).expect("rm");
        j.unlinked(id, FileId::ROOT, OsStr::new(&name));
        assert!(seen.iter().all(|s| *s < id), "{id} after {seen:?}");
        seen.push(id);
        if round == 1 {
            drop(j); // unclean: the next id must come from the log, not the index
        } else {
            j.close().expect("close");
        }
    }
    assert_gapless(&records(&f.state));
}

#[test]
fn namespace_calls_keep_the_table_truthful() {
    let f = fixture();
    let (j, _) = Journal::open(&f.state, &f.src, &quiet()).expect("open");
    let d = j.lookup(key_of(&f.src.join("d"))).expect("d");
    let b = j.lookup(key_of(&f.src.join("d/b"))).expect("b");
    j.renamed(
        b,
        d,
        OsStr::new("b"),
        FileId::ROOT,
        OsStr::new("b2"),
        RenameMode::NoReplace,
        None,
    );
    assert_eq!(j.path_of(b).expect("b"), Path::new("b2"));
    // A known inode met at a name the table does not know.
    j.identify(
        d,
        OsStr::new("b3"),
        key_of(&f.src.join("d/b")),
        FileKind::File,
    );
    assert_eq!(j.file_state(b).map(|s| s.id()), Some(b));
    let e = j.shared.live.lock().table.get(b).map(|e| e.names.len());
    assert_eq!(e, Some(2));
    // An inode appearing behind the mount's back.
    fs::write(f.src.join("new"), b"n").expect("write");
    let n = j.identify(
        FileId::ROOT,
        OsStr::new("new"),
        key_of(&f.src.join("new")),
        FileKind::File,
    );
    assert_eq!(
        j.identify(
            FileId::ROOT,
            OsStr::new("new"),
            key_of(&f.src.join("new")),
            FileKind::File
        ),
        n
    );
    j.unlinked(b, FileId::ROOT, OsStr::new("b2"));
    j.unlinked(b, d, OsStr::new("b3"));
    assert!(j.file_state(b).is_none());
    assert_eq!(
        j.lookup(key_of(&f.src.join("d/b"))),
        None,
        "key mapping dropped with the last name"
    );
    j.close().expect("close");
    let rs = records(&f.state);
    assert!(rs.iter().any(|r| matches!(
        r.op,
        Op::Link {
            origin: Origin::Reconcile,
            ..
        }
    )));
    assert!(
        rs.iter()
            .any(|r| matches!(r.op, Op::Create { id, origin: Origin::Reconcile, .. } if id == n))
    );
}

#[test]
fn note_write_makes_dirty_durable_before_returning() {
    let f = fixture();
    let lock = LockFile::acquire(&f.state).expect("lock");
    let store = MemStore::default();
    let (j, _) =
        open_with(&f.state, &f.src, &quiet(), lock, Box::new(store.clone())).expect("open");
    let a = j.lookup(key_of(&f.src.join("a"))).expect("a");
    let st = j.file_state(a).expect("state");
    j.note_write(&st, 0, 3).expect("note_write");
    assert!(st.is_dirty());
    // What a power cut right now would leave on disk.
    let durable = mem_records(&store.after_crash(0));
    assert!(
        durable.iter().any(|r| r.op == Op::Dirty { id: a }),
        "Dirty is durable"
    );
    // The second write to a dirty file records nothing and waits for nothing.
    let before = j.status().last_seq;
    j.note_write(&st, 100, 3).expect("note_write");
    j.note_write(&st, 3, 97).expect("note_write");
    assert_eq!(j.status().last_seq, before);
    j.sync().expect("sync");
    let durable = mem_records(&store.after_crash(0));
    let w = durable.iter().find_map(|r| match &r.op {
        Op::Write { id, ranges } if *id == a => Some(ranges.clone()),
        _ => None,
    });
    assert_eq!(
        w,
        Some(vec![crate::ByteRange {
            offset: 0,
            len: 103
        }])
    );
    j.close().expect("close");
}

#[test]
fn note_write_is_in_the_real_log_file_before_returning() {
    let f = fixture();
    let (j, _) = Journal::open(&f.state, &f.src, &quiet()).expect("open");
    let a = j.lookup(key_of(&f.src.join("a"))).expect("a");
    let st = j.file_state(a).expect("state");
    j.note_write(&st, 0, 1).expect("note_write");
    // Another process's view: `ferry log` while the mount runs.
    assert!(
        records(&f.state)
            .iter()
            .any(|r| r.op == Op::Dirty { id: a })
    );
    j.close().expect("close");
}

#[test]
fn concurrent_first_writes_share_fsyncs_and_all_become_dirty() {
    let f = fixture();
    for i in 0..16 {
        fs::write(f.src.join(format!("f{i}")), b"x").expect("write");
    }
    let (j, _) = Journal::open(&f.state, &f.src, &quiet()).expect("open");
    let ids: Vec<FileId> = (0..16)
        .map(|i| {
            j.lookup(key_of(&f.src.join(format!("f{i}"))))
                .expect("known")
        })
        .collect();
    std::thread::scope(|s| {
        for t in 0..8 {
            let j = j.clone();
            let ids = ids.clone();
            s.spawn(move || {
                for (k, id) in ids.iter().enumerate() {
                    let st = j.file_state(*id).expect("state");
                    j.note_write(&st, (t * 100 + k) as u64, 10)
                        .expect("note_write");
                    assert!(st.is_dirty());
                }
            });
        }
    });
    assert_eq!(j.status().dirty_files, 16);
    j.close().expect("close");
    let rs = records(&f.state);
    assert_gapless(&rs);
    for id in ids {
        let n = rs.iter().filter(|r| r.op == Op::Dirty { id }).count();
        assert_eq!(n, 1, "one Dirty per file, however many threads raced");
    }
}

#[test]
fn truncate_and_rewritten() {
    let f = fixture();
    let (j, _) = Journal::open(&f.state, &f.src, &quiet()).expect("open");
    let a = j.lookup(key_of(&f.src.join("a"))).expect("a");
    let b = j.lookup(key_of(&f.src.join("d/b"))).expect("b");
    let sa = j.file_state(a).expect("a");
    let sb = j.file_state(b).expect("b");
    j.note_write(&sa, 0, 4).expect("write");
    j.truncate(&sa, 2).expect("truncate");
    j.mark_rewritten(&sb, Origin::Mount).expect("rewritten");
    j.mark_rewritten(&sb, Origin::Mount)
        .expect("rewritten again");
    assert!(sb.is_dirty());
    j.close().expect("close");
    let ops: Vec<Op> = records(&f.state).into_iter().map(|r| r.op).collect();
    let pos = |want: &Op| ops.iter().position(|o| o == want);
    let w = pos(&Op::Write {
        id: a,
        ranges: vec![crate::ByteRange { offset: 0, len: 4 }],
    })
    .expect("write");
    let t = pos(&Op::Truncate { id: a, size: 2 }).expect("truncate");
    assert!(
        w < t,
        "ranges written before a truncate are recorded before it"
    );
    assert_eq!(
        ops.iter()
            .filter(|o| matches!(o, Op::Rewritten { id, .. } if *id == b))
            .count(),
        1
    );
    assert!(
        !ops.contains(&Op::Dirty { id: b }),
        "Rewritten itself makes a clean file dirty"
    );
}

#[test]
fn unclean_stop_reconciles_changes_made_behind_the_mount() {
    let f = fixture();
    fs::write(f.src.join("keep"), b"same").expect("write");
    fs::write(f.src.join("gone"), b"bye").expect("write");
    let (j, _) = Journal::open(&f.state, &f.src, &quiet()).expect("open");
    let k = |p: &str| j.lookup(key_of(&f.src.join(p))).expect(p);
    let (a, b, d, gone, keep) = (k("a"), k("d/b"), k("d"), k("gone"), k("keep"));
    // A file the mount wrote to: its ranges are in memory only.
    let sb = j.file_state(b).expect("b");
    j.note_write(&sb, 0, 1).expect("write");
    drop(sb);
    drop(j); // like kill -9: no close

    // Changes made directly in the source while no mount ran.
    std::thread::sleep(Duration::from_millis(20)); // mtime granularity
    fs::write(f.src.join("created"), b"new file").expect("create");
    fs::rename(f.src.join("d"), f.src.join("d-renamed")).expect("rename dir");
    fs::hard_link(f.src.join("keep"), f.src.join("keep-link")).expect("link");
    fs::remove_file(f.src.join("gone")).expect("unlink");
    fs::write(f.src.join("a"), b"alpha, changed").expect("change content");

    let (j, rec) = Journal::open(&f.state, &f.src, &quiet()).expect("reopen");
    assert!(rec.unclean && !rec.fresh);
    assert!(rec.reconciled >= 6, "{rec:?}");
    assert_eq!(j.path_of(d).expect("d"), Path::new("d-renamed"));
    assert_eq!(j.path_of(b).expect("b"), Path::new("d-renamed/b"));
    assert!(j.file_state(gone).is_none());
    let created = j
        .lookup(key_of(&f.src.join("created")))
        .expect("created is known");
    j.close().expect("close");

    let rs = records(&f.state);
    assert_gapless(&rs);
    let start = rs
        .iter()
        .rposition(|r| matches!(r.op, Op::MountStart { .. }))
        .expect("start");
    let ops: Vec<&Op> = rs[start..].iter().map(|r| &r.op).collect();
    assert_eq!(ops[0], &Op::MountStart { recovered: true });
    let has = |f: &dyn Fn(&Op) -> bool| ops.iter().any(|o| f(o));
    assert!(has(
        &|o| matches!(o, Op::Create { id, origin: Origin::Reconcile, .. } if *id == created)
    ));
    assert!(has(
        &|o| matches!(o, Op::Rename { id, origin: Origin::Reconcile, .. } if *id == d)
    ));
    assert!(has(
        &|o| matches!(o, Op::Link { id, origin: Origin::Reconcile, .. } if *id == keep)
    ));
    assert!(has(
        &|o| matches!(o, Op::Unlink { id, origin: Origin::Reconcile, .. } if *id == gone)
    ));
    assert!(has(
        &|o| matches!(o, Op::Rewritten { id, origin: Origin::Reconcile } if *id == a)
    ));
    assert!(
        has(&|o| matches!(o, Op::Rewritten { id, origin: Origin::Reconcile } if *id == b)),
        "dirty file escalated"
    );
    assert!(
        !has(&|o| matches!(o, Op::Rewritten { id, .. } if *id == keep)),
        "unchanged content is not rewritten"
    );

    // Snapshots were refreshed: a forced reconcile now finds nothing.
    let opts = OpenOptions {
        force_reconcile: true,
        ..quiet()
    };
    let (j, rec) = Journal::open(&f.state, &f.src, &opts).expect("reopen");
    assert!(!rec.unclean);
    j.close().expect("close");
    let rs = records(&f.state);
    let start = rs
        .iter()
        .rposition(|r| matches!(r.op, Op::MountStart { .. }))
        .expect("start");
    assert_eq!(rec.reconciled, 0, "{rec:?} {:?}", &rs[start..]);
}

#[test]
fn reconcile_spots_hard_link_count_drop_and_attr_change() {
    let f = fixture();
    let (j, _) = Journal::open(&f.state, &f.src, &quiet()).expect("open");
    let a = j.lookup(key_of(&f.src.join("a"))).expect("a");
    j.close().expect("close");
    fs::remove_file(f.src.join("d/a2")).expect("unlink one name");
    let mut perm = fs::metadata(f.src.join("a")).expect("stat").permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o600);
    fs::set_permissions(f.src.join("a"), perm).expect("chmod");
    let opts = OpenOptions {
        force_reconcile: true,
        ..quiet()
    };
    let (j, _) = Journal::open(&f.state, &f.src, &opts).expect("reopen");
    assert!(j.file_state(a).is_some(), "still has a name");
    j.close().expect("close");
    let ops: Vec<Op> = records(&f.state).into_iter().map(|r| r.op).collect();
    assert!(
        ops.iter()
            .any(|o| matches!(o, Op::Unlink { id, origin: Origin::Reconcile, .. } if *id == a))
    );
    assert!(ops.iter().any(
        |o| matches!(o, Op::SetAttr { id, change, origin: Origin::Reconcile } if *id == a && change.mode == Some(0o600))
    ));
}

fn mem_records(store: &MemStore) -> Vec<Record> {
    let mut out = Vec::new();
    for seg in store.list().expect("list") {
        let data = store.read(seg).expect("read");
        for fr in Frames::new(&data) {
            match fr {
                Ok((_, r)) => out.push(r),
                Err(_) => break,
            }
        }
    }
    out
}

/// A fixed workload: creates, writes, renames, syncs. Returns the highest
/// sequence number a successful `sync` acknowledged.
fn workload(j: &Journal, src: &Path) -> Result<u64, JournalError> {
    let mut acked = 0;
    for i in 0..6u64 {
        let name = format!("w{i}");
        let id = j.created(
            FileId::ROOT,
            OsStr::new(&name),
            InodeKey {
                dev: 0,
                ino: 1000 + i,
            },
            FileKind::File,
        );
        let st = j.file_state(id).expect("created file is known");
        j.note_write(&st, i * 10, 10)?;
        let a = j.lookup(key_of(&src.join("a"))).expect("a");
        let sa = j.file_state(a).expect("a");
        j.note_write(&sa, i, 1)?;
        if i % 2 == 0 {
            j.renamed(
                id,
                FileId::ROOT,
                OsStr::new(&name),
                FileId::ROOT,
                OsStr::new(&format!("r{i}")),
                RenameMode::Replace,
                None,
            );
        }
        j.sync()?;
        acked = j.status().last_seq.0;
    }
    Ok(acked)
}

#[test]
fn crash_after_every_sync_recovers_a_gapless_prefix() {
    let mut n = 0;
    loop {
        let f = fixture();
        let store = MemStore::crashing_after(n);
        let lock = LockFile::acquire(&f.state).expect("lock");
        let acked = match open_with(&f.state, &f.src, &quiet(), lock, Box::new(store.clone())) {
            Ok((j, _)) => {
                let acked = workload(&j, &f.src).unwrap_or(0);
                let closed = j.close();
                if !store.crashed() {
                    // No crash point left in the workload: done.
                    closed.expect("close");
                    assert!(n > 5, "the workload syncs more than a few times");
                    return;
                }
                acked
            }
            Err(_) => 0,
        };
        let written = mem_records(&store);
        for torn in [0usize, 5, 13, 200] {
            let image = store.after_crash(torn);
            // A reboot: the redb index is real and survives; the log is the image.
            let sub = tempfile::tempdir().expect("tempdir");
            copy_dir(&f.state, sub.path());
            let lock = LockFile::acquire(sub.path()).expect("lock");
            let (j, rec) = open_with(sub.path(), &f.src, &quiet(), lock, Box::new(image.clone()))
                .unwrap_or_else(|e| panic!("recovery after crash at sync {n} (torn {torn}): {e}"));
            assert!(rec.unclean || rec.fresh, "crash at {n}: {rec:?}");
            j.close().expect("close");
            let got = mem_records(&image);
            assert_gapless(&got);
            let last_before = got
                .iter()
                .rposition(|r| matches!(r.op, Op::MountStart { .. }))
                .unwrap_or(0);
            let recovered = &got[..last_before];
            assert!(
                recovered.len() as u64 >= acked,
                "crash at {n}: acknowledged {acked}, recovered {}",
                recovered.len()
            );
            assert_eq!(
                recovered,
                &written[..recovered.len()],
                "crash at {n}: recovered records are a prefix"
            );
        }
        n += 1;
        assert!(n < 200, "workload never finished");
    }
}

fn copy_dir(from: &Path, to: &Path) {
    for e in fs::read_dir(from).expect("read_dir") {
        let e = e.expect("entry");
        let dest = to.join(e.file_name());
        if e.file_type().expect("type").is_dir() {
            fs::create_dir_all(&dest).expect("mkdir");
            copy_dir(&e.path(), &dest);
        } else {
            fs::copy(e.path(), &dest).expect("copy");
        }
    }
}

#[test]
fn timer_records_ranges_and_checkpoint_shortens_replay() {
    let f = fixture();
    let opts = OpenOptions {
        sync_interval: Duration::from_millis(10),
        checkpoint_interval: Duration::from_millis(50),
        ..OpenOptions::default()
    };
    let (j, _) = Journal::open(&f.state, &f.src, &opts).expect("open");
    let a = j.lookup(key_of(&f.src.join("a"))).expect("a");
    let st = j.file_state(a).expect("a");
    j.note_write(&st, 7, 3).expect("write");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !records(&f.state)
        .iter()
        .any(|r| matches!(&r.op, Op::Write { id, .. } if *id == a))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the sync timer records pending ranges"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(200)); // a few checkpoints
    assert!(j.status().log_bytes > 0 && j.status().index_bytes > 0);
    drop(j);
    let (j, rec) = Journal::open(&f.state, &f.src, &quiet()).expect("reopen");
    assert!(rec.unclean);
    assert_eq!(rec.replayed, 0, "everything was checkpointed: {rec:?}");
    assert!(
        j.file_state(a).expect("a").is_dirty(),
        "dirty state survives via the checkpoint"
    );
    j.close().expect("close");
}

#[test]
fn index_lost_is_rebuilt_from_the_log() {
    let f = fixture();
    let (j, _) = Journal::open(&f.state, &f.src, &quiet()).expect("open");
    let a = j.lookup(key_of(&f.src.join("a"))).expect("a");
    j.close().expect("close");
    fs::remove_file(f.state.join("journal/index.redb")).expect("rm index");
    let (j, rec) = Journal::open(&f.state, &f.src, &quiet()).expect("reopen");
    assert!(!rec.fresh && rec.replayed > 0, "{rec:?}");
    assert_eq!(j.lookup(key_of(&f.src.join("a"))), Some(a));
    j.close().expect("close");
    assert_gapless(&records(&f.state));
}

#[test]
fn a_closed_journal_refuses_writes_but_keeps_its_table() {
    let f = fixture();
    let (j, _) = Journal::open(&f.state, &f.src, &quiet()).expect("open");
    let other = j.clone();
    let a = j.lookup(key_of(&f.src.join("a"))).expect("a");
    j.close().expect("close");
    let st = other.file_state(a).expect("a");
    assert!(matches!(
        other.note_write(&st, 0, 1),
        Err(JournalError::Closed)
    ));
    assert!(matches!(other.sync(), Err(JournalError::Closed)));
    let id = other.created(
        FileId::ROOT,
        OsStr::new("late"),
        InodeKey { dev: 0, ino: 77 },
        FileKind::File,
    );
    assert!(other.file_state(id).is_some());
    // The lock was released by close, not by the last drop.
    let (j, rec) = Journal::open(&f.state, &f.src, &quiet()).expect("reopen");
    assert!(!rec.unclean);
    j.close().expect("close");
    drop(other);
}

mod model {
    //! Model test: random namespace calls against the journal and against a
    //! plain map of names; the journal's table, its reopened table (from
    //! checkpoint and/or replay), and a `PathTracker` over the log must all
    //! agree with the model.

    use std::collections::{BTreeMap, BTreeSet};

    use proptest::prelude::*;

    use super::*;
    use crate::PathTracker;

    #[derive(Clone, Debug)]
    enum Call {
        Create {
            parent: usize,
            name: u8,
            dir: bool,
        },
        Link {
            file: usize,
            parent: usize,
            name: u8,
        },
        Unlink {
            file: usize,
            which: usize,
        },
        Rename {
            file: usize,
            which: usize,
            parent: usize,
            name: u8,
        },
        Write {
            file: usize,
        },
    }

    fn call() -> impl Strategy<Value = Call> {
        prop_oneof![
            (0..8usize, 0..4u8, any::<bool>()).prop_map(|(parent, name, dir)| Call::Create {
                parent,
                name,
                dir
            }),
            (0..8usize, 0..8usize, 0..4u8).prop_map(|(file, parent, name)| Call::Link {
                file,
                parent,
                name
            }),
            (0..8usize, 0..3usize).prop_map(|(file, which)| Call::Unlink { file, which }),
            (0..8usize, 0..3usize, 0..8usize, 0..4u8).prop_map(|(file, which, parent, name)| {
                Call::Rename {
                    file,
                    which,
                    parent,
                    name,
                }
            }),
            (0..8usize).prop_map(|file| Call::Write { file }),
        ]
    }

    type Names = BTreeSet<(FileId, Vec<u8>)>;

    fn table_names(j: &Journal) -> BTreeMap<FileId, Names> {
        let live = j.shared.live.lock();
        live.table
            .entries()
            .filter(|(id, _)| *id != FileId::ROOT)
            .map(|(id, e)| (id, e.names.iter().map(|(p, n)| (*p, n.0.clone())).collect()))
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
        #[test]
        fn table_matches_model_across_reopen(calls in proptest::collection::vec(call(), 1..40), checkpoint in any::<bool>(), clean in any::<bool>()) {
            let tmp = tempfile::tempdir().expect("tempdir");
            let (state, src) = (tmp.path().join("state"), tmp.path().join("src"));
            fs::create_dir_all(&src).expect("mkdir");
            let opts = OpenOptions {
                checkpoint_interval: if checkpoint { Duration::from_millis(1) } else { Duration::from_secs(3600) },
                ..quiet()
            };
            let (j, _) = Journal::open(&state, &src, &opts).expect("open");
            let mut model: BTreeMap<FileId, (bool, Names)> = BTreeMap::new();
            let mut ino = 1000;
            let pick = |model: &BTreeMap<FileId, (bool, Names)>, i: usize, dirs: bool| -> Option<FileId> {
                let v: Vec<FileId> = model.iter().filter(|(_, (d, _))| !dirs || *d).map(|(id, _)| *id).collect();
                if dirs && (v.is_empty() || i % (v.len() + 1) == v.len()) {
                    return Some(FileId::ROOT);
                }
                if v.is_empty() { None } else { Some(v[i % v.len()]) }
            };
            for c in calls {
                match c {
                    Call::Create { parent, name, dir } => {
                        let p = pick(&model, parent, true).expect("root at least");
                        ino += 1;
                        let kind = if dir { FileKind::Dir } else { FileKind::File };
                        let n = vec![b'a' + name];
                        let id = j.created(p, OsStr::from_bytes(&n), InodeKey { dev: 0, ino }, kind);
                        model.insert(id, (dir, [(p, n)].into_iter().collect()));
                    }
                    Call::Link { file, parent, name } => {
                        let (Some(f), Some(p)) = (pick(&model, file, false), pick(&model, parent, true)) else { continue };
                        if model[&f].0 { continue }
                        let n = vec![b'l' + name];
                        j.linked(f, p, OsStr::from_bytes(&n));
                        model.get_mut(&f).expect("picked").1.insert((p, n));
                    }
                    Call::Unlink { file, which } => {
                        let Some(f) = pick(&model, file, false) else { continue };
                        let (dir, names) = model[&f].clone();
                        let (p, n) = names.iter().nth(which % names.len()).cloned().expect("has a name");
                        if dir {
                            j.rmdired(f, p, OsStr::from_bytes(&n));
                            model.remove(&f);
                        } else {
                            j.unlinked(f, p, OsStr::from_bytes(&n));
                            let e = model.get_mut(&f).expect("picked");
                            e.1.remove(&(p, n));
                            if e.1.is_empty() { model.remove(&f); }
                        }
                    }
                    Call::Rename { file, which, parent, name } => {
                        let (Some(f), Some(p)) = (pick(&model, file, false), pick(&model, parent, true)) else { continue };
                        if p == f { continue }
                        let names = model[&f].1.clone();
                        let (fp, fname) = names.iter().nth(which % names.len()).cloned().expect("has a name");
                        let n = vec![b'r' + name];
                        if names.contains(&(p, n.clone())) { continue }
                        j.renamed(f, fp, OsStr::from_bytes(&fname), p, OsStr::from_bytes(&n), RenameMode::NoReplace, None);
                        let e = model.get_mut(&f).expect("picked");
                        e.1.remove(&(fp, fname));
                        e.1.insert((p, n));
                    }
                    Call::Write { file } => {
                        let Some(f) = pick(&model, file, false) else { continue };
                        let st = j.file_state(f).expect("live file");
                        j.note_write(&st, 0, 1).expect("write");
                    }
                }
            }
            let want: BTreeMap<FileId, Names> = model.iter().map(|(id, (_, n))| (*id, n.clone())).collect();
            prop_assert_eq!(&table_names(&j), &want);
            let paths: BTreeMap<FileId, Option<std::path::PathBuf>> = want.keys().map(|id| (*id, j.path_of(*id))).collect();
            if checkpoint { std::thread::sleep(Duration::from_millis(20)); }
            if clean { j.close().expect("close") } else { drop(j) }

            let mut tracker = PathTracker::new();
            for r in read_records(&state).expect("read") {
                tracker.apply(&r.expect("record"));
            }
            for (id, p) in &paths {
                prop_assert_eq!(&tracker.path_of(*id), p);
            }
            // The table as recovery rebuilds it (checkpoint + replay), before
            // an unclean reopen's reconcile would remove these fake inodes.
            let index = crate::index::Index::open(&state.join("journal/index.redb")).expect("index");
            let meta = index.meta().expect("meta");
            let mut t = index.load_table(&meta).expect("table");
            let mut store = crate::log::FsStore::new(state.join("journal/log"));
            crate::log::replay(&mut store, meta.checkpoint_seq, |r| t.apply(r)).expect("replay");
            let rebuilt: BTreeMap<FileId, Names> = t
                .entries()
                .filter(|(id, _)| *id != FileId::ROOT)
                .map(|(id, e)| (id, e.names.iter().map(|(p, n)| (*p, n.0.clone())).collect()))
                .collect();
            prop_assert_eq!(&rebuilt, &want);
            drop(index);
            if clean {
                let (j, rec) = Journal::open(&state, &src, &quiet()).expect("reopen");
                prop_assert!(!rec.unclean);
                prop_assert_eq!(&table_names(&j), &want);
                j.close().expect("close");
            }
        }
    }

    use std::os::unix::ffi::OsStrExt;
}

mod replication {
    //! What a push needs: the barrier, the tree and records since a
    //! replica's sequence number (from the history or the log, alike), the
    //! freeze, taking files clean, and the replica cache.

    use super::*;
    use crate::changeset::Changeset;
    use crate::id::Seq;

    fn open(f: &Fixture) -> Journal {
        Journal::open(&f.state, &f.src, &quiet()).expect("open").0
    }

    #[test]
    fn history_and_log_give_the_same_pending_changes() {
        let f = fixture();
        let j = open(&f);
        let first = j.barrier();
        j.durable(first).unwrap();
        let seed = j.pending(Seq(0), first).unwrap();
        assert_eq!(seed.before.seq(), Seq(0));
        let mut after = seed.before.clone();
        for r in &seed.records {
            after.apply(r);
        }
        j.remember(after);
        let c = j.created(
            FileId::ROOT,
            OsStr::new("new"),
            InodeKey { dev: 9, ino: 900 },
            FileKind::File,
        );
        let a = j.lookup(key_of(&f.src.join("a"))).unwrap();
        j.renamed(
            a,
            FileId::ROOT,
            OsStr::new("a"),
            FileId::ROOT,
            OsStr::new("z"),
            RenameMode::Replace,
            None,
        );
        let to = j.barrier();
        j.durable(to).unwrap();
        let from_history = j.pending(first, to).unwrap();
        let from_log = j.pending_from_log(first, to).unwrap();
        assert_eq!(from_history.records, from_log.records);
        let ch = Changeset::compute(&from_history.before, &from_history.records);
        assert_eq!(ch, Changeset::compute(&from_log.before, &from_log.records));
        assert!(ch.files[&c].created());
        assert!(ch.files[&a].names_changed());
        assert!(!j.nothing_to_push(first, to));
        j.close().unwrap();
    }

    #[test]
    fn a_replica_ahead_of_the_log_is_refused() {
        let f = fixture();
        let j = open(&f);
        let to = j.barrier();
        assert!(matches!(
            j.pending(Seq(to.0 + 5), to),
            Err(JournalError::Ahead { .. })
        ));
        j.close().unwrap();
    }

    #[test]
    fn freezing_stops_changes_and_settling_takes_the_file_clean() {
        let f = fixture();
        let j = open(&f);
        let a = j.lookup(key_of(&f.src.join("a"))).unwrap();
        let st = j.file_state(a).unwrap();
        j.note_write(&st, 0, 3).unwrap();
        assert!(st.is_dirty());
        let frozen = j.freeze(a).unwrap();
        assert!(
            st.changes.try_read().is_none(),
            "a change got past the freeze"
        );
        let before = j.barrier();
        frozen.settle();
        assert!(!st.is_dirty());
        assert!(st.changes.try_read().is_some());
        let to = j.barrier();
        // Only the push's own Clean record since: nothing to push.
        let recs: Vec<Op> = records_after(&j, before, to);
        assert_eq!(recs, vec![Op::Clean { id: a }]);
        // The freeze recorded the pending range before the Clean.
        j.note_write(&st, 10, 1).unwrap();
        assert!(
            st.is_dirty(),
            "a write after the push must mark the file dirty again"
        );
        j.close().unwrap();
    }

    fn records_after(j: &Journal, from: Seq, to: Seq) -> Vec<Op> {
        j.durable(to).unwrap();
        j.pending_from_log(from, to)
            .unwrap()
            .records
            .into_iter()
            .map(|r| r.op)
            .collect()
    }

    #[test]
    fn a_file_with_an_unseen_writer_stays_dirty_and_is_sent_again() {
        let f = fixture();
        let j = open(&f);
        let a = j.lookup(key_of(&f.src.join("a"))).unwrap();
        let st = j.file_state(a).unwrap();
        j.mark_rewritten(&st, Origin::Mount).unwrap();
        st.unjournaled_writer_opened();
        let before = j.barrier();
        j.freeze(a).unwrap().settle();
        assert!(st.is_dirty());
        let to = j.barrier();
        assert_eq!(
            records_after(&j, before, to),
            vec![Op::Rewritten {
                id: a,
                origin: Origin::Mount
            }]
        );
        assert!(!j.nothing_to_push(before, to));
        st.unjournaled_writer_closed();
        j.close().unwrap();
    }

    #[test]
    fn the_cache_and_the_journal_id_outlive_a_reopen() {
        let f = fixture();
        let j = open(&f);
        let id = j.journal_id().unwrap();
        assert_eq!(j.journal_id().unwrap(), id);
        let a = j.lookup(key_of(&f.src.join("a"))).unwrap();
        let b = j.lookup(key_of(&f.src.join("d/b"))).unwrap();
        j.acknowledge(
            "/r1",
            Seq(7),
            &[(a, Some(b"tree-a".to_vec())), (b, Some(b"tree-b".to_vec()))],
        )
        .unwrap();
        j.acknowledge("/r2", Seq(5), &[(b, None)]).unwrap();
        j.close().unwrap();
        let j = open(&f);
        assert_eq!(j.journal_id().unwrap(), id);
        let cached = j.cached([a, b].into_iter()).unwrap();
        assert_eq!(cached.get(&a).map(Vec::as_slice), Some(&b"tree-a"[..]));
        assert!(!cached.contains_key(&b));
        let mut replicas = j.replicas().unwrap();
        replicas.sort();
        assert_eq!(
            replicas,
            vec![("/r1".to_string(), Seq(7)), ("/r2".to_string(), Seq(5))]
        );
        j.close().unwrap();
    }
}

mod compaction {
    //! Dropping log segments every replica has applied.

    use super::*;
    use crate::changeset::Changeset;
    use crate::id::Seq;

    #[test]
    fn segments_every_replica_applied_go_and_pushes_still_work() {
        let f = fixture();
        let small = OpenOptions {
            segment_bytes: 4096,
            ..quiet()
        };
        let (j, _) = Journal::open(&f.state, &f.src, &small).expect("open");
        let mut ids = Vec::new();
        for i in 0..400u64 {
            let name = format!("f{i}");
            ids.push(j.created(
                FileId::ROOT,
                OsStr::new(&name),
                InodeKey {
                    dev: 9,
                    ino: 1000 + i,
                },
                FileKind::File,
            ));
        }
        let mid = j.barrier();
        j.durable(mid).unwrap();
        for (i, id) in ids.iter().enumerate().take(100) {
            let to = format!("g{i}");
            j.renamed(
                *id,
                FileId::ROOT,
                OsStr::new(&format!("f{i}")),
                FileId::ROOT,
                OsStr::new(&to),
                RenameMode::Replace,
                None,
            );
        }
        let end = j.barrier();
        j.durable(end).unwrap();
        // What a replica at `mid` and a new replica must be sent, before.
        let at_mid = Changeset::compute(
            &j.pending(mid, end).unwrap().before,
            &j.pending(mid, end).unwrap().records,
        );
        let fresh = j.pending(Seq(0), end).unwrap();
        let mut fresh_tree = fresh.before.clone();
        for r in &fresh.records {
            fresh_tree.apply(r);
        }
        // Nothing is dropped until a checkpoint covers the records and the
        // slowest replica has them.
        j.acknowledge("/a", mid, &[]).unwrap();
        j.acknowledge("/b", Seq(3), &[]).unwrap();
        assert_eq!(j.compact().unwrap(), None);
        j.close().unwrap();
        let (j, _) = Journal::open(&f.state, &f.src, &small).expect("reopen");
        let segs_before = crate::log::list_segments(&crate::recovery::log_dir(&f.state))
            .unwrap()
            .len();
        j.acknowledge("/b", mid, &[]).unwrap();
        let base = j.compact().unwrap().expect("segments to drop");
        assert!(base <= mid);
        let segs_after = crate::log::list_segments(&crate::recovery::log_dir(&f.state))
            .unwrap()
            .len();
        assert!(segs_after < segs_before, "{segs_before} -> {segs_after}");
        // The same changes for a replica at `mid`, the same tree for a new one.
        let p = j.pending_from_log(mid, end).unwrap();
        assert_eq!(
            Changeset::compute(&p.before, &p.records).files,
            at_mid.files
        );
        let p = j.pending_from_log(Seq(0), end).unwrap();
        let mut tree = p.before.clone();
        for r in &p.records {
            tree.apply(r);
        }
        let edges = |ns: &crate::changeset::Namespace| {
            ns.edges()
                .map(|(e, id)| (e.clone(), id))
                .collect::<Vec<_>>()
        };
        assert_eq!(edges(&tree), edges(&fresh_tree));
        // A replica older than the base must be seeded again.
        assert!(matches!(
            j.pending_from_log(Seq(2), end),
            Err(JournalError::Compacted { .. })
        ));
        j.close().unwrap();
        // Recovery after compaction.
        let (j, rec) = Journal::open(&f.state, &f.src, &small).expect("reopen after compaction");
        assert!(!rec.unclean);
        assert!(j.status().last_seq > end);
        j.close().unwrap();
    }
}
