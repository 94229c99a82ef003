//! Remote replicas judged from outside: pushes over a real sshd on
//! loopback, to a `ferry serve` daemon and through batch files converge
//! (`ferry verify` and rsync agree); a wrong key, a damaged batch, a gap
//! and a connection cut anywhere change nothing on a replica, and a push
//! run again after a cut does not resend what the replica made durable.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

use serde_json::Value;

use crate::replication::{Pair, big, fill_many, mutate, u};
use crate::util::{ferry, ferry_bin, run};

/// An sshd on a free loopback port, with a generated host key and one
/// authorized client key; stopped on drop.
struct Sshd {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Sshd {
    fn start() -> Sshd {
        let dir = tempfile::tempdir().unwrap();
        for key in ["host", "id"] {
            let out = run(Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(dir.path().join(key)));
            assert!(out.ok(), "ssh-keygen: {out:#?}");
        }
        let authorized = dir.path().join("authorized_keys");
        std::fs::copy(dir.path().join("id.pub"), &authorized).unwrap();
        std::fs::set_permissions(&authorized, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::create_dir_all("/run/sshd").unwrap();
        let port = free_port();
        let mut child = Command::new("/usr/sbin/sshd")
            .args(["-D", "-e", "-p", &port.to_string()])
            .args(["-o", "ListenAddress=127.0.0.1", "-h"])
            .arg(dir.path().join("host"))
            .arg("-o")
            .arg(format!("AuthorizedKeysFile={}", authorized.display()))
            .args([
                "-o",
                "PermitRootLogin=prohibit-password",
                "-o",
                "StrictModes=no",
                "-o",
                "PidFile=none",
                "-o",
                "UsePAM=no",
                "-o",
                "LogLevel=INFO",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start sshd (openssh-server, installed by scripts/setup)");
        // Ready once it says it listens; the rest of its log is drained so
        // that it never blocks on a full pipe.
        let log = wait_for_line(&mut child, "Server listening on");
        assert!(log.is_some(), "sshd did not start");
        Sshd { child, port, dir }
    }

    /// The `--ssh-command` reaching it.
    fn command(&self) -> String {
        format!(
            "ssh -p {} -i {} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null \
             -o BatchMode=yes -o LogLevel=ERROR",
            self.port,
            self.dir.path().join("id").display()
        )
    }

    /// `ferry push` arguments after the destination.
    fn args(&self) -> Vec<String> {
        vec![
            "--ssh-command".into(),
            self.command(),
            "--ferry-path".into(),
            ferry_bin().display().to_string(),
        ]
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Reads `child`'s stderr until a line containing `marker` (returned);
/// then drains the rest on a thread into the returned log.
fn wait_for_line(child: &mut Child, marker: &str) -> Option<(String, Arc<Mutex<String>>)> {
    let mut lines = BufReader::new(child.stderr.take().expect("piped stderr"));
    let log = Arc::new(Mutex::new(String::new()));
    loop {
        let mut line = String::new();
        if lines.read_line(&mut line).ok()? == 0 {
            return None;
        }
        log.lock().unwrap().push_str(&line);
        if line.contains(marker) {
            let rest = log.clone();
            std::thread::spawn(move || {
                let mut line = String::new();
                while lines.read_line(&mut line).is_ok_and(|n| n > 0) {
                    rest.lock().unwrap().push_str(&line);
                    line.clear();
                }
            });
            return Some((line, log));
        }
    }
}

fn os(args: &[String]) -> Vec<&OsStr> {
    args.iter().map(OsStr::new).collect()
}

#[test]
fn pushes_over_ssh_converge_with_renames_ranges_and_deltas() {
    let sshd = Sshd::start();
    let pair = Pair::new(fill_many);
    let dest = format!("root@127.0.0.1:{}", pair.replica.display());
    let args = sshd.args();
    let push = || pair.push_to(OsStr::new(&dest), &os(&args));

    let seed = push();
    assert_eq!(u(&seed, "from_seq"), 0);
    assert!(u(&seed, "files_created") > 500, "{seed}");
    pair.converged().unwrap();

    // A small in-place edit, a directory moved, an editor save.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(pair.tm.mnt.join("big1"))
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[9u8; 4096], 1_234_567).unwrap();
    drop(f);
    std::fs::rename(pair.tm.mnt.join("d3"), pair.tm.mnt.join("d3-moved")).unwrap();
    let mut doc = std::fs::read(pair.tm.mnt.join("big2")).unwrap();
    doc.splice(5000..5000, b"inserted by an editor".iter().copied());
    std::fs::write(pair.tm.mnt.join(".big2.swp"), &doc).unwrap();
    std::fs::rename(pair.tm.mnt.join(".big2.swp"), pair.tm.mnt.join("big2")).unwrap();
    let v = push();
    assert_eq!(u(&v, "renames"), 1, "{v}");
    assert_eq!(u(&v, "range_files"), 1, "{v}");
    assert_eq!(u(&v, "delta_files"), 1, "{v}");
    assert!(u(&v, "bytes_sent") < 128 << 10, "{v}");
    pair.converged().unwrap();

    for round in 4..7 {
        mutate(&pair.tm.mnt, round);
        push();
        pair.converged()
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
    }
    let again = push();
    assert_eq!(u(&again, "bytes_sent"), 0, "{again}");

    // From an unmounted journal too.
    mutate(&pair.tm.mnt, 8);
    pair.tm.umount();
    let mut offline = vec![
        "push".to_string(),
        "--state".into(),
        pair.tm.state.display().to_string(),
        "--source".into(),
        pair.tm.source.display().to_string(),
        dest.clone(),
        "--json".into(),
    ];
    offline.extend(args.iter().cloned());
    let out = ferry(os(&offline));
    assert!(out.ok(), "{out:#?}");
    pair.converged().unwrap();
}

/// An "ssh" that notes each start (its pid, one line per connection in
/// `starts`) and then becomes `ssh` with `args`.
fn counting_ssh(dir: &Path, sshd: &Sshd) -> (String, PathBuf) {
    let starts = dir.join("ssh-starts");
    let script = dir.join("counting-ssh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho $$ >> {}\nexec {} \"$@\"\n",
            starts.display(),
            sshd.command()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    (script.display().to_string(), starts)
}

fn starts(file: &Path) -> Vec<i32> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect()
}

#[test]
fn a_live_mount_keeps_its_ssh_connection_for_the_next_push() {
    let sshd = Sshd::start();
    let pair = Pair::new(fill_many);
    let tmp = tempfile::tempdir().unwrap();
    let (ssh, started) = counting_ssh(tmp.path(), &sshd);
    let dest = format!("root@127.0.0.1:{}", pair.replica.display());
    let push = |extra: &[&str]| {
        let mut args = vec!["--ssh-command", ssh.as_str(), "--ferry-path"];
        let bin = ferry_bin().display().to_string();
        args.push(&bin);
        args.extend(extra);
        pair.push_to(
            OsStr::new(&dest),
            &args.iter().map(OsStr::new).collect::<Vec<_>>(),
        )
    };
    let reused = |v: &Value| v["reused_connection"].as_bool().unwrap();

    // The seed opens a connection; the mount keeps it (the command has
    // returned, its output read to the end, while ssh still runs).
    let seed = push(&[]);
    assert!(!reused(&seed));
    assert_eq!(starts(&started).len(), 1);
    // The next pushes go through it: no new ssh.
    for round in 1..3 {
        mutate(&pair.tm.mnt, round);
        let v = push(&[]);
        assert!(reused(&v), "round {round}: {v}");
        pair.converged()
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
    }
    assert_eq!(
        starts(&started).len(),
        1,
        "a kept connection was not reused"
    );

    // Its ssh dies: the next push finds the kept connection broken and
    // opens a new one.
    let pid = starts(&started)[0];
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    mutate(&pair.tm.mnt, 3);
    let v = push(&[]);
    assert!(!reused(&v), "{v}");
    assert_eq!(starts(&started).len(), 2);
    pair.converged().unwrap();

    // --keep-connection 0: a new connection each time, closed at the end.
    for round in 4..6 {
        mutate(&pair.tm.mnt, round);
        assert!(!reused(&push(&["--keep-connection", "0"])));
    }
    assert_eq!(starts(&started).len(), 4);
    pair.converged().unwrap();
}

#[test]
fn a_receiver_that_cannot_be_reached_or_is_not_ferry_is_reported() {
    let pair = Pair::new(|s| std::fs::write(s.join("f"), b"x").unwrap());
    let dest = format!("nohost:{}", pair.replica.display());
    // An "ssh" that runs something else than ferry receive.
    let out = ferry([
        OsStr::new("push"),
        pair.tm.mnt.as_os_str(),
        OsStr::new(&dest),
        OsStr::new("--ssh-command"),
        OsStr::new("sh -c 'echo Welcome to the machine' ignored"),
    ]);
    assert!(!out.ok());
    assert!(out.stderr.contains("not `ferry receive`"), "{out:#?}");
    // An "ssh" that fails.
    let out = ferry([
        OsStr::new("push"),
        pair.tm.mnt.as_os_str(),
        OsStr::new(&dest),
        OsStr::new("--ssh-command"),
        OsStr::new("false"),
    ]);
    assert!(!out.ok());
    assert!(out.stderr.contains("ssh ended with"), "{out:#?}");
    assert_eq!(std::fs::read_dir(&pair.replica).unwrap().count(), 0);
}

/// A `ferry serve` on a free loopback port; stopped on drop.
struct Daemon {
    child: Child,
    address: String,
}

impl Daemon {
    fn start(root: &Path, key: &Path) -> Daemon {
        let mut child = Command::new(ferry_bin())
            .args(["serve", "--listen", "127.0.0.1:0", "--root"])
            .arg(root)
            .arg("--key-file")
            .arg(key)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start ferry serve");
        // Its log keeps being drained (it must never block on a full pipe).
        let (line, _log) = wait_for_line(&mut child, "serving").expect("the daemon did not start");
        let address = line
            .trim()
            .rsplit(' ')
            .next()
            .expect("the address ends the line")
            .to_string();
        Daemon { child, address }
    }

    fn url(&self, name: &str) -> String {
        format!("ferry://{}/{name}", self.address)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn write_key(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

#[test]
fn the_daemon_refuses_a_wrong_key_and_serves_two_pushes_at_once() {
    let a = Pair::new(fill_many);
    let b = Pair::new(|s| {
        std::fs::write(s.join("one"), big(3 << 20)).unwrap();
        std::fs::create_dir(s.join("sub")).unwrap();
        std::fs::write(s.join("sub/two"), b"two").unwrap();
    });
    let root = a.tm.path("daemon-root");
    let key = a.tm.path("key");
    let wrong = a.tm.path("wrong");
    write_key(&key, "c2VjcmV0IGtleSBmb3IgdGhlIGRhZW1vbiB0ZXN0Cg==\n");
    write_key(&wrong, "YW5vdGhlciBrZXksIG5vdCB0aGUgZGFlbW9uJ3MK\n");
    let daemon = Daemon::start(&root, &key);

    let url_a = daemon.url("a");
    for (keyfile, what) in [(Some(&wrong), "refused"), (None, "--key-file")] {
        let mut args = vec![OsStr::new("push"), a.tm.mnt.as_os_str(), OsStr::new(&url_a)];
        if let Some(k) = keyfile {
            args.extend([OsStr::new("--key-file"), k.as_os_str()]);
        }
        let out = ferry(args);
        assert!(!out.ok(), "a push without the key went through: {out:#?}");
        assert!(out.stderr.contains(what), "{out:#?}");
    }
    assert_eq!(
        std::fs::read_dir(&root).unwrap().count(),
        0,
        "a refused push left something under the daemon's root"
    );

    // Two pushes at once, to two replicas.
    let key_args = [OsStr::new("--key-file"), key.as_os_str()];
    let url_b = daemon.url("b");
    std::thread::scope(|s| {
        s.spawn(|| a.push_to(OsStr::new(&url_a), &key_args));
        s.spawn(|| b.push_to(OsStr::new(&url_b), &key_args));
    });
    a.converged_at(&root.join("a")).unwrap();
    b.converged_at(&root.join("b")).unwrap();

    mutate(&a.tm.mnt, 2);
    let v = a.push_to(OsStr::new(&url_a), &key_args);
    assert!(u(&v, "renames") >= 1, "{v}");
    a.converged_at(&root.join("a")).unwrap();
    // A name that would leave the root is refused.
    let out = ferry([
        OsStr::new("push"),
        a.tm.mnt.as_os_str(),
        OsStr::new(&daemon.url("..")),
        OsStr::new("--key-file"),
        key.as_os_str(),
    ]);
    assert!(
        !out.ok() && out.stderr.contains("not a replica name"),
        "{out:#?}"
    );
}

/// Names, sizes, modes and mtimes of everything under `root` (and beside
/// it nothing: the replica's state is not part of what readers see).
fn snapshot(root: &Path) -> Vec<(PathBuf, u64, u32, i64)> {
    use std::os::unix::fs::MetadataExt;
    crate::util::walk(root)
        .into_iter()
        .map(|(p, m)| (PathBuf::from(p), m.len(), m.mode(), m.mtime_nsec()))
        .collect()
}

fn apply(batches: &[&Path], replica: &Path) -> crate::util::Output {
    let mut args = vec![OsStr::new("apply")];
    args.extend(batches.iter().map(|b| b.as_os_str()));
    args.extend([OsStr::new("--replica"), replica.as_os_str()]);
    ferry(args)
}

#[test]
fn batch_files_apply_in_sequence_and_refuse_gaps_other_streams_and_damage() {
    let pair = Pair::new(fill_many);
    let dir = pair.tm.path("batches");
    let mut files: Vec<PathBuf> = Vec::new();
    for round in 0..3 {
        if round > 0 {
            mutate(&pair.tm.mnt, round);
        }
        let out = ferry([
            OsStr::new("push"),
            pair.tm.mnt.as_os_str(),
            OsStr::new("--batch-dir"),
            dir.as_os_str(),
            OsStr::new("--json"),
        ]);
        assert!(out.ok(), "{out:#?}");
        let v: Value = serde_json::from_str(out.stdout.trim()).unwrap();
        files.push(PathBuf::from(
            v["batch_file"].as_str().expect("a batch file"),
        ));
    }
    // Nothing changed: no file.
    let out = ferry([
        OsStr::new("push"),
        pair.tm.mnt.as_os_str(),
        OsStr::new("--batch-dir"),
        dir.as_os_str(),
        OsStr::new("--json"),
    ]);
    let v: Value = serde_json::from_str(out.stdout.trim()).unwrap();
    assert!(v.get("batch_file").is_none(), "{v}");
    let mut listed: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    listed.sort();
    assert_eq!(listed, files, "ls does not list the batches in order");

    // A gap: the first batch missing. Refused, nothing changed.
    let replica = pair.replica.clone();
    let before = snapshot(&replica);
    let out = apply(&[&files[1], &files[2]], &replica);
    assert!(!out.ok());
    assert!(out.stderr.contains("seq 0 is missing"), "{out:#?}");
    assert_eq!(snapshot(&replica), before);

    // Damage anywhere in the first batch: refused, nothing changed.
    let good = std::fs::read(&files[0]).unwrap();
    let bad = pair.tm.path("bad.ferry");
    let mut rng = crate::util::Rng::new(11);
    let mut positions: Vec<usize> = (0..48)
        .map(|_| rng.below(good.len() as u64) as usize)
        .collect();
    positions.extend([
        0,
        8,
        12,
        13,
        17,
        good.len() / 2,
        good.len() - 40,
        good.len() - 1,
    ]);
    for pos in positions {
        let mut b = good.clone();
        b[pos] ^= 0x20;
        std::fs::write(&bad, &b).unwrap();
        let out = apply(&[&bad], &replica);
        assert!(!out.ok(), "byte {pos} flipped was applied");
        assert_eq!(
            snapshot(&replica),
            before,
            "byte {pos} flipped changed the replica"
        );
    }
    for cut in [1, 12, 100, good.len() / 3, good.len() - 1] {
        std::fs::write(&bad, &good[..cut]).unwrap();
        let out = apply(&[&bad], &replica);
        assert!(!out.ok(), "a batch cut at {cut} was applied");
        assert_eq!(snapshot(&replica), before);
    }

    // Out of order in one command: applied in sequence.
    let out = apply(&[&files[2], &files[0], &files[1]], &replica);
    assert!(out.ok(), "{out:#?}");
    pair.converged().unwrap();
    // Again: every batch is skipped.
    let out = apply(&[&files[0], &files[1], &files[2]], &replica);
    assert!(out.ok(), "{out:#?}");
    assert_eq!(out.stdout.matches("already applied").count(), 3, "{out:#?}");
    pair.converged().unwrap();

    // A batch of another directory's stream is refused.
    mutate(&pair.tm.mnt, 5);
    let other = pair.tm.path("other-batches");
    let out = ferry([
        OsStr::new("push"),
        pair.tm.mnt.as_os_str(),
        OsStr::new("--batch-dir"),
        other.as_os_str(),
    ]);
    assert!(out.ok(), "{out:#?}");
    let other_file = std::fs::read_dir(&other)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let before = snapshot(&replica);
    let out = apply(&[&other_file], &replica);
    assert!(!out.ok(), "{out:#?}");
    assert_eq!(snapshot(&replica), before);
}

/// `sh` with an "ssh" that runs the remote command here, its input cut
/// after `limit` bytes: the connection dropping at that point of a push.
fn cut_ssh(dir: &Path, limit: Option<u64>) -> String {
    let script = dir.join("cut-ssh");
    // Arguments: the host, then the remote command line.
    // Passes `limit` bytes on as they come (head's stdio would hold them
    // back, dd counts blocks).
    std::fs::write(
        &script,
        r#"#!/bin/sh
limit=$1
shift 2
if [ "$limit" = all ]; then exec sh -c "$1"; fi
/usr/bin/python3 -c '
import os, sys
n = int(sys.argv[1])
while n > 0:
    b = os.read(0, min(n, 65536))
    if not b:
        break
    while b:
        k = os.write(1, b)
        n -= k
        b = b[k:]
' "$limit" | sh -c "$1"
"#,
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    format!(
        "{} {}",
        script.display(),
        limit.map_or("all".to_string(), |l| l.to_string())
    )
}

/// Bytes of content the replica kept from cut-off pushes.
fn kept_bytes(pair: &Pair) -> u64 {
    let kept = pair.tm.path(".replica.ferry").join("kept");
    std::fs::read_dir(kept)
        .map(|d| d.map(|e| e.unwrap().metadata().unwrap().len()).sum())
        .unwrap_or(0)
}

#[test]
fn a_push_cut_off_anywhere_resumes_without_resending_durable_work() {
    const FILE: u64 = 512 << 10;
    let pair = Pair::new(|s| {
        for i in 0..40 {
            // Incompressible, so that bytes sent follow the content.
            std::fs::write(s.join(format!("f{i:02}")), big(FILE as usize + i)).unwrap();
        }
    });
    let dest = format!("host:{}", pair.replica.display());
    let push = |limit: Option<u64>, extra: &[&str]| {
        let ssh = cut_ssh(&pair.tm.path(""), limit);
        let mut args = vec![
            "push".to_string(),
            pair.tm.mnt.display().to_string(),
            dest.clone(),
            "--ssh-command".into(),
            ssh,
            "--ferry-path".into(),
            ferry_bin().display().to_string(),
            "--json".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        ferry(os(&args))
    };
    let planned = push(None, &["--dry-run"]);
    assert!(planned.ok(), "{planned:#?}");
    let full = u(
        &serde_json::from_str(planned.stdout.trim()).unwrap(),
        "bytes_sent",
    );
    assert!(full > 40 * FILE, "{full}");

    // Cut at a fifth of the batch, four times: each push gets a fifth of
    // the way further (what is kept costs a few bytes to name).
    let mut kept = 0;
    for k in 1..=4 {
        let limit = full / 5;
        let out = push(Some(limit), &[]);
        assert!(!out.ok(), "a push cut at {limit} bytes succeeded: {out:#?}");
        assert_eq!(
            std::fs::read_dir(&pair.replica).unwrap().count(),
            0,
            "cut {k}: a push cut off changed the replica"
        );
        let now = kept_bytes(&pair);
        // Everything before the cut but the file it cut through is kept.
        assert!(
            now + 2 * FILE >= kept + limit,
            "cut {k}: kept {now} bytes after {kept}, with {limit} more sent"
        );
        kept = now;
    }
    // Four fifths of the batch went through, less what each cut cut through.
    assert!(kept + 4 * FILE >= full * 4 / 5, "kept {kept} of {full}");

    let done = push(None, &[]);
    assert!(done.ok(), "{done:#?}");
    let v: Value = serde_json::from_str(done.stdout.trim()).unwrap();
    assert_eq!(u(&v, "resumed_bytes"), kept, "{v}");
    assert!(
        u(&v, "bytes_sent") <= full - kept + (64 << 10),
        "resent durable work: {v} (kept {kept} of {full})"
    );
    pair.converged().unwrap();
    assert_eq!(kept_bytes(&pair), 0, "kept content outlived the commit");

    // Cut during a later push: the replica stays as the last one left it.
    mutate_files(&pair.tm.mnt);
    let out = push(Some(FILE), &[]);
    assert!(!out.ok());
    assert!(
        !crate::replication::equal(&pair.tm.source, &pair.replica),
        "the changes arrived although the push was cut"
    );
    let v = push(None, &[]);
    assert!(v.ok(), "{v:#?}");
    pair.converged().unwrap();
}

fn mutate_files(mnt: &Path) {
    for i in 0..10 {
        std::fs::write(mnt.join(format!("new{i}")), big(300_000 + i)).unwrap();
    }
    std::fs::rename(mnt.join("f00"), mnt.join("renamed")).unwrap();
}

#[test]
fn a_large_file_cut_off_in_the_middle_is_continued_not_sent_again() {
    const SIZE: u64 = 24 << 20;
    let pair = Pair::new(|s| std::fs::write(s.join("large"), big(SIZE as usize)).unwrap());
    let dest = format!("host:{}", pair.replica.display());
    let push = |limit: Option<u64>| {
        let ssh = cut_ssh(&pair.tm.path(""), limit);
        let args = [
            "push".to_string(),
            pair.tm.mnt.display().to_string(),
            dest.clone(),
            "--ssh-command".into(),
            ssh,
            "--ferry-path".into(),
            ferry_bin().display().to_string(),
            "--json".into(),
        ];
        ferry(os(&args))
    };
    let cut = push(Some(SIZE / 2));
    assert!(!cut.ok(), "{cut:#?}");
    assert_eq!(std::fs::read_dir(&pair.replica).unwrap().count(), 0);
    let done = push(None);
    assert!(done.ok(), "{done:#?}");
    let v: Value = serde_json::from_str(done.stdout.trim()).unwrap();
    // What arrived before the cut, less the piece it cut through (4 MiB).
    let resumed = u(&v, "resumed_bytes");
    assert!(resumed + (5 << 20) >= SIZE / 2, "{v}");
    assert!(u(&v, "bytes_sent") <= SIZE - resumed + (64 << 10), "{v}");
    pair.converged().unwrap();
}
