//! Applying batches made with `BatchWriter` to temporary replicas, checked
//! with `verify` against reference trees built directly.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};

use nix::sys::stat::{Mode, UtimensatFlags, utimensat};
use nix::sys::time::TimeSpec;

use super::tree_cache::TreeCache;
use super::*;
use crate::batch::{
    BatchHeader, BatchWriter, Chunk, Content, Extent, Hash, NodeKind, Op, RelPath, Timestamp,
    WriteRange,
};
use crate::tree::{ContentTree, LEAF};
use crate::verify;

const SOURCE: [u8; 16] = [7; 16];

fn p(s: &str) -> RelPath {
    RelPath::parse(s.as_bytes()).expect("valid test path")
}

fn batch_bytes(from: u64, to: u64, ops: &[Op]) -> Vec<u8> {
    let header = BatchHeader {
        source_id: SOURCE,
        from_seq: from,
        to_seq: to,
        op_count: ops.len() as u64,
        content_bytes: ops.iter().map(Op::data_len).sum(),
        ..BatchHeader::default()
    };
    let mut w = BatchWriter::new(Vec::new(), header).expect("header");
    for op in ops {
        w.push(op).expect("op");
    }
    w.finish().expect("trailer").0
}

struct Fixture {
    _dir: tempfile::TempDir,
    base: PathBuf,
    replica: PathBuf,
    expected: PathBuf,
    outside: PathBuf,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = dir.path().to_path_buf();
        let f = Fixture {
            replica: base.join("replica"),
            expected: base.join("expected"),
            outside: base.join("outside"),
            base,
            _dir: dir,
        };
        for d in [&f.replica, &f.expected, &f.outside] {
            fs::create_dir(d).expect("mkdir");
        }
        f
    }

    fn apply(&self, bytes: &[u8]) -> Result<ApplyReport, ApplyError> {
        apply(&self.replica, bytes, &ApplyOptions::default())
    }

    fn assert_equal(&self) {
        let report = verify::verify(&self.expected, &self.replica, &verify::Options::default())
            .expect("verify");
        assert!(
            report.is_equal(),
            "replica differs: {:#?} {:#?}",
            report.differences,
            report.errors
        );
    }

    fn assert_outside_untouched(&self) {
        let names: Vec<_> = fs::read_dir(&self.outside).expect("outside").collect();
        let keep = self.outside.join("keep");
        let extra = names.len() - usize::from(keep.exists());
        assert_eq!(extra, 0, "something was created outside the root");
        if keep.exists() {
            assert_eq!(fs::read(&keep).expect("keep"), b"outside");
            let m = fs::metadata(&keep).expect("keep");
            assert_eq!(m.permissions().mode() & 0o7777, 0o644);
            assert_eq!(m.uid(), 0);
        }
    }

    fn state(&self) -> PathBuf {
        self.base.join(".replica.ferry")
    }
}

fn tspec(t: Timestamp) -> TimeSpec {
    TimeSpec::new(t.sec, i64::from(t.nsec))
}

/// Gives every entry of the reference tree a distinct time, and returns
/// the Utimes ops that do the same on the replica (children first).
fn stamp(root: &Path) -> Vec<Op> {
    fn walk(root: &Path, rel: &Path, out: &mut Vec<(PathBuf, bool)>) {
        let full = root.join(rel);
        let is_dir = fs::symlink_metadata(&full).expect("stat").is_dir();
        if is_dir {
            let mut names: Vec<_> = fs::read_dir(&full)
                .expect("readdir")
                .map(|e| e.expect("entry").file_name())
                .collect();
            names.sort();
            for n in names {
                walk(root, &rel.join(n), out);
            }
        }
        out.push((rel.to_path_buf(), is_dir));
    }
    let mut all = Vec::new();
    walk(root, Path::new(""), &mut all);
    all.iter()
        .enumerate()
        .map(|(i, (rel, _))| {
            let atime = Timestamp {
                sec: 1_600_000_000,
                nsec: 5,
            };
            let mtime = Timestamp {
                sec: 1_700_000_000 + i as i64,
                nsec: 123_456_789 - i as u32,
            };
            utimensat(
                nix::fcntl::AT_FDCWD,
                &root.join(rel),
                &tspec(atime),
                &tspec(mtime),
                UtimensatFlags::NoFollowSymlink,
            )
            .expect("utimes");
            let path = RelPath::parse(rel.as_os_str().as_encoded_bytes()).expect("path");
            Op::Utimes { path, atime, mtime }
        })
        .collect()
}

fn create(path: &str, mode: u32, content: Content) -> Op {
    let data = content.to_vec(1 << 30).expect("content");
    Op::CreateFile {
        path: p(path),
        mode,
        content,
        result: Hash::of(&data),
    }
}

fn write_file(root: &Path, rel: &str, data: &[u8], mode: u32) {
    let f = root.join(rel);
    fs::write(&f, data).expect("write");
    fs::set_permissions(&f, fs::Permissions::from_mode(mode)).expect("chmod");
}

fn big_text() -> Vec<u8> {
    (0..20_000u32)
        .flat_map(|i| format!("line {i}\n").into_bytes())
        .collect()
}

const SPARSE_SIZE: u64 = 4 << 20;
const SPARSE_AT: u64 = 2 << 20;

/// Batch 1 (0 → 1, onto an empty replica) and the tree it makes.
fn seed(f: &Fixture) -> Vec<u8> {
    let e = &f.expected;
    let mut ops = vec![
        Op::Mkdir {
            path: p("d"),
            mode: 0o755,
        },
        Op::Mkdir {
            path: p("d/sub"),
            mode: 0o700,
        },
        create("d/raw", 0o644, Content::Raw(b"hello world".to_vec())),
        create("big", 0o600, Content::compress_if_it_pays(&big_text())),
        create(
            "sparse",
            0o644,
            Content::Sparse {
                size: SPARSE_SIZE,
                extents: vec![
                    Extent {
                        offset: 0,
                        data: Chunk::Raw(b"head".to_vec()),
                    },
                    Extent {
                        offset: SPARSE_AT,
                        data: Chunk::compress_if_it_pays(&[b'x'; 4096]),
                    },
                ],
            },
        ),
        Op::Symlink {
            path: p("link"),
            target: b"../outside/keep".to_vec(),
        },
        Op::Mknod {
            path: p("fifo"),
            kind: NodeKind::Fifo,
            mode: 0o640,
            rdev: 0,
        },
        Op::Link {
            existing: p("d/raw"),
            new: p("d/raw2"),
        },
        create("victim", 0o644, Content::Raw(b"old".to_vec())),
        create("mover", 0o600, Content::Raw(b"new".to_vec())),
        Op::Rename {
            from: p("mover"),
            to: p("victim"),
            exchange: false,
        },
        create("x", 0o644, Content::Raw(b"x".to_vec())),
        Op::Mkdir {
            path: p("y"),
            mode: 0o711,
        },
        Op::Rename {
            from: p("x"),
            to: p("y"),
            exchange: true,
        },
        create("gone", 0o644, Content::Raw(b"z".to_vec())),
        Op::Unlink { path: p("gone") },
        Op::Mkdir {
            path: p("empty"),
            mode: 0o755,
        },
        Op::Rmdir { path: p("empty") },
        Op::Chown {
            path: p("d/raw"),
            uid: 1234,
            gid: 5678,
        },
        Op::Chmod {
            path: p("d/sub"),
            mode: 0o750,
        },
        Op::SetXattr {
            path: p("d/raw"),
            name: b"user.test".to_vec(),
            value: b"value".to_vec(),
        },
        Op::SetXattr {
            path: p("d/raw"),
            name: b"user.gone".to_vec(),
            value: b"g".to_vec(),
        },
        Op::RemoveXattr {
            path: p("d/raw"),
            name: b"user.gone".to_vec(),
        },
        Op::Chmod {
            path: RelPath::root(),
            mode: 0o751,
        },
    ];
    // The reference tree.
    fs::create_dir(e.join("d")).unwrap();
    fs::create_dir(e.join("d/sub")).unwrap();
    fs::set_permissions(e.join("d/sub"), fs::Permissions::from_mode(0o750)).unwrap();
    write_file(e, "d/raw", b"hello world", 0o644);
    std::os::unix::fs::chown(e.join("d/raw"), Some(1234), Some(5678)).unwrap();
    xattr::set(e.join("d/raw"), "user.test", b"value").unwrap();
    fs::hard_link(e.join("d/raw"), e.join("d/raw2")).unwrap();
    write_file(e, "big", &big_text(), 0o600);
    let sparse = fs::File::create(e.join("sparse")).unwrap();
    sparse.set_len(SPARSE_SIZE).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&sparse, b"head", 0).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&sparse, &[b'x'; 4096], SPARSE_AT).unwrap();
    fs::set_permissions(e.join("sparse"), fs::Permissions::from_mode(0o644)).unwrap();
    symlink("../outside/keep", e.join("link")).unwrap();
    nix::unistd::mkfifo(&e.join("fifo"), Mode::from_bits_truncate(0o640)).unwrap();
    fs::set_permissions(e.join("fifo"), fs::Permissions::from_mode(0o640)).unwrap();
    write_file(e, "victim", b"new", 0o600);
    fs::create_dir(e.join("x")).unwrap();
    fs::set_permissions(e.join("x"), fs::Permissions::from_mode(0o711)).unwrap();
    write_file(e, "y", b"x", 0o644);
    fs::set_permissions(e, fs::Permissions::from_mode(0o751)).unwrap();
    ops.extend(stamp(e));
    batch_bytes(0, 1, &ops)
}

