//! The mount's life cycle (unmount with open files, clean stops, status),
//! inode numbers, and what the journal records for single operations.

use std::ffi::OsStr;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

use serde_json::Value;

use crate::util::{
    RecordExt, TestMount, check_namespace, ferry, is_mountpoint, process_gone, replay_namespace,
};

fn path_of(r: &Value) -> &str {
    r.str_field("path").unwrap_or("").trim_start_matches('/')
}

fn records_for<'a>(records: &'a [Value], path: &str) -> Vec<&'a Value> {
    records.iter().filter(|r| path_of(r) == path).collect()
}

#[test]
fn umount_succeeds_while_files_are_open() {
    let tm =
        TestMount::with_source(|s| std::fs::write(s.join("existing"), b"old content").unwrap());
    let pid = tm.pid();
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    assert_eq!(
        exe.file_name(),
        Some(OsStr::new("ferry")),
        "mount.pid does not name a ferry process"
    );

    let writer = std::fs::File::create(tm.mnt.join("open-for-write")).unwrap();
    writer.write_all_at(b"hello", 0).unwrap();
    writer.sync_all().unwrap();
    let reader = std::fs::File::open(tm.mnt.join("existing")).unwrap();
    let mut buf = [0u8; 3];
    reader.read_exact_at(&mut buf, 0).unwrap();
    let dir = std::fs::read_dir(&tm.mnt).unwrap();

    let out = ferry([OsStr::new("umount"), tm.mnt.as_os_str()]);
    assert!(out.ok(), "ferry umount with open files failed: {out:#?}");
    assert!(
        !is_mountpoint(&tm.mnt),
        "still a mountpoint after ferry umount"
    );
    assert!(
        process_gone(pid),
        "ferry umount returned before the mount process {pid} exited"
    );
    assert_eq!(
        std::fs::read(tm.source.join("open-for-write")).unwrap(),
        b"hello"
    );
    drop((writer, reader, dir));

    // The journal was closed cleanly: the session ends with mount-stop.
    let log = tm.log(false);
    assert_eq!(
        log.last().map(|r| r.op()),
        Some("mount-stop"),
        "journal: {log:?}"
    );
}

#[test]
fn st_ino_through_the_mount_is_the_sources_and_hard_links_share_it() {
    let tm = TestMount::with_source(|s| {
        std::fs::create_dir(s.join("dir")).unwrap();
        std::fs::write(s.join("dir/file"), b"x").unwrap();
        std::fs::hard_link(s.join("dir/file"), s.join("link")).unwrap();
        std::os::unix::fs::symlink("dir/file", s.join("sym")).unwrap();
        let fifo = crate::util::cstr(&s.join("fifo"));
        // SAFETY: valid C string.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
    });
    crate::differential::check_inodes(&tm.mnt, &tm.source).unwrap();
    let ino = |p: &Path| std::fs::symlink_metadata(p).unwrap().ino();
    assert_eq!(ino(&tm.mnt.join("dir/file")), ino(&tm.mnt.join("link")));
    assert_eq!(std::fs::metadata(tm.mnt.join("link")).unwrap().nlink(), 2);

    // A hard link made through the mount, and readdir's d_ino.
    std::fs::hard_link(tm.mnt.join("link"), tm.mnt.join("dir/third")).unwrap();
    assert_eq!(
        ino(&tm.mnt.join("dir/third")),
        ino(&tm.source.join("dir/file"))
    );
    assert_eq!(
        std::fs::metadata(tm.mnt.join("dir/file")).unwrap().nlink(),
        3
    );
    for entry in std::fs::read_dir(tm.mnt.join("dir")).unwrap() {
        let entry = entry.unwrap();
        use std::os::unix::fs::DirEntryExt;
        assert_eq!(
            entry.ino(),
            ino(&tm.source.join("dir").join(entry.file_name())),
            "d_ino of {:?}",
            entry.file_name()
        );
    }
    // The root is the exception: the kernel gives a FUSE root node id 1,
    // whatever the server says (docs/SEMANTICS.md).
    assert_eq!(ino(&tm.mnt), 1, "st_ino of the mount root");
}

