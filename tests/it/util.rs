//! Helpers that keep each test short: running the `ferry` binary, a mounted
//! test tree that always unmounts, the journal as JSON values, and thin
//! wrappers over the syscalls the tests compare.

use std::collections::BTreeMap;
use std::ffi::{CString, OsStr};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

/// The binary under test.
pub fn ferry_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_ferry"))
}

/// What a finished command left behind.
#[derive(Debug)]
pub struct Output {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn ok(&self) -> bool {
        self.code == Some(0)
    }

    /// Panics with the whole output unless the command succeeded.
    pub fn expect_ok(self, what: &str) -> Output {
        assert!(self.ok(), "{what} failed: {self:#?}");
        self
    }
}

pub fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    Output {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A `ferry` command with `args`, not yet run. It runs under `timeout`, so
/// that a hang fails the test (exit 124) instead of stalling the suite.
pub fn ferry_cmd<I, S>(args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new("timeout");
    cmd.args(["--kill-after=5", "120"])
        .arg(ferry_bin())
        .args(args);
    // The tests read stderr: keep it free of anything but errors.
    cmd.env_remove("FERRY_LOG").env_remove("RUST_LOG");
    cmd
}

pub fn ferry<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run(&mut ferry_cmd(args))
}

/// Asserts the contract for refused input: non-zero exit and exactly one
/// line on stderr, starting with `ferry: `.
pub fn assert_one_line_error(out: &Output, what: &str) {
    assert!(
        !out.ok() && out.code.is_some(),
        "{what}: expected a non-zero exit, got {out:#?}"
    );
    let lines: Vec<&str> = out.stderr.trim_end().lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "{what}: expected one line on stderr, got {out:#?}"
    );
    assert!(
        lines[0].starts_with("ferry: ") && lines[0].len() > "ferry: ".len() + 5,
        "{what}: {out:#?}"
    );
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`; other
/// bytes (a name that is not UTF-8) come as they are.
fn unescape(b: &[u8]) -> PathBuf {
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    PathBuf::from(OsStr::from_bytes(&out))
}

/// The (fstype, source) of every mount at exactly `path`, oldest first.
pub fn mounts_at(path: &Path) -> Vec<(String, String)> {
    let text = std::fs::read("/proc/self/mountinfo").expect("read /proc/self/mountinfo");
    let field = |f: &[u8]| String::from_utf8_lossy(f).into_owned();
    let mut found = Vec::new();
    for line in text.split(|b| *b == b'\n') {
        let Some(dash) = line.windows(3).position(|w| w == b" - ") else {
            continue;
        };
        let Some(mp) = line[..dash].split(|b| *b == b' ').nth(4) else {
            continue;
        };
        if unescape(mp) == path {
            let mut r = line[dash + 3..].split(|b| *b == b' ');
            let fstype = field(r.next().unwrap_or_default());
            let source = field(r.next().unwrap_or_default());
            found.push((fstype, source));
        }
    }
    found
}

pub fn is_mountpoint(path: &Path) -> bool {
    !mounts_at(path).is_empty()
}

/// A temp directory usable by every user (tempfile makes them 0700).
pub fn open_tempdir() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("ferry-it-")
        .tempdir()
        .expect("create a temp dir");
    chmod(dir.path(), 0o755);
    dir
}

pub fn chmod(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
}

pub fn cstr(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).expect("no NUL in test paths")
}

pub fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// Whether process `pid` has exited (gone, or a zombie nobody reaped yet).
pub fn process_gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.trim_start().starts_with('Z'))
            .unwrap_or(false),
    }
}

/// Blocks until process `pid` (not necessarily our child) has exited, using a
/// pidfd: no sleeping. Panics after 30 s, which only a hang can reach.
pub fn wait_for_exit(pid: i32) {
    // SAFETY: plain syscall with integer arguments.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as i32;
    if fd < 0 {
        assert_eq!(errno(), libc::ESRCH, "pidfd_open({pid})");
        return;
    }
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut pfd, 1, 30_000) };
    // SAFETY: fd is ours.
    unsafe { libc::close(fd) };
    assert_eq!(n, 1, "process {pid} did not exit within 30 s");
}

/// A source tree mounted through ferry at a unique mountpoint, with its own
/// state directory. Always unmounted on drop, also when the test panics.
pub struct TestMount {
    /// Holds source/, mnt/ and state/ (and whatever else a test puts there).
    pub root: tempfile::TempDir,
    pub source: PathBuf,
    pub mnt: PathBuf,
    pub state: PathBuf,
}

impl TestMount {
    /// An empty source, mounted.
    pub fn new() -> TestMount {
        TestMount::with_source(|_| {})
    }

    /// A source filled by `fill` before the first mount, then mounted.
    pub fn with_source(fill: impl FnOnce(&Path)) -> TestMount {
        TestMount::with_source_and_options(fill, &[])
    }

    /// `with_source`, mounted with more options.
    pub fn with_source_and_options(fill: impl FnOnce(&Path), options: &[&str]) -> TestMount {
        let tm = TestMount::unmounted();
        fill(&tm.source);
        tm.mount_with(options);
        tm
    }

    /// Directories made, nothing mounted yet.
    pub fn unmounted() -> TestMount {
        let root = open_tempdir();
        let base = std::fs::canonicalize(root.path()).expect("canonical temp dir");
        let (source, mnt, state) = (base.join("source"), base.join("mnt"), base.join("state"));
        for d in [&source, &mnt] {
            std::fs::create_dir(d).expect("mkdir");
            chmod(d, 0o755);
        }
        TestMount {
            root,
            source,
            mnt,
            state,
        }
    }

    /// A sibling path inside this test's temp dir.
    pub fn path(&self, name: &str) -> PathBuf {
        self.source
            .parent()
            .expect("source has a parent")
            .join(name)
    }

    /// `mount SOURCE MNT --state STATE --background` for this test's dirs.
    pub fn mount_args(&self) -> [&OsStr; 6] {
        mount_args(&self.source, &self.mnt, &self.state)
    }

    pub fn mount(&self) {
        self.mount_with(&[]);
    }

    /// `mount`, with more options.
    pub fn mount_with(&self, extra: &[&str]) {
        let out = ferry(
            self.mount_args()
                .iter()
                .copied()
                .chain(extra.iter().map(OsStr::new)),
        );
        assert!(out.ok(), "ferry mount failed: {out:#?}");
        let found = mounts_at(&self.mnt);
        assert!(
            found.iter().any(|(t, _)| t.starts_with("fuse")),
            "ferry mount returned 0 but {} is not a FUSE mount: {found:?}",
            self.mnt.display()
        );
    }

    pub fn umount(&self) {
        let out = ferry([OsStr::new("umount"), self.mnt.as_os_str()]);
        assert!(out.ok(), "ferry umount failed: {out:#?}");
        assert!(
            !is_mountpoint(&self.mnt),
            "{} still mounted after ferry umount",
            self.mnt.display()
        );
    }

    /// The mount process, from `state/mount.pid`.
    pub fn pid(&self) -> i32 {
        let text = std::fs::read_to_string(self.state.join("mount.pid")).expect("read mount.pid");
        text.lines()
            .next()
            .and_then(|l| l.trim().parse().ok())
            .unwrap_or_else(|| panic!("bad mount.pid: {text:?}"))
    }

    /// kill -9 the mount process, wait until it is gone, and detach the dead
    /// mount with `umount -l`.
    pub fn kill9(&self) {
        let pid = self.pid();
        // SAFETY: signalling the mount process this test started.
        assert_eq!(
            unsafe { libc::kill(pid, libc::SIGKILL) },
            0,
            "kill -9 {pid}"
        );
        wait_for_exit(pid);
        let out = run(Command::new("umount").arg("-l").arg(&self.mnt));
        assert!(out.ok(), "umount -l of the dead mount failed: {out:#?}");
        assert!(!is_mountpoint(&self.mnt));
    }

    /// Every record (`--all`: with the first scan's inventory), read from the
    /// state directory.
    pub fn log(&self, all: bool) -> Vec<Value> {
        let mut args = vec![
            OsStr::new("log"),
            OsStr::new("--state"),
            self.state.as_os_str(),
            OsStr::new("--json"),
        ];
        if all {
            args.push(OsStr::new("--all"));
        }
        parse_json_lines(&ferry(args).expect_ok("ferry log").stdout)
    }

    /// The records as read through the mountpoint, while mounted.
    pub fn log_via_mount(&self) -> Vec<Value> {
        let out = ferry([
            OsStr::new("log"),
            self.mnt.as_os_str(),
            OsStr::new("--json"),
        ])
        .expect_ok("ferry log MOUNTPOINT");
        parse_json_lines(&out.stdout)
    }

    pub fn status(&self) -> Value {
        let out = ferry([
            OsStr::new("status"),
            self.mnt.as_os_str(),
            OsStr::new("--json"),
        ])
        .expect_ok("ferry status");
        serde_json::from_str(out.stdout.trim())
            .unwrap_or_else(|e| panic!("status is not JSON ({e}): {}", out.stdout))
    }
}

impl Drop for TestMount {
    fn drop(&mut self) {
        if !is_mountpoint(&self.mnt) {
            return;
        }
        let pid = std::fs::read_to_string(self.state.join("mount.pid"))
            .ok()
            .and_then(|t| t.lines().next().and_then(|l| l.trim().parse::<i32>().ok()));
        let _ = run(&mut ferry_cmd([OsStr::new("umount"), self.mnt.as_os_str()]));
        if is_mountpoint(&self.mnt) {
            let _ = run(Command::new("umount").arg("-l").arg(&self.mnt));
            // The mount process this test started must not outlive it: the
            // one in mount.pid, or any `ferry mount` naming this test's
            // unique mountpoint.
            let mut pids: Vec<i32> = pid.into_iter().collect();
            pids.extend(ferry_mount_pids(&self.mnt));
            for pid in pids {
                if !process_gone(pid) {
                    // SAFETY: signalling a mount process this test started.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
    }
}

/// Processes running `ferry mount ... MOUNTPOINT ...` for this mountpoint.
pub fn ferry_mount_pids(mnt: &Path) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let is_ferry = args.first().is_some_and(|a| a.ends_with(b"ferry"));
        if is_ferry
            && args.get(1) == Some(&&b"mount"[..])
            && args.iter().any(|a| *a == mnt.as_os_str().as_bytes())
        {
            out.push(pid);
        }
    }
    out
}

/// One JSON value per non-empty line.
pub fn parse_json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
        .collect()
}

/// Small accessors for records.
pub trait RecordExt {
    fn op(&self) -> &str;
    fn seq(&self) -> u64;
    fn id(&self) -> Option<u64>;
    fn str_field(&self, key: &str) -> Option<&str>;
    fn ranges(&self) -> Vec<(u64, u64)>;
}

impl RecordExt for Value {
    fn op(&self) -> &str {
        self.get("op").and_then(Value::as_str).unwrap_or("")
    }
    fn seq(&self) -> u64 {
        self.get("seq")
            .and_then(Value::as_u64)
            .unwrap_or_else(|| panic!("record without seq: {self}"))
    }
    fn id(&self) -> Option<u64> {
        self.get("id").and_then(Value::as_u64)
    }
    fn str_field(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(Value::as_str)
    }
    fn ranges(&self) -> Vec<(u64, u64)> {
        self.get("ranges")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|r| Some((r.get(0)?.as_u64()?, r.get(1)?.as_u64()?)))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Content record kinds: they say a file's bytes changed.
pub const CONTENT_OPS: &[&str] = &["create", "dirty", "write", "rewritten", "truncate"];

/// The namespace as the journal describes it: relative path -> FileId,
/// replayed from `exists`/`create`/`link`/`unlink`/`rmdir`/`rename` records.
/// Errors name the first record that does not fit the model.
pub fn replay_namespace(records: &[Value]) -> Result<BTreeMap<String, u64>, String> {
    let mut model: BTreeMap<String, u64> = BTreeMap::new();
    let under = |p: &str, dir: &str| {
        p.len() > dir.len() && p.starts_with(dir) && p.as_bytes()[dir.len()] == b'/'
    };
    for r in records {
        let path = r
            .str_field("path")
            .unwrap_or("")
            .trim_start_matches('/')
            .to_string();
        let id = r.id();
        match r.op() {
            "exists" | "create" | "link" => {
                let id = id.ok_or_else(|| format!("record without id: {r}"))?;
                if path.is_empty() {
                    continue; // the root itself
                }
                if let Some(old) = model.insert(path.clone(), id) {
                    return Err(format!(
                        "{r}: {path} already named file {old} in the journal"
                    ));
                }
            }
            "unlink" | "rmdir" => {
                match model.remove(&path) {
                    Some(old) if Some(old) == id => {}
                    other => return Err(format!("{r}: the journal had {other:?} at {path}")),
                }
                if r.op() == "rmdir" && model.keys().any(|p| under(p, &path)) {
                    return Err(format!(
                        "{r}: rmdir of a directory that still has entries in the journal"
                    ));
                }
            }
            "rename" => {
                let from = r
                    .str_field("from")
                    .unwrap_or("")
                    .trim_start_matches('/')
                    .to_string();
                let to = r
                    .str_field("to")
                    .unwrap_or("")
                    .trim_start_matches('/')
                    .to_string();
                let mode = r.str_field("mode").unwrap_or("replace");
                if model.get(&from).copied() != id {
                    return Err(format!(
                        "{r}: the journal had {:?} at {from}",
                        model.get(&from)
                    ));
                }
                let take = |m: &mut BTreeMap<String, u64>, root: &str| -> Vec<(String, u64)> {
                    let keys: Vec<String> = m
                        .keys()
                        .filter(|p| *p == root || under(p, root))
                        .cloned()
                        .collect();
                    keys.into_iter()
                        .map(|k| {
                            let v = m.remove(&k).expect("key just listed");
                            (k[root.len()..].to_string(), v)
                        })
                        .collect()
                };
                let moving = take(&mut model, &from);
                let displaced = take(&mut model, &to);
                match mode {
                    "exchange" => {
                        if displaced.is_empty() {
                            return Err(format!("{r}: exchange with nothing at {to}"));
                        }
                        for (suffix, v) in displaced {
                            model.insert(format!("{from}{suffix}"), v);
                        }
                    }
                    "noreplace" if !displaced.is_empty() => {
                        return Err(format!(
                            "{r}: noreplace rename over {to}, which the journal had"
                        ));
                    }
                    _ => {
                        if displaced.iter().any(|(s, _)| !s.is_empty()) {
                            return Err(format!("{r}: rename over a non-empty directory {to}"));
                        }
                        let replaced = r.get("replaced").and_then(Value::as_u64);
                        let lost = displaced.first().map(|(_, v)| *v);
                        if lost != replaced && lost != id {
                            return Err(format!(
                                "{r}: replaced {replaced:?}, but the journal had {lost:?} at {to}"
                            ));
                        }
                    }
                }
                for (suffix, v) in moving {
                    model.insert(format!("{to}{suffix}"), v);
                }
            }
            _ => {}
        }
    }
    Ok(model)
}

/// Every entry below `root` (not `root` itself), by relative path, with
/// its lstat result; directories are walked without following symlinks.
pub fn walk(root: &Path) -> BTreeMap<String, std::fs::Metadata> {
    let mut out = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        let entries =
            std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()));
        for entry in entries {
            let entry = entry.expect("dir entry");
            let rel = rel.join(entry.file_name());
            let md = std::fs::symlink_metadata(root.join(&rel)).expect("lstat");
            if md.is_dir() {
                stack.push(rel.clone());
            }
            out.insert(rel.to_string_lossy().into_owned(), md);
        }
    }
    out
}

/// Checks that the journal's namespace equals the tree at `root`: the same
/// paths, and two paths share a FileId iff they are one inode.
pub fn check_namespace(model: &BTreeMap<String, u64>, root: &Path) -> Result<(), String> {
    let tree = walk(root);
    let tree_paths: Vec<&String> = tree.keys().collect();
    let model_paths: Vec<&String> = model.keys().collect();
    if tree_paths != model_paths {
        let missing: Vec<_> = tree.keys().filter(|p| !model.contains_key(*p)).collect();
        let extra: Vec<_> = model.keys().filter(|p| !tree.contains_key(*p)).collect();
        return Err(format!(
            "journal namespace differs from the tree: not in the journal {missing:?}, only in the journal {extra:?}"
        ));
    }
    let paths: Vec<&String> = tree.keys().collect();
    for (i, a) in paths.iter().enumerate() {
        for b in &paths[i + 1..] {
            let same_inode = tree[*a].ino() == tree[*b].ino() && tree[*a].dev() == tree[*b].dev();
            let same_id = model[*a] == model[*b];
            if same_inode != same_id {
                return Err(format!(
                    "{a} and {b}: same inode {same_inode} but same FileId {same_id} (ids {} and {})",
                    model[*a], model[*b]
                ));
            }
        }
    }
    Ok(())
}

/// A small deterministic generator for workloads (xorshift64*).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The arguments of a background `ferry mount`.
pub fn mount_args<'a>(source: &'a Path, mnt: &'a Path, state: &'a Path) -> [&'a OsStr; 6] {
    [
        OsStr::new("mount"),
        source.as_os_str(),
        mnt.as_os_str(),
        OsStr::new("--state"),
        state.as_os_str(),
        OsStr::new("--background"),
    ]
}

/// Debian's interpreter, reachable by any user (a per-user install under
/// /root is not), for operations run as an unprivileged user.
pub const PYTHON: &str = "/usr/bin/python3";

/// The JSON fields `ferry push --json` promises (issue 3).
pub const PUSH_REPORT_FIELDS: &[&str] = &[
    "from_seq",
    "to_seq",
    "files_created",
    "files_removed",
    "renames",
    "content_bytes_read",
    "bytes_sent",
    "delta_files",
    "full_files",
    "commit_window_us",
    "elapsed_ms",
];
