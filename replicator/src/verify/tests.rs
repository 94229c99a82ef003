//! Two trees built alike, one changed in one way, and what verify names.
//! Needs root (owners, device nodes, trusted xattrs).

use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{PermissionsExt, lchown, symlink};
use std::path::{Path, PathBuf};

use nix::fcntl::AT_FDCWD;
use nix::sys::stat::{Mode, SFlag, UtimensatFlags, makedev, mknod, utimensat};
use nix::sys::time::TimeSpec;

use super::*;

/// The mtime every entry gets: nanoseconds matter.
const SECS: i64 = 1_700_000_000;
const NANOS: i64 = 123_456_789;

const BIG: usize = 5 << 20;

fn non_utf8() -> &'static OsStr {
    OsStr::from_bytes(b"caf\xe9")
}

struct Pair {
    _dir: tempfile::TempDir,
    source: PathBuf,
    replica: PathBuf,
}

/// A source and a replica holding the same tree.
fn pair() -> Pair {
    let dir = tempfile::tempdir().expect("temp dir");
    let source = dir.path().join("source");
    let replica = dir.path().join("replica");
    for root in [&source, &replica] {
        fs::create_dir(root).expect("mkdir root");
        build(root);
        settle(root);
    }
    Pair {
        _dir: dir,
        source,
        replica,
    }
}

/// One of everything: files (one big enough to be hashed on two threads),
/// directories (one empty), a symlink, a FIFO, a device, hard links, an
/// xattr, a name that is not UTF-8.
fn build(root: &Path) {
    fs::create_dir_all(root.join("d/e")).expect("mkdir");
    fs::write(root.join("d/f"), "hello world").expect("write");
    set_mode(&root.join("d/f"), 0o640);
    xattr::set(root.join("d/f"), "user.k", b"v").expect("set xattr");
    let big: Vec<u8> = (0..BIG).map(|i| (i % 251) as u8).collect();
    fs::write(root.join("big"), big).expect("write");
    symlink("d/f", root.join("l")).expect("symlink");
    nix::unistd::mkfifo(&root.join("p"), Mode::from_bits_truncate(0o644)).expect("mkfifo");
    mknod(
        &root.join("c"),
        SFlag::S_IFCHR,
        Mode::from_bits_truncate(0o600),
        makedev(1, 3),
    )
    .expect("mknod");
    fs::write(root.join("h1"), "linked").expect("write");
    fs::hard_link(root.join("h1"), root.join("h2")).expect("link");
    fs::write(root.join("s1"), "same").expect("write");
    fs::write(root.join("s2"), "same").expect("write");
    fs::write(root.join(non_utf8()), "name").expect("write");
}

/// Sets every entry's mtime (the root's too) to the same instant, so that
/// creating or removing entries leaves no trace in directory mtimes.
fn settle(path: &Path) {
    set_mtime(path, SECS, NANOS);
    let meta = fs::symlink_metadata(path).expect("lstat");
    if meta.is_dir() {
        for dirent in fs::read_dir(path).expect("read_dir") {
            settle(&dirent.expect("dirent").path());
        }
        set_mtime(path, SECS, NANOS);
    }
}

fn set_mtime(path: &Path, secs: i64, nanos: i64) {
    let t = TimeSpec::new(secs, nanos);
    utimensat(AT_FDCWD, path, &t, &t, UtimensatFlags::NoFollowSymlink).expect("utimensat");
}

fn set_mode(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod");
}

fn run(p: &Pair) -> Report {
    let report = verify(&p.source, &p.replica, &Options::default()).expect("verify");
    assert!(report.errors.is_empty(), "{:#?}", report.errors);
    report
}

/// (path, kind) of every difference, sorted.
fn kinds(report: &Report) -> Vec<(String, &'static str)> {
    let mut kinds: Vec<_> = report
        .differences
        .iter()
        .map(|d| (d.path.to_string_lossy().into_owned(), d.what.kind()))
        .collect();
    kinds.sort();
    kinds
}

/// Changes the replica with `change`, settles its mtimes, and checks that
/// verify finds exactly `expected`.
fn check(change: impl FnOnce(&Path), expected: &[(&str, &str)]) -> Report {
    let p = pair();
    change(&p.replica);
    settle(&p.replica);
    let report = run(&p);
    let mut expected: Vec<(String, &str)> =
        expected.iter().map(|(p, k)| (p.to_string(), *k)).collect();
    expected.sort();
    assert_eq!(kinds(&report), expected, "{:#?}", report.differences);
    report
}

fn only(report: &Report) -> &What {
    assert_eq!(report.differences.len(), 1, "{:#?}", report.differences);
    &report.differences[0].what
}

