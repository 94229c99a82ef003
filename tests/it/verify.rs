//! `ferry verify`: exit codes, the text and JSON reports, and agreement with
//! `rsync -aHAX` about what an exact copy is.

use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{lchown, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::fcntl::AT_FDCWD;
use nix::sys::stat::{Mode, SFlag, UtimensatFlags, makedev, mknod, utimensat};
use nix::sys::time::TimeSpec;

use crate::util::{assert_one_line_error, chmod, ferry, open_tempdir, parse_json_lines, run};

/// A source tree with one of everything rsync -aHAX preserves, and an empty
/// replica directory beside it.
struct Trees {
    _dir: tempfile::TempDir,
    source: PathBuf,
    replica: PathBuf,
}

impl Trees {
    fn new() -> Trees {
        let dir = open_tempdir();
        let source = dir.path().join("source");
        let replica = dir.path().join("replica");
        fs::create_dir(&replica).expect("mkdir replica");
        fill(&source);
        Trees {
            _dir: dir,
            source,
            replica,
        }
    }

    /// The replica made an exact copy of the source by rsync.
    fn copied() -> Trees {
        let trees = Trees::new();
        let out = run(Command::new("rsync")
            .arg("-aHAX")
            .arg("--numeric-ids")
            .arg(slash(&trees.source))
            .arg(slash(&trees.replica)));
        assert!(out.ok(), "rsync: {out:#?}");
        trees
    }

    fn verify(&self, json: bool) -> crate::util::Output {
        let mut args = vec![self.source.as_os_str(), self.replica.as_os_str()];
        if json {
            args.push(OsStr::new("--json"));
        }
        ferry([OsStr::new("verify")].into_iter().chain(args))
    }
}

/// `path/`: rsync copies the directory's contents (and its own metadata).
fn slash(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push("/");
    PathBuf::from(s)
}

fn fill(root: &Path) {
    fs::create_dir_all(root.join("dir/empty")).expect("mkdir");
    fs::write(root.join("dir/file"), "some content\n").expect("write");
    fs::write(root.join("setuid"), "x").expect("write");
    chmod(&root.join("setuid"), 0o4755);
    chmod(&root.join("dir"), 0o1777);
    fs::write(root.join("owned"), "y").expect("write");
    lchown(root.join("owned"), Some(1234), Some(5678)).expect("chown");
    symlink("dir/file", root.join("link")).expect("symlink");
    lchown(root.join("link"), Some(1234), Some(1234)).expect("chown");
    fs::write(root.join("hard1"), "linked").expect("write");
    fs::hard_link(root.join("hard1"), root.join("hard2")).expect("link");
    fs::hard_link(root.join("hard1"), root.join("dir/hard3")).expect("link");
    nix::unistd::mkfifo(&root.join("fifo"), Mode::from_bits_truncate(0o640)).expect("mkfifo");
    mknod(
        &root.join("null"),
        SFlag::S_IFCHR,
        Mode::from_bits_truncate(0o666),
        makedev(1, 3),
    )
    .expect("mknod");
    xattr::set(root.join("dir/file"), "user.comment", b"hello").expect("xattr");
    xattr::set(root.join("dir"), "trusted.t", b"\x00\xff").expect("xattr");
    let acl = run(Command::new("setfacl")
        .args(["-m", "u:1234:rw"])
        .arg(root.join("dir/file")));
    assert!(acl.ok(), "setfacl: {acl:#?}");
    let sparse = fs::File::create(root.join("sparse")).expect("create");
    sparse.set_len(64 << 20).expect("truncate");
    fs::write(root.join(OsStr::from_bytes(b"caf\xe9")), "latin-1 name").expect("write");
    let big: Vec<u8> = (0..(6 << 20)).map(|i: u32| (i % 253) as u8).collect();
    fs::write(root.join("big"), big).expect("write");
    set_times(root);
}

/// Gives every entry an mtime in the past, with nanoseconds. rsync sets the
/// mtime of a directory, symlink or special file only when it differs from
/// the copy's in whole seconds: for a tree made in the same second as its
/// copy, it would leave nanosecond differences, which verify rightly
/// reports.
fn set_times(path: &Path) {
    let meta = fs::symlink_metadata(path).expect("lstat");
    if meta.is_dir() {
        for dirent in fs::read_dir(path).expect("read_dir") {
            set_times(&dirent.expect("dirent").path());
        }
    }
    let t = TimeSpec::new(1_577_836_800, 123_456_789);
    utimensat(AT_FDCWD, path, &t, &t, UtimensatFlags::NoFollowSymlink).expect("utimensat");
}

#[test]
fn an_rsync_copy_is_equal() {
    let trees = Trees::copied();
    let out = trees.verify(false);
    assert_eq!(out.code, Some(0), "{out:#?}");
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 1, "{out:#?}");
    assert!(lines[0].starts_with("equal ("), "{out:#?}");
    assert!(out.stderr.is_empty(), "{out:#?}");

    let out = trees.verify(true);
    assert_eq!(out.code, Some(0), "{out:#?}");
    let lines = parse_json_lines(&out.stdout);
    assert_eq!(lines.len(), 1, "{out:#?}");
    let summary = &lines[0];
    assert_eq!(summary["equal"], true);
    assert_eq!(summary["differences"], 0);
    // The roots, dir, dir/empty, dir/file, dir/hard3, setuid, owned, link,
    // hard1, hard2, fifo, null, sparse, the latin-1 name, big.
    assert_eq!(summary["files"], 15);
    assert!(summary["bytes_compared"].as_u64().expect("a number") > 70 << 20);
}