#[test]
fn in_place_write_is_recorded_as_dirty_then_its_ranges() {
    let tm = TestMount::with_source(|s| std::fs::write(s.join("f"), vec![7u8; 10_000]).unwrap());
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(tm.mnt.join("f"))
        .unwrap();
    f.write_all_at(&[1u8; 100], 4000).unwrap();
    f.sync_all().unwrap();
    drop(f);

    // Read while mounted: after fsync and close the ranges are in the log.
    let log = tm.log_via_mount();
    let mine = records_for(&log, "f");
    let dirty = mine
        .iter()
        .position(|r| r.op() == "dirty")
        .unwrap_or_else(|| panic!("no dirty record for f: {log:?}"));
    let write = mine
        .iter()
        .rposition(|r| r.op() == "write")
        .unwrap_or_else(|| panic!("no write record for f: {log:?}"));
    assert!(
        dirty < write,
        "dirty must precede the write ranges: {mine:?}"
    );
    let ranges: Vec<(u64, u64)> = mine
        .iter()
        .filter(|r| r.op() == "write")
        .flat_map(|r| r.ranges())
        .collect();
    assert!(
        (4000..4100).all(|o| ranges.iter().any(|&(off, len)| o >= off && o < off + len)),
        "the ranges {ranges:?} do not cover the write [4000, 4100)"
    );
    assert!(
        ranges.iter().all(|&(off, len)| off + len <= 10_000),
        "ranges beyond the file: {ranges:?}"
    );
    assert!(
        !mine
            .iter()
            .any(|r| matches!(r.op(), "rewritten" | "truncate")),
        "an in-place write must not be recorded as a rewrite: {mine:?}"
    );
    assert!(
        mine.iter().all(|r| r.id() == mine[0].id()),
        "one file, one FileId: {mine:?}"
    );
}

#[test]
fn truncating_open_is_recorded_as_rewritten() {
    let tm = TestMount::with_source(|s| std::fs::write(s.join("f"), vec![7u8; 10_000]).unwrap());
    std::fs::write(tm.mnt.join("f"), b"new").unwrap();
    std::fs::write(tm.mnt.join("new"), b"fresh").unwrap();
    tm.umount();
    let log = tm.log(false);
    assert!(
        records_for(&log, "f").iter().any(|r| r.op() == "rewritten"),
        "no rewritten record for f: {log:?}"
    );
    assert!(
        records_for(&log, "new")
            .iter()
            .any(|r| r.op() == "create" && r.str_field("kind") == Some("file")),
        "no create record for new: {log:?}"
    );
    assert_eq!(std::fs::read(tm.source.join("f")).unwrap(), b"new");
}

/// A mount whose source holds `name`, `len` zero bytes, and that file
/// opened read-write through the mount.
fn mount_with_open_file(name: &str, len: usize) -> (TestMount, std::fs::File) {
    let tm = TestMount::with_source(|s| std::fs::write(s.join(name), vec![0u8; len]).unwrap());
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(tm.mnt.join(name))
        .unwrap();
    (tm, file)
}

/// A shared read-write mapping of the first `len` bytes of a file,
/// unmapped on drop.
struct SharedMap {
    ptr: *mut u8,
    len: usize,
}

impl SharedMap {
    fn new(file: &std::fs::File, len: usize) -> SharedMap {
        use std::os::fd::AsRawFd;
        // SAFETY: a new mapping of an open descriptor, which nothing else
        // refers to.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(
            p,
            libc::MAP_FAILED,
            "mmap through the mount: {}",
            std::io::Error::last_os_error()
        );
        SharedMap { ptr: p.cast(), len }
    }

    /// The mapped bytes (the file must be at least `len` bytes long).
    fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: the mapping is `len` bytes, live until drop, and reached
        // only through this borrow.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    fn sync(&self) {
        // SAFETY: the live mapping made in `new`.
        let rc = unsafe { libc::msync(self.ptr.cast(), self.len, libc::MS_SYNC) };
        assert_eq!(rc, 0, "msync: {}", std::io::Error::last_os_error());
    }
}