#[test]
fn equal_trees_are_equal() {
    let p = pair();
    let report = run(&p);
    assert!(report.is_equal(), "{:#?}", report.differences);
    assert!(report.skipped.is_empty());
    // The root, d, d/e, d/f, big, l, p, c, h1, h2, s1, s2 and the odd name.
    assert_eq!(report.files, 13);
    let files = ["d/f", "big", "h1", "h2", "s1", "s2"];
    let bytes: u64 = files
        .iter()
        .map(|f| fs::metadata(p.source.join(f)).expect("stat").len())
        .sum::<u64>()
        + 4;
    assert_eq!(report.bytes_compared, bytes);
}

#[test]
fn content_of_the_same_size() {
    let report = check(
        |r| fs::write(r.join("d/f"), "hello World").expect("write"),
        &[("d/f", "content")],
    );
    assert!(matches!(only(&report), What::Content { source, replica } if source != replica));
}

#[test]
fn content_of_a_big_file() {
    check(
        |r| {
            let mut big = fs::read(r.join("big")).expect("read");
            big[BIG / 2] ^= 1;
            fs::write(r.join("big"), big).expect("write");
        },
        &[("big", "content")],
    );
}

#[test]
fn content_is_not_read_when_sizes_differ() {
    let report = check(
        |r| fs::write(r.join("d/f"), "hello world!").expect("write"),
        &[("d/f", "size")],
    );
    assert_eq!(
        *only(&report),
        What::Size {
            source: 11,
            replica: 12
        }
    );
}

#[test]
fn content_is_not_compared_when_asked_not_to() {
    let p = pair();
    fs::write(p.replica.join("d/f"), "hello World").expect("write");
    settle(&p.replica);
    let options = Options { content: false };
    let report = verify(&p.source, &p.replica, &options).expect("verify");
    assert!(report.is_equal(), "{:#?}", report.differences);
    assert_eq!(report.bytes_compared, 0);
}

#[test]
fn mode() {
    let report = check(|r| set_mode(&r.join("d/f"), 0o600), &[("d/f", "mode")]);
    assert_eq!(
        *only(&report),
        What::Mode {
            source: 0o640,
            replica: 0o600
        }
    );
}

#[test]
fn setuid_setgid_and_sticky_bits() {
    check(
        |r| {
            set_mode(&r.join("d/f"), 0o4640);
            set_mode(&r.join("s1"), 0o2644);
            set_mode(&r.join("d/e"), 0o1755);
        },
        &[("d/f", "mode"), ("s1", "mode"), ("d/e", "mode")],
    );
}

#[test]
fn the_roots_own_metadata() {
    check(|r| set_mode(r, 0o700), &[("", "mode")]);
}

#[test]
fn owner_of_a_file_and_of_a_symlink() {
    let report = check(
        |r| {
            lchown(r.join("d/f"), Some(1000), Some(1000)).expect("chown");
            lchown(r.join("l"), Some(0), Some(1000)).expect("chown");
        },
        &[("d/f", "owner"), ("l", "owner")],
    );
    let d = report
        .differences
        .iter()
        .find(|d| d.path == Path::new("d/f"))
        .expect("d/f");
    assert_eq!(
        d.what,
        What::Owner {
            source: Ids { uid: 0, gid: 0 },
            replica: Ids {
                uid: 1000,
                gid: 1000
            }
        }
    );
}

#[test]
fn mtime_by_one_nanosecond() {
    let p = pair();
    set_mtime(&p.replica.join("d/f"), SECS, NANOS + 1);
    let report = run(&p);
    assert_eq!(kinds(&report), [("d/f".to_string(), "mtime")]);
    assert_eq!(
        *only(&report),
        What::Mtime {
            source: Timestamp {
                secs: SECS,
                nanos: NANOS as u32
            },
            replica: Timestamp {
                secs: SECS,
                nanos: NANOS as u32 + 1
            }
        }
    );
}

#[test]
fn mtime_of_a_symlink_and_of_a_directory() {
    let p = pair();
    set_mtime(&p.replica.join("l"), SECS + 1, NANOS);
    set_mtime(&p.replica.join("d"), SECS - 1, NANOS);
    let report = run(&p);
    let mut expected = vec![("d".to_string(), "mtime"), ("l".to_string(), "mtime")];
    expected.sort();
    assert_eq!(kinds(&report), expected);
}

#[test]
fn symlink_target() {
    let report = check(
        |r| {
            fs::remove_file(r.join("l")).expect("rm");
            symlink("d/g", r.join("l")).expect("symlink");
        },
        &[("l", "symlink")],
    );
    assert_eq!(
        *only(&report),
        What::Symlink {
            source: "d/f".into(),
            replica: "d/g".into()
        }
    );
}

#[test]
fn a_symlink_is_never_followed() {
    // The replica's d is a symlink to the source's own d: following it
    // would make everything below look equal.
    let p = pair();
    fs::remove_dir_all(p.replica.join("d")).expect("rm");
    symlink(p.source.join("d"), p.replica.join("d")).expect("symlink");
    settle(&p.replica);
    let report = run(&p);
    assert_eq!(kinds(&report), [("d".to_string(), "type")]);
}

