//! The replica the fuzz targets `apply_batch` and `receive` apply their
//! inputs to, and the tests that write their seed corpora and keep their
//! findings: one tree with symlinks out of the root and a canary beside it,
//! what failed connections leave in the state, and the observers that tell
//! whether anything outside the replica changed. Built for tests and with
//! the `fuzzing` feature (which the fuzz crate turns on).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};

use crate::apply::Partial;
use crate::batch::{Hash, NodeKind, Op, RelPath};

pub const A_TXT: &[u8] = b"hello, replica\n";
pub const B_TXT: &[u8] = b"world\n";
pub const C_TXT: &[u8] = b"deep\n";
pub const CANARY: &[u8] = b"canary: must never change\n";
pub const NESTED: &[u8] = b"nested outside\n";
/// `big.bin`: more than two 16 KiB leaves.
pub const BIG_LEN: usize = 40_000;

/// The content of `big.bin`.
pub fn big() -> Vec<u8> {
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
pub fn populate(dir: &Path) -> (PathBuf, PathBuf) {
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
pub const KEPT: &[u8] = b"kept from a batch that failed\n";
/// `resumed.bin`: the file a connection was cut off in; the replica kept
/// its first `RESUMED_HAVE` bytes.
pub const RESUMED_SIZE: u64 = 50_000;
pub const RESUMED_HAVE: u64 = 20_000;

/// The content of `resumed.bin`.
pub fn resumed() -> Vec<u8> {
    (0..RESUMED_SIZE).map(|i| (i * 7 % 256) as u8).collect()
}

/// Makes the state beside `r/` hold what connections that failed leave
/// behind (as `Stager::keep_complete` and `keep_partial` write it):
///
/// ```text
/// .r.ferry/kept/<blake3 of KEPT>  KEPT
/// .r.ferry/kept/partial           the first 20,000 bytes of resumed()
/// .r.ferry/kept/partial.meta      Partial { resumed.bin, 50,000, 20,000 }
/// ```
pub fn keep(state: &Path) {
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

/// Names, modes and contents below `dir`, without following symlinks.
pub fn listing(dir: &Path) -> Vec<(PathBuf, u32, Option<Vec<u8>>)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let md = fs::symlink_metadata(&d).expect("lstat");
        let content = md.is_file().then(|| fs::read(&d).expect("read"));
        out.push((d.clone(), md.mode(), content));
        if md.is_dir() {
            for e in fs::read_dir(&d).expect("readdir") {
                todo.push(e.expect("entry").path());
            }
        }
    }
    out.sort();
    out
}

/// What is observable of one entry, without following symlinks (atime
/// aside: reading a file moves it).
#[derive(Debug, PartialEq, Eq)]
pub struct Seen {
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
pub fn snapshot(root: &Path) -> BTreeMap<PathBuf, Seen> {
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
pub const HEADER: u8 = 1;
pub const OP: u8 = 2;
pub const TRAILER: u8 = 3;

/// The next frame of `rest`, as the format lays frames out (`kind`, `len`
/// as u32 LE, the payload, an 8-byte check): its kind, its payload, and
/// what follows it. `None` if `rest` does not start with a whole frame of
/// a known kind. For targets that rewrite their inputs' frames.
pub fn next_frame(rest: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let kind = *rest.first()?;
    let len = u32::from_le_bytes(rest.get(1..5)?.try_into().expect("4 bytes")) as usize;
    let payload = rest.get(5..5 + len)?;
    let after = rest.get(5 + len + 8..)?;
    (HEADER..=TRAILER)
        .contains(&kind)
        .then_some((kind, payload, after))
}

/// Sets a device node's number to 0 (no device). The fuzzer runs as root,
/// so a `Mknod` of a character or block device would make a real device
/// node (a disk, `/dev/mem`), and an applier bug that wrote to it would
/// write to the device.
pub fn defuse(op: &mut Op) {
    if let Op::Mknod {
        kind: NodeKind::Char | NodeKind::Block,
        rdev,
        ..
    } = op
    {
        *rdev = 0;
    }
}