fn delta(base: &[u8], new: &[u8]) -> Vec<u8> {
    let sig = fast_rsync::Signature::calculate(
        base,
        fast_rsync::SignatureOptions {
            block_size: 64,
            crypto_hash_size: 8,
        },
    );
    let mut out = Vec::new();
    fast_rsync::diff(&sig.index(), new, &mut out).expect("diff");
    out
}

/// Batch 2 (1 → 2), applied after `seed`, and the tree it makes.
fn update(f: &Fixture) -> Vec<u8> {
    let e = &f.expected;
    let old_big = big_text();
    let mut new_big = old_big.clone();
    new_big.splice(5000..5010, b"EDITED IN THE MIDDLE".iter().copied());
    new_big.extend_from_slice(b"appended\n");
    let mut ops = vec![
        Op::WriteRanges {
            path: p("d/raw"),
            ranges: vec![
                WriteRange {
                    offset: 0,
                    data: b"HE".to_vec(),
                },
                WriteRange {
                    offset: 11,
                    data: b"!!".to_vec(),
                },
            ],
            base: Hash::of(b"hello world"),
            result: Hash::of(b"HEllo world!!"),
        },
        Op::Truncate {
            path: p("d/raw2"),
            size: 12,
        },
        Op::Delta {
            path: p("big"),
            base: Hash::of(&old_big),
            delta: delta(&old_big, &new_big),
            result: Hash::of(&new_big),
        },
        Op::Rename {
            from: p("d"),
            to: p("e"),
            exchange: false,
        },
        Op::Chmod {
            path: p("e/raw"),
            mode: 0o640,
        },
        create("e/sub/new", 0o644, Content::Raw(b"in a moved dir".to_vec())),
        Op::Unlink { path: p("victim") },
        Op::Rename {
            from: p("y"),
            to: p("victim"),
            exchange: false,
        },
        Op::Rmdir { path: p("x") },
    ];
    fs::rename(e.join("d"), e.join("e")).unwrap();
    fs::write(e.join("e/raw"), b"HEllo world!").unwrap();
    fs::set_permissions(e.join("e/raw"), fs::Permissions::from_mode(0o640)).unwrap();
    write_file(e, "e/sub/new", b"in a moved dir", 0o644);
    fs::write(e.join("big"), &new_big).unwrap();
    fs::rename(e.join("y"), e.join("victim")).unwrap();
    fs::remove_dir(e.join("x")).unwrap();
    ops.extend(stamp(e));
    batch_bytes(1, 2, &ops)
}