#[test]
fn xattr_value_and_presence() {
    let report = check(
        |r| {
            xattr::set(r.join("d/f"), "user.k", b"w").expect("set");
            xattr::set(r.join("d"), "trusted.t", b"\x00\x01").expect("set");
        },
        &[("d/f", "xattr"), ("d", "xattr")],
    );
    let d = report
        .differences
        .iter()
        .find(|d| d.path == Path::new("d"))
        .expect("d");
    assert_eq!(
        d.what,
        What::Xattr {
            name: "trusted.t".into(),
            source: None,
            replica: Some(vec![0, 1])
        }
    );
}

#[test]
fn xattr_missing_in_replica() {
    check(
        |r| xattr::remove(r.join("d/f"), "user.k").expect("remove"),
        &[("d/f", "xattr")],
    );
}

#[test]
fn missing_and_extra_entries() {
    check(
        |r| {
            fs::remove_file(r.join("d/f")).expect("rm");
            fs::create_dir_all(r.join("x/y/z")).expect("mkdir");
            fs::write(r.join("x/y/z/w"), "w").expect("write");
        },
        // One line for x, however much is below it.
        &[("d/f", "missing_in_replica"), ("x", "extra_in_replica")],
    );
}

#[test]
fn a_missing_directory_is_one_difference() {
    let report = check(
        |r| fs::remove_dir_all(r.join("d")).expect("rm"),
        &[("d", "missing_in_replica")],
    );
    assert_eq!(*only(&report), What::MissingInReplica(FileKind::Dir));
}

#[test]
fn type_file_and_directory() {
    check(
        |r| {
            fs::remove_file(r.join("d/f")).expect("rm");
            fs::create_dir(r.join("d/f")).expect("mkdir");
            fs::remove_dir(r.join("d/e")).expect("rm");
            fs::write(r.join("d/e"), "").expect("write");
        },
        &[("d/e", "type"), ("d/f", "type")],
    );
}

#[test]
fn a_fifo_is_compared_without_opening_it() {
    let report = check(
        |r| {
            fs::remove_file(r.join("p")).expect("rm");
            fs::write(r.join("p"), "").expect("write");
            set_mode(&r.join("p"), 0o644);
        },
        &[("p", "type")],
    );
    assert_eq!(
        *only(&report),
        What::Type {
            source: FileKind::Fifo,
            replica: FileKind::File
        }
    );
}

#[test]
fn device_numbers() {
    check(
        |r| {
            fs::remove_file(r.join("c")).expect("rm");
            mknod(
                &r.join("c"),
                SFlag::S_IFCHR,
                Mode::from_bits_truncate(0o600),
                makedev(1, 5),
            )
            .expect("mknod");
        },
        &[("c", "rdev")],
    );
}

#[test]
fn hard_links_split() {
    let report = check(
        |r| {
            fs::remove_file(r.join("h2")).expect("rm");
            fs::copy(r.join("h1"), r.join("h2")).expect("copy");
        },
        &[("h1", "links")],
    );
    assert_eq!(
        *only(&report),
        What::Links {
            source: vec!["h1".into(), "h2".into()],
            replica: vec!["h1".into()],
        }
    );
}

#[test]
fn hard_links_joined() {
    let report = check(
        |r| {
            fs::remove_file(r.join("s2")).expect("rm");
            fs::hard_link(r.join("s1"), r.join("s2")).expect("link");
        },
        &[("s1", "links")],
    );
    assert_eq!(
        *only(&report),
        What::Links {
            source: vec!["s1".into()],
            replica: vec!["s1".into(), "s2".into()],
        }
    );
}

#[test]
fn hard_links_to_a_missing_path_are_not_reported_twice() {
    check(
        |r| fs::remove_file(r.join("h2")).expect("rm"),
        &[("h2", "missing_in_replica")],
    );
}

#[test]
fn names_that_are_not_utf8() {
    let report = check(
        |r| fs::remove_file(r.join(non_utf8())).expect("rm"),
        &[("caf\u{fffd}", "missing_in_replica")],
    );
    assert_eq!(report.differences[0].path.as_os_str(), non_utf8());
}

#[test]
fn a_file_without_permissions_is_read() {
    check(
        |r| {
            fs::write(r.join("d/f"), "hello World").expect("write");
            set_mode(&r.join("d/f"), 0o000);
        },
        &[("d/f", "content"), ("d/f", "mode")],
    );
}

#[test]
fn unusable_roots() {
    let p = pair();
    let missing = p.source.join("nothing");
    match verify(&missing, &p.replica, &Options::default()) {
        Err(VerifyError::Root { role, path, .. }) => {
            assert_eq!((role, path), ("SOURCE", missing));
        }
        other => panic!("{other:?}"),
    }
    let file = p.replica.join("d/f");
    match verify(&p.source, &file, &Options::default()) {
        Err(VerifyError::RootNotDirectory { role, path }) => {
            assert_eq!((role, path), ("REPLICA", file));
        }
        other => panic!("{other:?}"),
    }
}