#[test]
fn differences_are_listed_and_exit_1() {
    let trees = Trees::copied();
    let r = &trees.replica;
    chmod(&r.join("setuid"), 0o755);
    fs::write(r.join("dir/file"), "some CONTENT\n").expect("write");
    fs::write(r.join("extra"), "").expect("write");
    fs::remove_file(r.join("hard2")).expect("rm");
    fs::remove_file(r.join(OsStr::from_bytes(b"caf\xe9"))).expect("rm");
    xattr::set(r.join("dir/file"), "user.comment", b"bye").expect("xattr");

    let out = trees.verify(false);
    assert_eq!(out.code, Some(1), "{out:#?}");
    let lines: Vec<&str> = out.stdout.lines().collect();
    for expected in [
        "mode differs: setuid (4755 vs 0755)",
        "content differs: dir/file",
        "only in replica: extra",
        "only in source: hard2",
        "only in source: caf\u{fffd}",
        "xattr differs: dir/file (user.comment: \"hello\" vs \"bye\")",
    ] {
        assert!(lines.contains(&expected), "no {expected:?} in {out:#?}");
    }
    // Creating and removing entries changed the replica root's mtime and
    // dir's mtime and ctime, which verify reports too.
    assert!(
        lines.iter().any(|l| l.starts_with("mtime differs: . (")),
        "{out:#?}"
    );
    let n = lines.len() - 1;
    assert!(
        lines[n].starts_with(&format!("{n} differences (13 files, ")),
        "{out:#?}"
    );

    let out = trees.verify(true);
    assert_eq!(out.code, Some(1), "{out:#?}");
    let values = parse_json_lines(&out.stdout);
    let (summary, differences) = values.split_last().expect("a summary");
    assert_eq!(summary["equal"], false);
    assert_eq!(summary["differences"], differences.len());
    assert_eq!(differences.len(), n);
    let find = |path: &str, kind: &str| {
        differences
            .iter()
            .find(|d| d["path"] == path && d["kind"] == kind)
            .unwrap_or_else(|| panic!("no {kind} difference at {path} in {values:#?}"))
    };
    let mode = find("setuid", "mode");
    assert_eq!(
        (&mode["source"], &mode["replica"]),
        (&"4755".into(), &"0755".into())
    );
    let content = find("dir/file", "content");
    assert_eq!(content["source"].as_str().map(str::len), Some(64));
    let extra = find("extra", "extra_in_replica");
    assert_eq!(
        (&extra["source"], &extra["replica"]),
        (&serde_json::Value::Null, &"file".into())
    );
    find("hard2", "missing_in_replica");
    let xattr = find("dir/file", "xattr");
    assert_eq!(xattr["name"], "user.comment");
    assert_eq!(xattr["source"], "\"hello\"");
}