impl Drop for SharedMap {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, not used after this.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

#[test]
fn shared_mmap_writes_are_journaled() {
    let (tm, file) = mount_with_open_file("m", 8192);
    let mut map = SharedMap::new(&file, 8192);
    map.bytes()[5000..5010].fill(9);
    map.sync();
    drop(map);
    drop(file);
    tm.umount();
    assert_eq!(
        &std::fs::read(tm.source.join("m")).unwrap()[5000..5010],
        &[9u8; 10]
    );
    let log = tm.log(false);
    let mine = records_for(&log, "m");
    let covered = mine.iter().any(|r| r.op() == "rewritten")
        || mine
            .iter()
            .filter(|r| r.op() == "write")
            .flat_map(|r| r.ranges())
            .any(|(o, l)| o <= 5000 && o + l >= 5010);
    assert!(
        covered,
        "the shared-mmap write is not in the journal: {mine:?}"
    );
}

/// How many of the first `len` bytes of `file` sit in its own page cache
/// (`cachestat(2)`, Linux 6.5): for a file on the mount, the mount's cache.
fn pages_cached(file: &std::fs::File, len: u64) -> u64 {
    use std::os::fd::AsRawFd;
    #[repr(C)]
    struct Range {
        off: u64,
        len: u64,
    }
    #[repr(C)]
    #[derive(Default)]
    struct CacheStat {
        nr_cache: u64,
        nr_dirty: u64,
        nr_writeback: u64,
        nr_evicted: u64,
        nr_recently_evicted: u64,
    }
    // The x86-64 and generic syscall number; the libc crate lacks a name for it.
    const SYS_CACHESTAT: libc::c_long = 451;
    let range = Range { off: 0, len };
    let mut stat = CacheStat::default();
    // SAFETY: both pointers are to live structs of the layout the call takes.
    let rc = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            file.as_raw_fd(),
            &range as *const Range,
            &mut stat as *mut CacheStat,
            0u32,
        )
    };
    assert_eq!(rc, 0, "cachestat: {}", std::io::Error::last_os_error());
    stat.nr_cache
}

#[test]
fn in_place_writes_keep_no_second_copy_in_the_mounts_page_cache() {
    const LEN: usize = 1 << 20;
    let (tm, f) = mount_with_open_file("f", LEN);
    f.write_all_at(&vec![2u8; LEN], 0).unwrap();
    let mut back = vec![0u8; LEN];
    f.read_exact_at(&mut back, 0).unwrap();
    assert!(back.iter().all(|&b| b == 2), "read back what was written");
    // The bytes are in the source's page cache, through ferry's pwrite; the
    // mount's own cache would be a second copy of them.
    assert_eq!(pages_cached(&f, LEN as u64), 0);
    drop(f);
    tm.umount();
    assert_eq!(std::fs::read(tm.source.join("f")).unwrap(), vec![2u8; LEN]);
}

#[test]
fn a_shared_mapping_and_in_place_writes_see_each_other() {
    let (tm, file) = mount_with_open_file("m", 8192);
    let mut map = SharedMap::new(&file, 8192);
    assert_eq!(map.bytes()[100], 0, "the mapping is read before the write");
    // A write through the descriptor reaches the mapping...
    file.write_all_at(&[5u8; 10], 100).unwrap();
    assert_eq!(&map.bytes()[100..110], &[5u8; 10]);
    // ...and a store into the mapping, not yet synced, reaches a read.
    map.bytes()[6000..6010].fill(6);
    let mut back = [0u8; 10];
    file.read_exact_at(&mut back, 6000).unwrap();
    assert_eq!(back, [6u8; 10]);
    drop(map);
    drop(file);
    tm.umount();
    let content = std::fs::read(tm.source.join("m")).unwrap();
    assert_eq!(
        (&content[100..110], &content[6000..6010]),
        (&[5u8; 10][..], &[6u8; 10][..])
    );
}

#[test]
fn renaming_a_directory_is_one_rename_and_keeps_the_children_ids() {
    let tm = TestMount::with_source(|s| {
        std::fs::create_dir(s.join("big")).unwrap();
        for i in 0..50 {
            std::fs::write(s.join(format!("big/f{i}")), [i as u8]).unwrap();
        }
    });
    std::fs::rename(tm.mnt.join("big"), tm.mnt.join("moved")).unwrap();
    tm.umount();
    let all = tm.log(true);
    let renames: Vec<&Value> = all.iter().filter(|r| r.op() == "rename").collect();
    assert!(
        renames
            .iter()
            .any(
                |r| r.str_field("from").map(|p| p.trim_start_matches('/')) == Some("big")
                    && r.str_field("to").map(|p| p.trim_start_matches('/')) == Some("moved")
            ),
        "no rename big -> moved: {renames:?}"
    );
    assert!(
        !all.iter()
            .any(|r| matches!(r.op(), "create" | "unlink" | "rmdir")),
        "a rename must not be journaled as delete + create: {all:?}"
    );
    let model = replay_namespace(&all).unwrap();
    check_namespace(&model, &tm.source).unwrap();
    let exists_id = all
        .iter()
        .find(|r| r.op() == "exists" && path_of(r) == "big/f7")
        .and_then(|r| r.id());
    assert_eq!(
        model.get("moved/f7").copied(),
        exists_id,
        "the child kept its FileId across the rename"
    );
}