/// Batch 3 (2 → 3), applied after `update`: streamed files, content ops
/// on files the batch itself creates, files saved as deltas against a
/// replica file and a staged one, a rename cycle, new directories moved,
/// an exchange, a removal of a directory the batch empties, links to
/// replica files, xattrs on directories and the root.
fn update2(f: &Fixture) -> Vec<u8> {
    let e = &f.expected;
    let q = vec![b'q'; 65536];
    let mut stream = vec![0u8; 3 << 20];
    stream[..5].copy_from_slice(b"start");
    stream[2 << 20..(2 << 20) + q.len()].copy_from_slice(&q);
    let new_big = fs::read(e.join("big")).unwrap();
    let saved_big = [&new_big[..], b"saved\n"].concat();
    let t2 = b"Xbc and more, saved";
    let mut ops = vec![
        Op::CreateFromDelta {
            path: p("big.saved"),
            basis: p("big"),
            base: Hash::of(&new_big),
            delta: delta(&new_big, &saved_big),
            mode: 0o640,
            result: Hash::of(&saved_big),
        },
        Op::BeginFile {
            path: p("stream"),
            mode: 0o644,
            size: 3 << 20,
        },
        Op::FileData {
            offset: 0,
            data: Chunk::Raw(b"start".to_vec()),
        },
        Op::FileData {
            offset: 2 << 20,
            data: Chunk::compress_if_it_pays(&q),
        },
        Op::EndFile {
            result: Hash::of(&stream),
        },
        create("t1", 0o644, Content::Raw(b"abcdef".to_vec())),
        Op::WriteRanges {
            path: p("t1"),
            ranges: vec![WriteRange {
                offset: 0,
                data: b"X".to_vec(),
            }],
            base: Hash::of(b"abcdef"),
            result: Hash::of(b"Xbcdef"),
        },
        Op::Truncate {
            path: p("t1"),
            size: 3,
        },
        Op::Delta {
            path: p("t1"),
            base: Hash::of(b"Xbc"),
            delta: delta(b"Xbc", b"Xbc and more"),
            result: Hash::of(b"Xbc and more"),
        },
        Op::CreateFromDelta {
            path: p("t2"),
            basis: p("t1"),
            base: Hash::of(b"Xbc and more"),
            delta: delta(b"Xbc and more", t2),
            mode: 0o600,
            result: Hash::of(t2),
        },
        Op::Rename {
            from: p("big"),
            to: p("tmp~"),
            exchange: false,
        },
        Op::Rename {
            from: p("victim"),
            to: p("big"),
            exchange: false,
        },
        Op::Rename {
            from: p("tmp~"),
            to: p("victim"),
            exchange: false,
        },
        Op::Mkdir {
            path: p("nd"),
            mode: 0o700,
        },
        create("nd/f", 0o644, Content::Raw(b"f".to_vec())),
        Op::Rename {
            from: p("nd"),
            to: p("e/nd2"),
            exchange: false,
        },
        Op::Mkdir {
            path: p("ex1"),
            mode: 0o755,
        },
        create("ex1/a", 0o644, Content::Raw(b"a".to_vec())),
        Op::Rename {
            from: p("ex1"),
            to: p("e/sub"),
            exchange: true,
        },
        Op::Unlink { path: p("ex1/new") },
        Op::Rmdir { path: p("ex1") },
        Op::Link {
            existing: p("e/raw"),
            new: p("rawlink"),
        },
        Op::WriteRanges {
            path: p("rawlink"),
            ranges: vec![WriteRange {
                offset: 12,
                data: b"?".to_vec(),
            }],
            base: Hash::of(b"HEllo world!"),
            result: Hash::of(b"HEllo world!?"),
        },
        Op::Mkdir {
            path: p("ed1"),
            mode: 0o755,
        },
        Op::Mkdir {
            path: p("ed2"),
            mode: 0o755,
        },
        create("ed1/z", 0o644, Content::Raw(b"z".to_vec())),
        Op::Rename {
            from: p("ed1"),
            to: p("ed2"),
            exchange: false,
        },
        Op::Chmod {
            path: p("e"),
            mode: 0o2755,
        },
        Op::SetXattr {
            path: p("e"),
            name: b"user.dir".to_vec(),
            value: b"1".to_vec(),
        },
        Op::SetXattr {
            path: RelPath::root(),
            name: b"user.root".to_vec(),
            value: b"r".to_vec(),
        },
    ];
    let sf = fs::File::create(e.join("stream")).unwrap();
    sf.set_len(3 << 20).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&sf, b"start", 0).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&sf, &q, 2 << 20).unwrap();
    fs::set_permissions(e.join("stream"), fs::Permissions::from_mode(0o644)).unwrap();
    write_file(e, "t1", b"Xbc and more", 0o644);
    write_file(e, "t2", t2, 0o600);
    write_file(e, "big.saved", &saved_big, 0o640);
    fs::rename(e.join("big"), e.join("victim.tmp")).unwrap();
    fs::rename(e.join("victim"), e.join("big")).unwrap();
    fs::rename(e.join("victim.tmp"), e.join("victim")).unwrap();
    assert_eq!(fs::read(e.join("victim")).unwrap(), new_big);
    fs::create_dir(e.join("e/nd2")).unwrap();
    fs::set_permissions(e.join("e/nd2"), fs::Permissions::from_mode(0o700)).unwrap();
    write_file(e, "e/nd2/f", b"f", 0o644);
    fs::remove_dir_all(e.join("e/sub")).unwrap();
    fs::create_dir(e.join("e/sub")).unwrap();
    fs::set_permissions(e.join("e/sub"), fs::Permissions::from_mode(0o755)).unwrap();
    write_file(e, "e/sub/a", b"a", 0o644);
    fs::hard_link(e.join("e/raw"), e.join("rawlink")).unwrap();
    std::os::unix::fs::FileExt::write_all_at(
        &fs::File::options()
            .write(true)
            .open(e.join("rawlink"))
            .unwrap(),
        b"?",
        12,
    )
    .unwrap();
    fs::create_dir(e.join("ed2")).unwrap();
    fs::set_permissions(e.join("ed2"), fs::Permissions::from_mode(0o755)).unwrap();
    write_file(e, "ed2/z", b"z", 0o644);
    fs::set_permissions(e.join("e"), fs::Permissions::from_mode(0o2755)).unwrap();
    xattr::set(e.join("e"), "user.dir", b"1").unwrap();
    xattr::set(e, "user.root", b"r").unwrap();
    ops.extend(stamp(e));
    batch_bytes(2, 3, &ops)
}

fn staging_is_empty(f: &Fixture) -> bool {
    fs::read_dir(f.state().join("staging"))
        .map(|mut d| d.next().is_none())
        .unwrap_or(true)
}

#[test]
fn apply_seed_and_update() {
    let f = Fixture::new();
    let b1 = seed(&f);
    let r = f.apply(&b1).expect("seed");
    assert!(!r.skipped);
    assert_eq!((r.from_seq, r.to_seq), (0, 1));
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    f.assert_equal();
    // Holes stay holes.
    let blocks = fs::metadata(f.replica.join("sparse")).unwrap().blocks();
    assert!(blocks * 512 < 1 << 20, "sparse file has {blocks} blocks");
    assert_eq!(
        read_applied(&f.replica).unwrap().unwrap(),
        Applied {
            seq: 1,
            source_id: SOURCE,
            replica_id: ANY_REPLICA
        }
    );
    assert!(staging_is_empty(&f));
    assert!(!f.state().join("commit/log").exists());

    let b2 = update(&f);
    let r = f.apply(&b2).expect("update");
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    f.assert_equal();
    assert_eq!(read_applied(&f.replica).unwrap().unwrap().seq, 2);

    // Batch 3 from a file, through `apply_file`.
    let b3 = update2(&f);
    let file = f.base.join("batch3");
    fs::write(&file, &b3).unwrap();
    let r = apply_file(&f.replica, &file, &ApplyOptions::default()).expect("update2");
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    assert!(r.steps > 0 && r.staged > 0, "{r:?}");
    f.assert_equal();
    let blocks = fs::metadata(f.replica.join("stream")).unwrap().blocks();
    assert!(blocks * 512 < 1 << 20, "streamed file has {blocks} blocks");
    // Applying it again is harmless.
    assert!(
        apply_file(&f.replica, &file, &ApplyOptions::default())
            .unwrap()
            .skipped
    );
    f.assert_equal();
}