#[test]
fn hard_link_differences() {
    let trees = Trees::copied();
    let r = &trees.replica;
    fs::remove_file(r.join("hard2")).expect("rm");
    fs::copy(r.join("hard1"), r.join("hard2")).expect("copy");
    // Give the copy and the replica root the source's times again.
    for path in [Path::new("hard2"), Path::new("")] {
        let out = run(Command::new("touch")
            .arg("-r")
            .arg(trees.source.join(path))
            .arg(r.join(path)));
        assert!(out.ok(), "{out:#?}");
    }

    let out = trees.verify(false);
    assert_eq!(out.code, Some(1), "{out:#?}");
    assert_eq!(
        out.stdout.lines().next(),
        Some("hard links differ: dir/hard3 ([dir/hard3, hard1, hard2] vs [dir/hard3, hard1])"),
        "{out:#?}"
    );
}

#[test]
fn a_missing_source_is_an_error() {
    let trees = Trees::new();
    let missing = trees.source.join("no-such-dir");
    let out = ferry([
        OsStr::new("verify"),
        missing.as_os_str(),
        trees.replica.as_os_str(),
    ]);
    assert_eq!(out.code, Some(2), "{out:#?}");
    assert_one_line_error(&out, "verify with a missing SOURCE");
    assert!(out.stderr.contains(&*missing.to_string_lossy()), "{out:#?}");
    assert!(out.stdout.is_empty(), "{out:#?}");

    let file = trees.source.join("dir/file");
    let out = ferry([
        OsStr::new("verify"),
        trees.source.as_os_str(),
        file.as_os_str(),
    ]);
    assert_eq!(out.code, Some(2), "{out:#?}");
    assert_one_line_error(&out, "verify with a file as REPLICA");
    assert!(out.stderr.contains("not a directory"), "{out:#?}");
}

/// Unmounts on drop, also when the test fails.
struct TmpfsMount(PathBuf);

impl TmpfsMount {
    fn new(path: &Path) -> TmpfsMount {
        fs::create_dir(path).expect("mkdir mountpoint");
        let out = run(Command::new("mount")
            .args(["-t", "tmpfs", "ferry-test"])
            .arg(path));
        assert!(out.ok(), "mount: {out:#?}");
        TmpfsMount(path.to_path_buf())
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        let _ = run(Command::new("umount").arg("-l").arg(&self.0));
    }
}

#[test]
fn another_filesystem_is_skipped_and_listed() {
    let trees = Trees::copied();
    let mnt = TmpfsMount::new(&trees.source.join("mnt"));
    fs::write(mnt.0.join("inside"), "not compared").expect("write");
    // Copy what the mount changed in the source root (its mtime).
    let out = run(Command::new("touch")
        .arg("-r")
        .arg(&trees.source)
        .arg(&trees.replica));
    assert!(out.ok(), "{out:#?}");

    let out = trees.verify(false);
    assert_eq!(out.code, Some(0), "{out:#?}");
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{out:#?}");
    assert_eq!(lines[0], "skipped, on another filesystem: mnt (in source)");
    assert!(lines[1].starts_with("equal, 1 skipped ("), "{out:#?}");

    let out = trees.verify(true);
    let values = parse_json_lines(&out.stdout);
    assert_eq!(values[0]["kind"], "skipped");
    assert_eq!(values[0]["path"], "mnt");
    assert_eq!(values[0]["side"], "source");
    assert_eq!(values[1]["skipped"], 1);
}