#[test]
fn hard_links_share_one_file_id_in_the_journal() {
    let tm = TestMount::new();
    std::fs::write(tm.mnt.join("f"), b"x").unwrap();
    std::fs::create_dir(tm.mnt.join("d")).unwrap();
    std::fs::hard_link(tm.mnt.join("f"), tm.mnt.join("d/g")).unwrap();
    std::fs::remove_file(tm.mnt.join("f")).unwrap();
    tm.umount();
    let log = tm.log(false);
    let created = log
        .iter()
        .find(|r| r.op() == "create" && path_of(r) == "f")
        .and_then(|r| r.id());
    let linked = log
        .iter()
        .find(|r| r.op() == "link" && path_of(r) == "d/g")
        .and_then(|r| r.id());
    assert!(
        created.is_some() && created == linked,
        "link record must carry the file's id: {log:?}"
    );
    let unlinked = log
        .iter()
        .find(|r| r.op() == "unlink" && path_of(r) == "f")
        .and_then(|r| r.id());
    assert_eq!(unlinked, created, "{log:?}");
    check_namespace(&replay_namespace(&tm.log(true)).unwrap(), &tm.source).unwrap();
}

#[test]
fn clean_stops_need_no_recovery_and_sequence_numbers_have_no_gaps() {
    let tm = TestMount::new();
    std::fs::write(tm.mnt.join("one"), b"1").unwrap();
    tm.umount();
    tm.mount();
    std::fs::write(tm.mnt.join("two"), b"2").unwrap();
    tm.umount();
    let log = tm.log(true);
    let seqs: Vec<u64> = log.iter().map(|r| r.seq()).collect();
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1) && seqs.first() == Some(&1),
        "sequence numbers: {seqs:?}"
    );
    let sessions: Vec<(&str, Option<bool>)> = log
        .iter()
        .filter(|r| r.op().starts_with("mount-"))
        .map(|r| (r.op(), r.get("recovered").and_then(Value::as_bool)))
        .collect();
    assert_eq!(
        sessions,
        vec![
            ("mount-start", Some(false)),
            ("mount-stop", None),
            ("mount-start", Some(false)),
            ("mount-stop", None)
        ],
        "{log:?}"
    );
    assert!(
        !log.iter()
            .any(|r| r.str_field("origin") == Some("reconcile")),
        "a clean stop needs no reconcile: {log:?}"
    );
    for r in &log {
        assert!(
            r.get("unix_ns")
                .and_then(Value::as_i64)
                .is_some_and(|t| t > 1_600_000_000_000_000_000),
            "unix_ns: {r}"
        );
    }
}

#[test]
fn status_describes_the_mount_and_its_journal() {
    let tm = TestMount::with_source(|s| std::fs::write(s.join("a"), b"a").unwrap());
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(tm.mnt.join("a"))
        .unwrap();
    f.write_all_at(b"b", 0).unwrap();
    f.sync_all().unwrap();
    drop(f);
    // The log first: records the mount still appends (the close's) only
    // raise the last sequence number status reads after it.
    let log = tm.log_via_mount();
    let st = tm.status();
    assert_eq!(st["mounted"], Value::Bool(true), "{st}");
    assert_eq!(st["pid"].as_i64(), Some(tm.pid() as i64), "{st}");
    assert_eq!(
        st["mountpoint"].as_str().map(Path::new),
        Some(tm.mnt.as_path()),
        "{st}"
    );
    assert_eq!(
        st["state_dir"].as_str().map(Path::new),
        Some(tm.state.as_path()),
        "{st}"
    );
    let max_seq = log.iter().map(|r| r.seq()).max().unwrap();
    assert!(
        st["last_seq"].as_u64().is_some_and(|s| s >= max_seq),
        "last_seq in {st} behind the log's {max_seq}"
    );
    assert!(st["files"].as_u64().is_some_and(|n| n >= 1), "{st}");
    assert!(st["dirty_files"].as_u64().is_some(), "{st}");
    assert!(st["journal_bytes"].as_u64().is_some_and(|n| n > 0), "{st}");
    tm.umount();
    let out = ferry([
        OsStr::new("status"),
        OsStr::new("--state"),
        tm.state.as_os_str(),
        OsStr::new("--json"),
    ]);
    assert!(out.ok(), "{out:?}");
    let st: Value = serde_json::from_str(out.stdout.trim()).unwrap();
    assert_eq!(st["mounted"], Value::Bool(false), "{st}");
}