#[test]
fn duplicate_is_skipped_and_gap_refused() {
    let f = Fixture::new();
    let b1 = seed(&f);
    let g = Fixture::new();
    let _ = seed(&g);
    let b2 = update(&g);
    // A gap: batch 2 first.
    let err = f.apply(&b2).expect_err("gap");
    assert!(
        matches!(
            err,
            ApplyError::Gap {
                applied: 0,
                from_seq: 1
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("seq 1 to 1 are missing"), "{err}");
    assert_eq!(fs::read_dir(&f.replica).unwrap().count(), 0);
    f.apply(&b1).expect("seed");
    let r = f.apply(&b1).expect("again");
    assert!(r.skipped);
    f.assert_equal();
}

#[test]
fn wrong_source_refused() {
    let f = Fixture::new();
    let b1 = seed(&f);
    f.apply(&b1).expect("seed");
    let header = BatchHeader {
        source_id: [9; 16],
        from_seq: 1,
        to_seq: 2,
        ..BatchHeader::default()
    };
    let other = BatchWriter::new(Vec::new(), header)
        .unwrap()
        .finish()
        .unwrap()
        .0;
    let err = f.apply(&other).expect_err("wrong source");
    assert!(matches!(err, ApplyError::WrongSource { .. }), "{err}");
}

#[test]
fn damaged_batch_changes_nothing() {
    let f = Fixture::new();
    let b1 = seed(&f);
    let step = b1.len() / 37;
    for at in (20..b1.len()).step_by(step.max(1)) {
        let mut bad = b1.clone();
        bad[at] ^= 0x40;
        let err = f.apply(&bad).expect_err("damaged");
        assert!(matches!(err, ApplyError::Batch(_)), "byte {at}: {err}");
        assert_eq!(fs::read_dir(&f.replica).unwrap().count(), 0, "byte {at}");
        assert!(staging_is_empty(&f));
    }
    // Truncated.
    let err = f.apply(&b1[..b1.len() - 3]).expect_err("truncated");
    assert!(matches!(err, ApplyError::Batch(_)), "{err}");
    assert_eq!(fs::read_dir(&f.replica).unwrap().count(), 0);
    assert!(read_applied(&f.replica).unwrap().is_none());
}

#[test]
fn base_mismatch_refuses_and_changes_nothing() {
    let f = Fixture::new();
    let b1 = seed(&f);
    f.apply(&b1).expect("seed");
    let b2 = update(&f);
    // Changed behind ferry's back.
    fs::write(f.replica.join("big"), b"someone else").unwrap();
    let err = f.apply(&b2).expect_err("base mismatch");
    assert!(matches!(err, ApplyError::BaseMismatch { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("Delta big") && msg.contains("full content"),
        "{msg}"
    );
    assert!(f.replica.join("d/raw").exists(), "nothing was applied");
    assert_eq!(fs::read(f.replica.join("d/raw")).unwrap(), b"hello world");
    assert_eq!(read_applied(&f.replica).unwrap().unwrap().seq, 1);
}

/// Kills the apply of `batch` at every crash point in turn, recovers, and
/// checks the result equals a clean apply.
fn crash_everywhere(make: impl Fn(&Fixture) -> Vec<u8>, prepare: impl Fn(&Fixture)) {
    let mut n = 1;
    loop {
        let f = Fixture::new();
        prepare(&f);
        let batch = make(&f);
        let opts = ApplyOptions {
            crash_after_step: Some(n),
            ..ApplyOptions::default()
        };
        match apply(&f.replica, batch.as_slice(), &opts) {
            Ok(_) => {
                assert!(n > 3, "no crash point was reached");
                return;
            }
            Err(ApplyError::InjectedCrash(k)) => assert_eq!(k, n),
            Err(e) => panic!("crash point {n}: {e}"),
        }
        if n % 2 == 0 {
            recover(&f.replica).expect("recover");
            // A second recovery finds nothing to do.
            assert!(!recover(&f.replica).expect("recover again"));
        } else {
            // The next apply of the same batch rolls forward first.
            let r = f.apply(&batch).expect("apply after crash");
            assert!(r.skipped || n == 1, "crash point {n}: {r:?}");
        }
        f.assert_equal();
        assert!(staging_is_empty(&f), "crash point {n}");
        assert!(f.apply(&batch).expect("again").skipped);
        n += 1;
    }
}

#[test]
fn crash_at_every_step_of_seed() {
    crash_everywhere(seed, |_| {});
}

#[test]
fn crash_at_every_step_of_update2() {
    crash_everywhere(update2, |f| {
        let b1 = seed(f);
        f.apply(&b1).expect("seed");
        let b2 = update(f);
        f.apply(&b2).expect("update");
    });
}

#[test]
fn crash_at_every_step_of_update() {
    crash_everywhere(
        |f| {
            // `prepare` applied the seed and built the reference for it.
            update(f)
        },
        |f| {
            let b1 = seed(f);
            f.apply(&b1).expect("seed");
        },
    );
}

fn outside_keep(f: &Fixture) {
    write_file(&f.outside, "keep", b"outside", 0o644);
}

fn assert_refused(err: ApplyError, op: &str, path: &str) {
    match &err {
        ApplyError::Op {
            op: o, path: pa, ..
        } => {
            assert_eq!((*o, pa.as_str()), (op, path), "{err}");
        }
        _ => panic!("expected an op error, got: {err}"),
    }
    assert!(
        err.to_string().contains("symlink") || err.to_string().contains("not a directory"),
        "{err}"
    );
}

#[test]
fn symlinked_directory_in_path_is_refused() {
    let f = Fixture::new();
    outside_keep(&f);
    symlink(&f.outside, f.replica.join("a")).unwrap();
    for op in [
        create("a/x", 0o644, Content::Raw(b"evil".to_vec())),
        Op::Chmod {
            path: p("a/keep"),
            mode: 0o777,
        },
        Op::Chown {
            path: p("a/keep"),
            uid: 1,
            gid: 1,
        },
        Op::Unlink { path: p("a/keep") },
        Op::WriteRanges {
            path: p("a/keep"),
            ranges: vec![WriteRange {
                offset: 0,
                data: b"X".to_vec(),
            }],
            base: Hash::of(b"outside"),
            result: Hash::of(b"Xutside"),
        },
        Op::SetXattr {
            path: p("a/keep"),
            name: b"user.x".to_vec(),
            value: b"1".to_vec(),
        },
    ] {
        let name = op.name();
        let path = op.paths()[0].to_string();
        let err = f.apply(&batch_bytes(0, 1, &[op])).expect_err("refused");
        assert_refused(err, name, &path);
        f.assert_outside_untouched();
    }
}

#[test]
fn rename_target_under_symlinked_directory_is_refused() {
    let f = Fixture::new();
    outside_keep(&f);
    symlink(&f.outside, f.replica.join("a")).unwrap();
    fs::write(f.replica.join("f"), b"data").unwrap();
    for (from, to) in [("f", "a/f"), ("a/keep", "stolen")] {
        let ops = [Op::Rename {
            from: p(from),
            to: p(to),
            exchange: false,
        }];
        let err = f.apply(&batch_bytes(0, 1, &ops)).expect_err("refused");
        assert!(
            matches!(
                &err,
                ApplyError::Op {
                    index: 1,
                    op: "Rename",
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("symlink"), "{err}");
        f.assert_outside_untouched();
        assert!(f.replica.join("f").exists());
    }
}

#[test]
fn symlink_made_by_the_batch_is_not_a_directory() {
    let f = Fixture::new();
    outside_keep(&f);
    let target = f.outside.as_os_str().as_encoded_bytes().to_vec();
    let ops = [
        Op::Symlink {
            path: p("s"),
            target,
        },
        create("s/x", 0o644, Content::Raw(b"evil".to_vec())),
    ];
    let err = f.apply(&batch_bytes(0, 1, &ops)).expect_err("refused");
    assert!(
        matches!(
            &err,
            ApplyError::Op {
                index: 2,
                op: "CreateFile",
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("s/x"), "{err}");
    f.assert_outside_untouched();
    assert!(
        fs::symlink_metadata(f.replica.join("s")).is_err(),
        "nothing applied"
    );
}

#[test]
fn directory_swapped_for_symlink_before_commit_is_refused() {
    // A parent directory replaced by a symlink between staging and the
    // metadata phase: the commit refuses the step, touches nothing outside,
    // and keeps the log.
    let f = Fixture::new();
    outside_keep(&f);
    fs::create_dir(f.replica.join("d")).unwrap();
    let ops = [
        create("d/keep", 0o644, Content::Raw(b"evil".to_vec())),
        Op::Chmod {
            path: p("d"),
            mode: 0o700,
        },
    ];
    let b = batch_bytes(0, 1, &ops);
    let opts = ApplyOptions {
        crash_after_step: Some(2),
        ..ApplyOptions::default()
    };
    assert!(matches!(
        apply(&f.replica, b.as_slice(), &opts),
        Err(ApplyError::InjectedCrash(2))
    ));
    fs::remove_dir(f.replica.join("d")).unwrap();
    symlink(&f.outside, f.replica.join("d")).unwrap();
    let err = recover(&f.replica).expect_err("refused");
    assert!(
        matches!(&err, ApplyError::Commit { op, .. } if op == "CreateFile"),
        "{err}"
    );
    assert!(err.to_string().contains("symlink"), "{err}");
    f.assert_outside_untouched();
    assert!(f.state().join("commit/log").exists());
}

#[test]
fn device_nodes_and_sockets() {
    let f = Fixture::new();
    let e = &f.expected;
    let dev = nix::sys::stat::makedev(1, 3);
    let mut ops = vec![
        Op::Mknod {
            path: p("null"),
            kind: NodeKind::Char,
            mode: 0o666,
            rdev: dev,
        },
        Op::Mknod {
            path: p("sock"),
            kind: NodeKind::Socket,
            mode: 0o755,
            rdev: 0,
        },
    ];
    let mk = |name: &str, kind, mode: u32, rdev| {
        nix::sys::stat::mknod(&e.join(name), kind, Mode::from_bits_truncate(mode), rdev).unwrap();
        fs::set_permissions(e.join(name), fs::Permissions::from_mode(mode)).unwrap();
    };
    mk("null", nix::sys::stat::SFlag::S_IFCHR, 0o666, dev);
    mk("sock", nix::sys::stat::SFlag::S_IFSOCK, 0o755, 0);
    ops.extend(stamp(e));
    f.apply(&batch_bytes(0, 1, &ops)).expect("apply");
    f.assert_equal();
    let m = fs::symlink_metadata(f.replica.join("null")).unwrap();
    assert_eq!(m.rdev(), dev);
}

/// The cost of a 4 KiB in-place edit of a 1 GiB file, first without a tree
/// cache entry (the file is read once), then with one (run with
/// `cargo test --release -p ferry-replicator perf_ -- --ignored --nocapture`).
#[test]
#[ignore]
fn perf_small_edit_of_a_large_file() {
    let f = Fixture::new();
    let size = 1u64 << 30;
    let big = fs::File::create(f.replica.join("big")).unwrap();
    let chunk: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
    for i in 0..(size >> 20) {
        std::os::unix::fs::FileExt::write_all_at(&big, &chunk, i << 20).unwrap();
    }
    drop(big);
    let mut tree = ContentTree::build(size, |i, buf| {
        let at = (i * LEAF) as usize % chunk.len();
        buf.copy_from_slice(&chunk[at..at + buf.len()]);
        Ok(())
    })
    .unwrap();
    for (seq, at) in [(1, size / 2), (2, size / 3)] {
        let edit = vec![b'E' + seq as u8; 4096];
        assert_eq!(
            crate::tree::leaves_of(at, 4096, size).count(),
            1,
            "each edit lies in one leaf (and not in the other's)"
        );
        let after = tree
            .updated(size, &[at / LEAF].into(), |i, buf| {
                let start = i * LEAF;
                let c = (start as usize) % chunk.len();
                buf.copy_from_slice(&chunk[c..c + buf.len()]);
                let mut file = std::io::Cursor::new(buf);
                file.set_position(at - start);
                std::io::Write::write_all(&mut file, &edit)
            })
            .unwrap();
        let ops = [Op::WriteRanges {
            path: p("big"),
            ranges: vec![WriteRange {
                offset: at,
                data: edit,
            }],
            base: tree.root(),
            result: after.root(),
        }];
        let b = batch_bytes(seq - 1, seq, &ops);
        let t = std::time::Instant::now();
        let r = f.apply(&b).expect("apply");
        eprintln!(
            "4 KiB edit of a 1 GiB file, {}: apply {:?}, {} bytes read, commit window {} us",
            if seq == 1 { "no cache entry" } else { "cached" },
            t.elapsed(),
            r.replica_bytes_read,
            r.commit_window_us
        );
        tree = after;
    }
}

#[test]
fn wrong_replica_and_overlap_refused() {
    let f = Fixture::new();
    let make = |replica: u8, from, to| {
        let header = BatchHeader {
            source_id: SOURCE,
            replica_id: [replica; 16],
            from_seq: from,
            to_seq: to,
            ..BatchHeader::default()
        };
        BatchWriter::new(Vec::new(), header)
            .unwrap()
            .finish()
            .unwrap()
            .0
    };
    f.apply(&make(5, 0, 4)).expect("first batch, for replica 5");
    assert_eq!(
        read_applied(&f.replica).unwrap().unwrap().replica_id,
        [5; 16]
    );
    let err = f.apply(&make(6, 4, 5)).expect_err("another replica");
    assert!(matches!(err, ApplyError::WrongReplica { .. }), "{err}");
    let err = f.apply(&make(5, 2, 6)).expect_err("overlap");
    assert!(
        matches!(err, ApplyError::Overlap { applied: 4, .. }),
        "{err}"
    );
    // A batch for any replica is accepted.
    f.apply(&make(0, 4, 5)).expect("any replica");
    assert_eq!(read_applied(&f.replica).unwrap().unwrap().seq, 5);
}

// ---- content trees and the replica's tree cache ----

/// Bytes that do not repeat within a leaf, so that a leaf read from the
/// wrong place would hash differently.
fn large(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| ((i.wrapping_mul(2_654_435_761) >> 13) as u8) ^ seed)
        .collect()
}

const LARGE: usize = 4 << 20;

/// A `WriteRanges` of `bytes` at `at` on `before`, and the content after.
fn edit(path: &str, before: &[u8], at: usize, bytes: &[u8]) -> (Op, Vec<u8>) {
    let mut after = before.to_vec();
    if after.len() < at + bytes.len() {
        after.resize(at + bytes.len(), 0);
    }
    after[at..at + bytes.len()].copy_from_slice(bytes);
    let op = Op::WriteRanges {
        path: p(path),
        ranges: vec![WriteRange {
            offset: at as u64,
            data: bytes.to_vec(),
        }],
        base: Hash::of(before),
        result: Hash::of(&after),
    };
    (op, after)
}

/// The tree the replica's tree cache holds for `rel`, if its entry is
/// valid for the file as it is now.
fn cached_tree(f: &Fixture, rel: &str) -> Option<ContentTree> {
    let st = nix::sys::stat::lstat(&f.replica.join(rel)).expect("stat");
    TreeCache::new(&f.state()).load(&st)
}

fn entry_path(f: &Fixture, rel: &str) -> PathBuf {
    let ino = fs::metadata(f.replica.join(rel)).expect("stat").ino();
    f.state().join("trees").join(ino.to_string())
}

#[test]
fn in_place_edit_of_a_large_file_reads_only_the_leaves_it_touches() {
    let f = Fixture::new();
    let data = large(LARGE, 1);
    let seed = create("big", 0o644, Content::Raw(data.clone()));
    let r = f.apply(&batch_bytes(0, 1, &[seed])).expect("create");
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    assert!(entry_path(&f, "big").exists());
    assert_eq!(cached_tree(&f, "big"), Some(ContentTree::of_bytes(&data)));

    // 4 KiB inside one leaf, then across two leaves: only those are read.
    let (op, data) = edit("big", &data, (3 << 20) + 100, &[b'E'; 4096]);
    let r = f.apply(&batch_bytes(1, 2, &[op])).expect("edit");
    assert_eq!(r.replica_bytes_read, LEAF);
    assert_eq!(fs::read(f.replica.join("big")).unwrap(), data);
    assert_eq!(cached_tree(&f, "big"), Some(ContentTree::of_bytes(&data)));
    let (op, data) = edit("big", &data, 5 * LEAF as usize - 10, &[b'F'; 20]);
    let r = f
        .apply(&batch_bytes(2, 3, &[op]))
        .expect("edit across leaves");
    assert_eq!(r.replica_bytes_read, 2 * LEAF);
    assert_eq!(fs::read(f.replica.join("big")).unwrap(), data);

    // Unlinking the file removes its entry.
    let entry = entry_path(&f, "big");
    f.apply(&batch_bytes(3, 4, &[Op::Unlink { path: p("big") }]))
        .expect("unlink");
    assert!(!entry.exists());
}

#[test]
fn a_change_behind_ferrys_back_invalidates_the_tree_cache() {
    for put_mtime_back in [false, true] {
        let f = Fixture::new();
        let data = large(LARGE, 2);
        let seed = create("big", 0o644, Content::Raw(data.clone()));
        f.apply(&batch_bytes(0, 1, &[seed])).expect("create");
        assert!(cached_tree(&f, "big").is_some());
        let path = f.replica.join("big");
        let before = fs::metadata(&path).unwrap();
        // One byte in the first leaf, the size kept (and the mtime put
        // back, as `touch -d` would): only the ctime tells.
        std::os::unix::fs::FileExt::write_all_at(
            &fs::File::options().write(true).open(&path).unwrap(),
            b"X",
            100,
        )
        .unwrap();
        if put_mtime_back {
            let t = |sec, nsec| TimeSpec::new(sec, nsec);
            utimensat(
                nix::fcntl::AT_FDCWD,
                &path,
                &t(before.atime(), before.atime_nsec()),
                &t(before.mtime(), before.mtime_nsec()),
                UtimensatFlags::NoFollowSymlink,
            )
            .unwrap();
            let after = fs::metadata(&path).unwrap();
            assert_eq!(
                (after.len(), after.mtime(), after.mtime_nsec()),
                (before.len(), before.mtime(), before.mtime_nsec())
            );
        }
        // The edit is far from the changed byte: only a stale tree would
        // take the file's content for the edit's base.
        let (op, _) = edit("big", &data, 3 << 20, &[b'E'; 4096]);
        let err = f.apply(&batch_bytes(1, 2, &[op])).expect_err("changed");
        assert!(matches!(err, ApplyError::BaseMismatch { .. }), "{err}");
        let mut expect = data.clone();
        expect[100] = b'X';
        assert!(fs::read(&path).unwrap() == expect, "nothing was applied");
        assert_eq!(read_applied(&f.replica).unwrap().unwrap().seq, 1);
        assert!(cached_tree(&f, "big").is_none());
    }
}

#[test]
fn in_place_changes_to_large_files_within_one_batch() {
    let f = Fixture::new();
    let data = large(LARGE, 3);
    let seed = create("big", 0o644, Content::Raw(data.clone()));
    f.apply(&batch_bytes(0, 1, &[seed])).expect("create");

    let l = LEAF as usize;
    // A replica file: writes across a leaf boundary, a truncation in the
    // middle of a leaf, a write past the end (zeros between), another
    // write over the first.
    let (w1, big) = edit("big", &data, 3 * l - 5, &[1; 10]);
    let mut big = big;
    big.truncate(10 * l + 7);
    let (w2, big) = edit("big", &big, 12 * l + 3, &[2; 5000]);
    let (w3, big) = edit("big", &big, 3 * l - 2, &[3; 4]);
    // A file staged by the batch, changed the same ways.
    let fresh = large(6 * l + 1, 4);
    let (w4, new) = edit("new", &fresh, l - 1, &[4; 2]);
    let mut new = new;
    new.truncate(2 * l + 9);
    let (w5, new) = edit("new", &new, 7 * l, &[5; 3]);
    let ops = [
        w1,
        Op::Truncate {
            path: p("big"),
            size: 10 * LEAF + 7,
        },
        w2,
        w3,
        create("new", 0o600, Content::Raw(fresh)),
        w4,
        Op::Truncate {
            path: p("new"),
            size: 2 * LEAF + 9,
        },
        w5,
    ];
    let r = f.apply(&batch_bytes(1, 2, &ops)).expect("apply");
    assert!(r.replica_bytes_read <= 8 * LEAF, "{r:?}");
    assert!(fs::read(f.replica.join("big")).unwrap() == big);
    assert!(fs::read(f.replica.join("new")).unwrap() == new);
    assert_eq!(cached_tree(&f, "big"), Some(ContentTree::of_bytes(&big)));
    assert_eq!(cached_tree(&f, "new"), Some(ContentTree::of_bytes(&new)));
}

#[test]
fn without_a_cache_entry_the_file_is_read_once() {
    let f = Fixture::new();
    let data = large(LARGE, 5);
    fs::write(f.replica.join("big"), &data).unwrap();
    let (w1, after) = edit("big", &data, 100, b"one");
    let (w2, after) = edit("big", &after, 200, b"two");
    let ops = [
        // A truncation alone leaves the tree unknown rather than read.
        Op::Truncate {
            path: p("big"),
            size: LARGE as u64,
        },
        w1,
        w2,
    ];
    let r = f.apply(&batch_bytes(0, 1, &ops)).expect("apply");
    // The whole file once, then the leaf each write touches.
    assert_eq!(r.replica_bytes_read, LARGE as u64 + 2 * LEAF);
    assert!(fs::read(f.replica.join("big")).unwrap() == after);
    assert_eq!(cached_tree(&f, "big"), Some(ContentTree::of_bytes(&after)));
}

#[test]
fn create_from_delta_saves_over_the_old_file() {
    let f = Fixture::new();
    let e = &f.expected;
    let doc = big_text();
    let notes = b"short notes\n".repeat(10);
    f.apply(&batch_bytes(
        0,
        1,
        &[
            create("doc", 0o600, Content::compress_if_it_pays(&doc)),
            create("notes", 0o644, Content::Raw(notes.clone())),
        ],
    ))
    .expect("seed");
    let mut new_doc = doc.clone();
    new_doc.splice(100..110, b"SAVED BY AN EDITOR".iter().copied());
    let new_notes = [&notes[..], b"one more\n"].concat();
    let mut ops = vec![
        // Written anew and renamed over the old.
        Op::CreateFromDelta {
            path: p("doc.tmp"),
            basis: p("doc"),
            base: Hash::of(&doc),
            delta: delta(&doc, &new_doc),
            mode: 0o640,
            result: Hash::of(&new_doc),
        },
        Op::Rename {
            from: p("doc.tmp"),
            to: p("doc"),
            exchange: false,
        },
        // Replacing its own basis.
        Op::CreateFromDelta {
            path: p("notes"),
            basis: p("notes"),
            base: Hash::of(&notes),
            delta: delta(&notes, &new_notes),
            mode: 0o600,
            result: Hash::of(&new_notes),
        },
    ];
    write_file(e, "doc", &new_doc, 0o640);
    write_file(e, "notes", &new_notes, 0o600);
    ops.extend(stamp(e));
    let r = f.apply(&batch_bytes(1, 2, &ops)).expect("apply");
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    assert_eq!(r.replica_bytes_read, (doc.len() + notes.len()) as u64);
    f.assert_equal();
    assert_eq!(
        cached_tree(&f, "doc"),
        Some(ContentTree::of_bytes(&new_doc))
    );
}

#[test]
fn create_from_delta_refuses_a_wrong_base_and_a_missing_basis() {
    let f = Fixture::new();
    f.apply(&batch_bytes(
        0,
        1,
        &[create("doc", 0o644, Content::Raw(b"old".to_vec()))],
    ))
    .expect("seed");
    let op = |basis: &str, base: &[u8]| Op::CreateFromDelta {
        path: p("doc.new"),
        basis: p(basis),
        base: Hash::of(base),
        delta: delta(b"old", b"new"),
        mode: 0o644,
        result: Hash::of(b"new"),
    };
    let err = f
        .apply(&batch_bytes(1, 2, &[op("doc", b"something else")]))
        .expect_err("wrong base");
    assert!(
        matches!(
            &err,
            ApplyError::BaseMismatch {
                op: "CreateFromDelta",
                ..
            }
        ),
        "{err}"
    );
    let err = f
        .apply(&batch_bytes(1, 2, &[op("nope", b"old")]))
        .expect_err("no basis");
    assert!(err.to_string().contains("nope does not exist"), "{err}");
    assert!(!f.replica.join("doc.new").exists());
    assert!(staging_is_empty(&f));
    assert_eq!(read_applied(&f.replica).unwrap().unwrap().seq, 1);
}

/// A delta whose copy commands take the whole base again and again: 85
/// output bytes per delta byte, far beyond what any real delta makes.
fn hostile_delta() -> Vec<u8> {
    let mut d = vec![0x72, 0x73, 0x02, 0x36];
    for _ in 0..20_000 {
        d.extend_from_slice(&[0x45, 0, 255]);
    }
    d.push(0);
    d
}

#[test]
fn a_hostile_delta_is_bounded() {
    let f = Fixture::new();
    let base = large(255, 6);
    f.apply(&batch_bytes(
        0,
        1,
        &[create("doc", 0o644, Content::Raw(base.clone()))],
    ))
    .expect("seed");
    let ops = [
        Op::Delta {
            path: p("doc"),
            base: Hash::of(&base),
            delta: hostile_delta(),
            result: Hash::default(),
        },
        Op::CreateFromDelta {
            path: p("doc.new"),
            basis: p("doc"),
            base: Hash::of(&base),
            delta: hostile_delta(),
            mode: 0o644,
            result: Hash::default(),
        },
    ];
    for op in ops {
        let name = op.name();
        let err = f.apply(&batch_bytes(1, 2, &[op])).expect_err("bounded");
        assert!(
            matches!(&err, ApplyError::Op { op, .. } if *op == name)
                && err.to_string().contains("the delta does not apply"),
            "{err}"
        );
        assert!(staging_is_empty(&f));
        assert_eq!(fs::read(f.replica.join("doc")).unwrap(), base);
        assert!(!f.replica.join("doc.new").exists());
    }
}

#[test]
fn in_place_growth_is_bounded() {
    let f = Fixture::new();
    f.apply(&batch_bytes(
        0,
        1,
        &[create("doc", 0o644, Content::Raw(b"old".to_vec()))],
    ))
    .expect("seed");
    let far = |path| Op::WriteRanges {
        path: p(path),
        ranges: vec![WriteRange {
            offset: 20 << 30,
            data: b"x".to_vec(),
        }],
        base: Hash::of(b"old"),
        result: Hash::default(),
    };
    // On a replica file, and on one the batch creates.
    let replica = [far("doc")];
    let staged = [
        create("new", 0o644, Content::Raw(b"old".to_vec())),
        far("new"),
    ];
    for ops in [&replica[..], &staged[..]] {
        let err = f.apply(&batch_bytes(1, 2, ops)).expect_err("too far");
        assert!(
            err.to_string().contains("grows the file by more than"),
            "{err}"
        );
        assert_eq!(fs::metadata(f.replica.join("doc")).unwrap().len(), 3);
    }
}

/// A new file is made inside its new parent directory only when no earlier
/// operation named it: here a replica file is moved to that name and
/// unlinked before the new file takes it (found by the acceptance workload).
#[test]
fn a_name_used_earlier_in_the_batch_is_not_made_inside_a_new_directory() {
    let f = Fixture::new();
    fs::write(f.replica.join("x"), b"old").unwrap();
    let ops = vec![
        Op::Mkdir {
            path: p("d"),
            mode: 0o755,
        },
        Op::Rename {
            from: p("x"),
            to: p("d/a"),
            exchange: false,
        },
        Op::Unlink { path: p("d/a") },
        create("d/a", 0o644, Content::Raw(b"new".to_vec())),
        create("d/b", 0o644, Content::Raw(b"nested".to_vec())),
    ];
    f.apply(&batch_bytes(0, 1, &ops)).expect("apply");
    assert_eq!(fs::read(f.replica.join("d/a")).unwrap(), b"new");
    assert_eq!(fs::read(f.replica.join("d/b")).unwrap(), b"nested");
    assert!(!f.replica.join("x").exists());
}

// Fuzz regressions
//
// Inputs that broke the applier under `fuzz/fuzz_targets/apply_batch.rs`
// (or that it was made to reproduce), kept as tests.

/// Applies `bytes` to the replica in another thread and waits at most
/// `secs` for the answer (`None`: still working; the thread is left to
/// finish on its own).
fn apply_within(f: &Fixture, bytes: Vec<u8>, secs: u64) -> Option<Result<ApplyReport, ApplyError>> {
    let replica = f.replica.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(apply(&replica, &bytes[..], &ApplyOptions::default()));
    });
    rx.recv_timeout(std::time::Duration::from_secs(secs)).ok()
}

/// A new file's holes are hashed as zeros (a hash covers every byte), so a
/// 100-byte batch declaring a file of terabytes, with a `CreateFile` of
/// `Sparse { size, extents: [] }` or a `BeginFile` and its `EndFile`, made
/// the applier hash for hours before it found the wrong result hash
/// (reproduced with the apply_batch fuzz target). The batch's zeros are
/// now counted before they are hashed and bounded.
#[test]
fn a_huge_sparse_file_is_refused_without_hashing_its_holes() {
    const SIZE: u64 = 2 << 40;
    let sparse = vec![Op::CreateFile {
        path: p("huge"),
        mode: 0o644,
        content: Content::Sparse {
            size: SIZE,
            extents: vec![],
        },
        result: Hash::default(),
    }];
    let streamed = vec![
        Op::BeginFile {
            path: p("huge"),
            mode: 0o644,
            size: SIZE,
        },
        Op::EndFile {
            result: Hash::default(),
        },
    ];
    for ops in [sparse, streamed] {
        let f = Fixture::new();
        let result = apply_within(&f, batch_bytes(0, 1, &ops), 20)
            .expect("refused within 20 s, not after hashing terabytes of holes");
        let Err(ApplyError::Op { reason, .. }) = &result else {
            panic!("{result:?}");
        };
        assert!(reason.contains("holes and growth"), "{reason}");
        assert!(!f.replica.join("huge").exists());
        assert!(staging_is_empty(&f));
    }
}

/// Growing a file and truncating it back, again and again, is hashed at
/// each growth: the bound is on the batch, not on one change.
#[test]
fn growing_a_file_again_and_again_is_bounded_per_batch() {
    let f = Fixture::new();
    let mut ops = vec![create("g", 0o644, Content::Raw(b"g".to_vec()))];
    for _ in 0..4 {
        ops.push(Op::Truncate {
            path: p("g"),
            size: 8 << 20,
        });
        ops.push(Op::Truncate {
            path: p("g"),
            size: 1,
        });
    }
    let options = ApplyOptions {
        max_zeros: 20 << 20,
        ..ApplyOptions::default()
    };
    let err = apply(&f.replica, &batch_bytes(0, 1, &ops)[..], &options).unwrap_err();
    let ApplyError::Op { index, reason, .. } = &err else {
        panic!("{err}");
    };
    // The third growth passes the 20 MiB bound.
    assert_eq!(*index, 6, "{err}");
    assert!(reason.contains("holes and growth"), "{reason}");
    assert!(!f.replica.join("g").exists());
    assert!(staging_is_empty(&f));
}

/// The counterpart of the test above: a sparse file whose holes are real
/// (64 MiB, hashed as zeros) still applies.
#[test]
fn a_sparse_file_with_a_large_hole_still_applies() {
    let f = Fixture::new();
    let size = 64 << 20;
    let content = Content::Sparse {
        size,
        extents: vec![Extent {
            offset: size - 4,
            data: Chunk::Raw(b"tail".to_vec()),
        }],
    };
    f.apply(&batch_bytes(0, 1, &[create("sparse", 0o644, content)]))
        .expect("apply");
    let data = fs::read(f.replica.join("sparse")).expect("read");
    assert_eq!(data.len() as u64, size);
    assert!(data[..data.len() - 4].iter().all(|b| *b == 0));
    assert_eq!(&data[data.len() - 4..], b"tail");
    assert!(staging_is_empty(&f));
}

/// A commit step that fails (the filesystem refuses it: ENOSPC, EIO) keeps
/// the commit log; a receiver keeps its session and the sender sends the
/// batch again. That apply must finish the kept commit first: it used to
/// empty staging (whose entries the log still needed) and the next open
/// then recorded the batch as applied without its files. Found by reading
/// the receiver while writing its fuzz target.
#[test]
fn a_commit_that_failed_is_finished_before_the_same_session_goes_on() {
    let f = Fixture::new();
    let bytes = batch_bytes(0, 1, &[create("x", 0o644, Content::Raw(b"x".to_vec()))]);
    let mut session = Session::open(&f.replica).expect("open");
    let failing = ApplyOptions {
        // After the log is written: the commit stops as a failed step would.
        crash_after_step: Some(2),
        ..ApplyOptions::default()
    };
    assert!(matches!(
        session.apply_from(&mut BatchReader::new(&bytes[..]).unwrap(), &failing),
        Err(ApplyError::InjectedCrash(2))
    ));
    let again = session
        .apply_from(
            &mut BatchReader::new(&bytes[..]).unwrap(),
            &ApplyOptions::default(),
        )
        .expect("the retry");
    assert!(again.recovered && again.skipped, "{again:?}");
    assert_eq!(fs::read(f.replica.join("x")).unwrap(), b"x");
    drop(session);
    assert_eq!(read_applied(&f.replica).unwrap().map(|a| a.seq), Some(1));
    assert!(staging_is_empty(&f));
}

/// `n` new files `f0`.. of distinct content, each followed by `then(i)`.
fn many_files(n: usize, then: impl Fn(usize) -> Vec<Op>) -> Vec<Op> {
    (0..n)
        .flat_map(|i| {
            let data = format!("file {i}").repeat(1 + i % 7).into_bytes();
            std::iter::once(create(&format!("f{i}"), 0o644, Content::Raw(data))).chain(then(i))
        })
        .collect()
}

/// The unit tests hand every new file to the writer (`new_files`): the
/// stager goes on while files are written, and fails here at the
/// operation after the bad file, long before the writer gets to it. The
/// bad file is still the error reported, once every handed file was
/// collected (the complete ones are kept).
#[test]
fn a_handed_file_that_fails_is_reported_before_a_later_failure() {
    let f = Fixture::new();
    let mut ops = many_files(100, |_| Vec::new());
    ops.push(Op::CreateFile {
        path: p("bad"),
        mode: 0o644,
        content: Content::Raw(b"what was sent".to_vec()),
        result: Hash::of(b"what was hashed"),
    });
    ops.push(Op::Unlink { path: p("missing") });
    let err = f.apply(&batch_bytes(0, 1, &ops)).expect_err("refused");
    match &err {
        ApplyError::Op {
            index,
            op,
            path,
            reason,
        } => {
            assert_eq!(
                (*index, *op, path.as_str()),
                (101, "CreateFile", "bad"),
                "{err}"
            );
            assert!(reason.contains("does not match"), "{err}");
        }
        _ => panic!("expected the bad file's error, got: {err}"),
    }
    assert_eq!(fs::read_dir(&f.replica).unwrap().count(), 0);
    assert!(read_applied(&f.replica).unwrap().is_none());
    assert_eq!(fs::read_dir(f.state().join("kept")).unwrap().count(), 100);
}

/// Times are set on staged files while the batch still arrives, once
/// nothing writes to them; a later write (mtime) or read (atime) of such
/// a file moves its times, and the batch's times are set on it again, as
/// are times the batch gives it a second time.
#[test]
fn times_set_early_are_set_again_after_a_later_write() {
    let f = Fixture::new();
    let t = |i: usize| Timestamp {
        sec: 1_600_000_000 + i as i64,
        nsec: 0,
    };
    let mut ops = many_files(50, |i| {
        vec![Op::Utimes {
            path: p(&format!("f{i}")),
            atime: t(i),
            mtime: t(i),
        }]
    });
    let f0 = b"file 0".to_vec();
    let f2 = b"file 2".repeat(3);
    ops.extend([
        // Waits for the writer, so the next file's handing sets every
        // waiting time.
        Op::Truncate {
            path: p("f1"),
            size: 0,
        },
        create("last", 0o644, Content::Raw(b"last".to_vec())),
        Op::WriteRanges {
            path: p("f0"),
            ranges: vec![WriteRange {
                offset: 0,
                data: b"F".to_vec(),
            }],
            base: Hash::of(&f0),
            result: Hash::of(b"File 0"),
        },
        // f2 is read as a delta's basis.
        Op::CreateFromDelta {
            path: p("from-f2"),
            basis: p("f2"),
            base: Hash::of(&f2),
            delta: delta(&f2, b"new"),
            mode: 0o644,
            result: Hash::of(b"new"),
        },
        Op::Utimes {
            path: p("f3"),
            atime: t(100),
            mtime: t(100),
        },
    ]);
    f.apply(&batch_bytes(0, 1, &ops)).expect("apply");
    let times = |name: &str| {
        let m = fs::metadata(f.replica.join(name)).unwrap();
        (m.mtime(), m.atime())
    };
    for i in (0..50).filter(|i| *i != 3) {
        assert_eq!(times(&format!("f{i}")), (t(i).sec, t(i).sec), "f{i}");
    }
    assert_eq!(times("f3"), (t(100).sec, t(100).sec));
    // Read last, as reads move atimes.
    assert_eq!(fs::read(f.replica.join("f0")).unwrap(), b"File 0");
    assert_eq!(fs::metadata(f.replica.join("f1")).unwrap().len(), 0);
}

/// A mode the batch sets on a handed file comes after the one it was
/// created with, as in batch order.
#[test]
fn metadata_set_on_handed_files_comes_after_their_creation() {
    let f = Fixture::new();
    let mode = |i: usize| [0o600, 0o4755, 0o640][i % 3];
    let ops = many_files(300, |i| {
        vec![
            Op::Chown {
                path: p(&format!("f{i}")),
                uid: 1,
                gid: 1,
            },
            Op::Chmod {
                path: p(&format!("f{i}")),
                mode: mode(i),
            },
        ]
    });
    f.apply(&batch_bytes(0, 1, &ops)).expect("apply");
    for i in 0..300 {
        let m = fs::metadata(f.replica.join(format!("f{i}"))).unwrap();
        assert_eq!(
            (m.permissions().mode() & 0o7777, m.uid(), m.gid()),
            (mode(i), 1, 1),
            "f{i}"
        );
    }
}