#[test]
fn changes_made_in_source_while_unmounted_are_found_by_reconcile() {
    let tm = TestMount::with_source(|s| {
        std::fs::write(s.join("edited"), vec![1u8; 5000]).unwrap();
        std::fs::write(s.join("moved-away"), b"m").unwrap();
        std::fs::write(s.join("deleted"), b"d").unwrap();
    });
    tm.umount();
    let before = tm.log(true).iter().map(|r| r.seq()).max().unwrap();
    std::fs::write(tm.source.join("edited"), vec![2u8; 6000]).unwrap();
    std::fs::rename(tm.source.join("moved-away"), tm.source.join("moved-here")).unwrap();
    // Created before the deletion, so that it cannot reuse the deleted
    // file's inode number (that case is a rename + rewrite by identity).
    std::fs::write(tm.source.join("born"), b"b").unwrap();
    std::fs::remove_file(tm.source.join("deleted")).unwrap();
    let out = ferry(
        tm.mount_args()
            .into_iter()
            .chain([OsStr::new("--reconcile")]),
    );
    assert!(out.ok(), "{out:?}");
    tm.umount();
    let all = tm.log(true);
    let new: Vec<&Value> = all.iter().filter(|r| r.seq() > before).collect();
    let rec = |op: &str, path: &str| {
        new.iter().any(|r| {
            r.op() == op && path_of(r) == path && r.str_field("origin") == Some("reconcile")
        })
    };
    let edited_id = all
        .iter()
        .find(|r| r.op() == "exists" && path_of(r) == "edited")
        .and_then(|r| r.id());
    assert!(
        new.iter()
            .any(|r| r.id() == edited_id && CONTENT.contains(&r.op())),
        "the edit of 'edited' was not found: {new:?}"
    );
    assert!(
        new.iter().any(|r| r.op() == "rename"
            && r.str_field("from").map(|p| p.trim_start_matches('/')) == Some("moved-away")
            && path_of(r) == "moved-here"
            && r.str_field("origin") == Some("reconcile")),
        "the rename was not recognised by inode identity: {new:?}"
    );
    assert!(
        rec("unlink", "deleted"),
        "the deletion was not found: {new:?}"
    );
    assert!(rec("create", "born"), "the new file was not found: {new:?}");
    check_namespace(&replay_namespace(&all).unwrap(), &tm.source).unwrap();
}

const CONTENT: &[&str] = crate::util::CONTENT_OPS;

/// The kernel may hold far more inodes than the mount may hold descriptors:
/// with a limit of 400 descriptors (capacity 256 cached), thousands of
/// entries are created, renamed, listed and read back through the mount.
#[test]
fn more_inodes_than_descriptors() {
    let tm = TestMount::unmounted();
    let mount = format!(
        "ulimit -n 400 && exec {} mount {} {} --state {} --background",
        crate::util::ferry_bin().display(),
        tm.source.display(),
        tm.mnt.display(),
        tm.state.display()
    );
    let out = crate::util::run(std::process::Command::new("sh").args(["-c", &mount]));
    assert!(out.ok(), "mount with a low descriptor limit: {out:?}");
    for d in 0..20 {
        let dir = tm.mnt.join(format!("d{d}"));
        std::fs::create_dir(&dir).expect("mkdir through the mount");
        for f in 0..100 {
            std::fs::write(dir.join(format!("f{f}")), format!("{d}/{f}")).expect("create");
        }
    }
    std::fs::rename(tm.mnt.join("d0"), tm.mnt.join("moved")).expect("rename");
    // Drop the kernel's caches so that every inode is looked up again.
    std::fs::write("/proc/sys/vm/drop_caches", "3").expect("drop caches");
    for d in 0..20 {
        let dir = if d == 0 {
            "moved".to_string()
        } else {
            format!("d{d}")
        };
        let names = std::fs::read_dir(tm.mnt.join(&dir)).expect("list").count();
        assert_eq!(names, 100, "entries of {dir}");
        for f in [0, 57, 99] {
            let got =
                std::fs::read_to_string(tm.mnt.join(&dir).join(format!("f{f}"))).expect("read");
            assert_eq!(got, format!("{d}/{f}"));
        }
    }
    let open = std::fs::read_dir(format!("/proc/{}/fd", tm.pid()))
        .expect("fds")
        .count();
    assert!(open < 400, "the mount holds {open} descriptors");
}

/// `open(O_RDONLY | O_TRUNC)` empties a file natively; exchanging two names
/// of one inode does nothing. Both behave the same through the mount.
#[test]
fn read_only_truncate_and_self_exchange_match_native() {
    use std::os::unix::ffi::OsStrExt;
    let native = crate::util::open_tempdir();
    let tm = TestMount::new();
    let outcome = |dir: &Path| {
        std::fs::write(dir.join("t"), b"content").expect("write");
        let c = crate::util::cstr(&dir.join("t"));
        // SAFETY: a valid C string; the descriptor is closed right after.
        let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDONLY | libc::O_TRUNC) };
        assert!(
            fd >= 0,
            "open O_RDONLY|O_TRUNC in {}: errno {}",
            dir.display(),
            crate::util::errno()
        );
        // SAFETY: fd was just opened.
        unsafe { libc::close(fd) };
        std::fs::write(dir.join("a"), b"x").expect("write");
        std::fs::hard_link(dir.join("a"), dir.join("b")).expect("link");
        let (a, b) = (
            crate::util::cstr(&dir.join("a")),
            crate::util::cstr(&dir.join("b")),
        );
        // SAFETY: valid C strings.
        let rc = unsafe {
            libc::renameat2(
                libc::AT_FDCWD,
                a.as_ptr(),
                libc::AT_FDCWD,
                b.as_ptr(),
                libc::RENAME_EXCHANGE,
            )
        };
        let mut names: Vec<Vec<u8>> = std::fs::read_dir(dir)
            .expect("list")
            .map(|e| e.expect("entry").file_name().as_bytes().to_vec())
            .collect();
        names.sort();
        (
            std::fs::metadata(dir.join("t")).expect("stat").len(),
            rc,
            names,
        )
    };
    let expected = outcome(native.path());
    assert_eq!(expected.0, 0, "native O_RDONLY|O_TRUNC empties the file");
    assert_eq!(outcome(&tm.mnt), expected);
    // Records reach the log in groups on the journal's writer thread: a
    // clean unmount writes what it still holds before the log is read.
    tm.umount();
    // The self-exchange left no record: the journal's names still match the tree.
    let records = tm.log(false);
    assert!(
        !records.iter().any(|r| r["op"] == "rename"),
        "a no-op exchange was journaled: {records:?}"
    );
    assert!(
        records
            .iter()
            .any(|r| r["op"] == "rewritten" && r["path"] == "t"),
        "O_TRUNC not journaled"
    );
}

/// The voluntary context switches of each of the mount's io_uring queue
/// threads (`fuser-ring-N`): one per wait for the next request.
/// The mount's queue threads (`fuser-ring-N`): the directory of each under
/// /proc.
fn queue_threads(pid: i32) -> Vec<std::path::PathBuf> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("list the mount's threads");
    tasks
        .map(|task| task.expect("task entry").path())
        .filter(|dir| {
            std::fs::read_to_string(dir.join("comm")).is_ok_and(|n| n.starts_with("fuser-ring-"))
        })
        .collect()
}

/// How many times each queue thread has been switched in.
fn queue_thread_switches(pid: i32) -> Vec<u64> {
    queue_threads(pid)
        .iter()
        .map(|dir| {
            let status = std::fs::read_to_string(dir.join("status")).expect("thread status");
            let count = |field: &str| -> u64 {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(field))
                    .and_then(|n| n.trim().parse().ok())
                    .unwrap_or_else(|| panic!("{field} in {status}"))
            };
            count("voluntary_ctxt_switches:") + count("nonvoluntary_ctxt_switches:")
        })
        .collect()
}

/// A thread's scheduling policy: field 41 of its `stat`.
fn scheduling_policy(thread: &Path) -> i32 {
    let stat = std::fs::read_to_string(thread.join("stat")).expect("thread stat");
    // The name (field 2) may hold spaces; the fields after it do not.
    let after_name = &stat[stat.rfind(')').expect("stat has a name") + 2..];
    after_name
        .split(' ')
        .nth(41 - 3)
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no policy in {stat}"))
}

/// Where the kernel offers FUSE over io_uring (`scripts/setup` turns it on,
/// so CI always has it), requests are served by one queue thread per CPU;
/// `--no-io-uring` keeps them all on /dev/fuse.
#[test]
fn requests_are_served_by_per_cpu_io_uring_queues_when_the_kernel_offers_them() {
    // Kernels before 6.14 have no such parameter, and no queues to test.
    let Ok(enabled) = std::fs::read_to_string("/sys/module/fuse/parameters/enable_uring") else {
        eprintln!("skipped: this kernel has no FUSE over io_uring");
        return;
    };
    if enabled.trim() != "Y" {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI runs scripts/setup, which sets the fuse module's enable_uring"
        );
        eprintln!("skipped: FUSE over io_uring is off (scripts/setup turns it on)");
        return;
    }
    let tm = TestMount::new();
    for thread in queue_threads(tm.pid()) {
        assert_eq!(
            scheduling_policy(&thread),
            libc::SCHED_IDLE,
            "{thread:?}: queue threads run at SCHED_IDLE to keep callers on their CPU"
        );
    }
    let before = queue_thread_switches(tm.pid());
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert!(
        before.len() >= cpus,
        "{} queue threads for {cpus} CPUs",
        before.len()
    );
    for i in 0..50 {
        std::fs::write(tm.mnt.join(format!("f{i}")), b"through the queues").expect("write");
    }
    let after = queue_thread_switches(tm.pid());
    let served: u64 = after.iter().sum::<u64>() - before.iter().sum::<u64>();
    assert!(
        served >= 50,
        "the queue threads ran {served} times for 50 files created"
    );
    tm.umount();

    tm.mount_with(&["--no-io-uring"]);
    assert_eq!(queue_thread_switches(tm.pid()), Vec::<u64>::new());
    assert_eq!(
        std::fs::read(tm.mnt.join("f49")).expect("read back"),
        b"through the queues"
    );
}

/// The queue threads run at `SCHED_IDLE`; busy threads on every CPU must
/// not starve them. Starved, each request would wait for the busy loops'
/// time slices to run out; the bound below is a thousand times what the
/// lookups take.
#[test]
fn requests_are_served_while_every_cpu_is_busy() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let tm = TestMount::new();
    let stop = Arc::new(AtomicBool::new(false));
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let busy: Vec<_> = (0..cpus)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::hint::spin_loop();
                }
            })
        })
        .collect();
    let start = std::time::Instant::now();
    let mut served = 0;
    for i in 0..2000 {
        let missing = tm.mnt.join(format!("missing{i}"));
        assert_eq!(
            std::fs::metadata(&missing).map_err(|e| e.kind()).err(),
            Some(std::io::ErrorKind::NotFound)
        );
        served += 1;
        if start.elapsed() > std::time::Duration::from_secs(60) {
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    for thread in busy {
        thread.join().expect("busy thread");
    }
    assert_eq!(served, 2000, "lookups served in 60 s beside busy loops");
    tm.umount();
}

/// mountinfo holds paths byte for byte: a mountpoint whose name is not
/// UTF-8 is found by `status` and `umount` (which once failed to read
/// mountinfo at all while such a mount existed anywhere).
#[test]
fn a_mountpoint_whose_name_is_not_utf8_is_found() {
    use std::os::unix::ffi::OsStrExt;
    let mut tm = TestMount::unmounted();
    let odd = tm.path("").join(OsStr::from_bytes(b"mnt-\xff"));
    std::fs::create_dir(&odd).expect("mkdir the mountpoint");
    tm.mnt = odd;
    tm.mount();
    std::fs::write(tm.mnt.join("f"), b"x").expect("write through the mount");
    let st = tm.status();
    assert_eq!(st["mounted"], Value::Bool(true), "{st}");
    assert_eq!(st["pid"].as_i64(), Some(tm.pid() as i64), "{st}");
    tm.umount();
}
