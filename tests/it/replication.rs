//! Replication judged from outside: after every `ferry push`, `ferry verify`
//! finds the replica equal to the source and so does `rsync -aHAXc
//! --dry-run --itemize-changes --delete`.

use std::ffi::OsStr;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use serde_json::Value;

use crate::ops::{apply, op, populate};
use crate::util::{TestMount, ferry, run};

/// A mount and a replica directory beside it.
pub(crate) struct Pair {
    pub tm: TestMount,
    pub replica: PathBuf,
}

impl Pair {
    pub fn new(fill: impl FnOnce(&Path)) -> Pair {
        let tm = TestMount::with_source(fill);
        let replica = tm.path("replica");
        std::fs::create_dir(&replica).expect("mkdir replica");
        Pair { tm, replica }
    }

    /// `ferry push MNT REPLICA --json`: the report.
    pub fn push(&self) -> Value {
        self.push_to(self.replica.as_os_str(), &[])
    }

    /// `ferry push MNT DESTINATION EXTRA... --json`: the report.
    pub fn push_to(&self, destination: &OsStr, extra: &[&OsStr]) -> Value {
        let mut args = vec![OsStr::new("push"), self.tm.mnt.as_os_str(), destination];
        args.extend_from_slice(extra);
        args.push(OsStr::new("--json"));
        let out = ferry(args);
        assert!(out.ok(), "ferry push failed: {out:#?}");
        let v: Value = serde_json::from_str(out.stdout.trim())
            .unwrap_or_else(|e| panic!("push --json is not one JSON object ({e}): {out:#?}"));
        for f in crate::util::PUSH_REPORT_FIELDS {
            assert!(v[f].is_u64(), "push --json lacks {f}: {v}");
        }
        v
    }

    /// Both judges agree the replica equals the source.
    pub fn converged(&self) -> Result<(), String> {
        self.converged_at(&self.replica)
    }

    /// Both judges agree `replica` equals the source.
    pub fn converged_at(&self, replica: &Path) -> Result<(), String> {
        let out = ferry([
            OsStr::new("verify"),
            self.tm.source.as_os_str(),
            replica.as_os_str(),
        ]);
        if !out.ok() {
            return Err(format!("ferry verify: {}{}", out.stdout, out.stderr));
        }
        let out = run(Command::new("rsync")
            .args(["-aHAXc", "--dry-run", "--itemize-changes", "--delete"])
            .arg(format!("{}/", self.tm.source.display()))
            .arg(format!("{}/", replica.display())));
        if !out.ok() || !out.stdout.trim().is_empty() {
            return Err(format!(
                "rsync sees differences:\n{}{}",
                out.stdout, out.stderr
            ));
        }
        Ok(())
    }
}

#[test]
fn the_progress_bar_ends_with_every_file_and_byte_counted() {
    let pair = Pair::new(fill_many);
    let out = ferry([
        OsStr::new("push"),
        pair.tm.mnt.as_os_str(),
        pair.replica.as_os_str(),
        OsStr::new("--progress"),
    ]);
    assert!(out.ok(), "{out:#?}");
    // fill_many: 18 directories of 30 files, and two large files.
    let files = 18 * 30 + 2;
    let last = out.stderr.rsplit('\r').next().unwrap_or_default();
    assert!(
        last.contains("100%") && last.contains(&format!("{files}/{files} files")),
        "the bar ends at {last:?}"
    );
    pair.converged().unwrap();
}

pub(crate) fn u(v: &Value, f: &str) -> u64 {
    v[f].as_u64().unwrap_or_else(|| panic!("{f} in {v}"))
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 24,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// Random operations through the mount with pushes at random points:
    /// every push converges.
    #[test]
    fn random_workloads_converge(ops in prop::collection::vec((op(), prop::bool::weighted(0.15)), 1..40)) {
        let pair = Pair::new(populate);
        pair.push();
        pair.converged().map_err(TestCaseError::fail)?;
        let mut pushed = 0;
        for (i, (op, push_after)) in ops.iter().enumerate() {
            let _ = apply(&pair.tm.mnt, op);
            if *push_after {
                pair.push();
                pushed += 1;
                pair.converged().map_err(|e| TestCaseError::fail(format!("after op {i} ({op:?}), push {pushed}: {e}")))?;
            }
        }
        pair.push();
        pair.converged().map_err(|e| TestCaseError::fail(format!("final push: {e}")))?;
        let again = pair.push();
        prop_assert_eq!(u(&again, "bytes_sent"), 0, "a second push had work: {}", again);
    }
}

/// `n` varied bytes.
pub(crate) fn big(n: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn small_changes_send_little() {
    let pair = Pair::new(|s| {
        std::fs::write(s.join("big"), big(16 << 20)).unwrap();
        std::fs::write(s.join("doc"), big(4 << 20)).unwrap();
        std::fs::create_dir(s.join("dir")).unwrap();
        for i in 0..200 {
            std::fs::write(s.join(format!("dir/f{i}")), format!("file {i}")).unwrap();
        }
    });
    let seed = pair.push();
    assert_eq!(u(&seed, "from_seq"), 0);
    assert!(u(&seed, "files_created") >= 203, "{seed}");
    pair.converged().unwrap();

    // A 4 KiB write in the middle of the big file: one 16 KiB leaf (or two).
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(pair.tm.mnt.join("big"))
        .unwrap();
    f.write_all_at(&[7u8; 4096], (8 << 20) + 123).unwrap();
    drop(f);
    let v = pair.push();
    assert_eq!(u(&v, "full_files") + u(&v, "delta_files"), 0, "{v}");
    assert!(
        u(&v, "bytes_sent") < 40_000,
        "a 4 KiB edit sent {} bytes",
        u(&v, "bytes_sent")
    );
    assert!(u(&v, "content_bytes_read") <= 32 << 10, "{v}");
    pair.converged().unwrap();

    // A directory of 200 files moved: one rename, no content.
    std::fs::rename(pair.tm.mnt.join("dir"), pair.tm.mnt.join("moved")).unwrap();
    let v = pair.push();
    assert_eq!(u(&v, "renames"), 1, "{v}");
    assert_eq!(u(&v, "content_bytes_read"), 0, "{v}");
    assert!(u(&v, "bytes_sent") < 4096, "{v}");
    pair.converged().unwrap();

    // The editor save: a new file with a small change renamed over the old.
    let mut d = std::fs::read(pair.tm.mnt.join("doc")).unwrap();
    d.splice(1000..1000, b"inserted".iter().copied());
    std::fs::write(pair.tm.mnt.join(".doc.swp"), &d).unwrap();
    std::fs::rename(pair.tm.mnt.join(".doc.swp"), pair.tm.mnt.join("doc")).unwrap();
    let v = pair.push();
    assert_eq!(u(&v, "delta_files"), 1, "{v}");
    assert!(u(&v, "bytes_sent") < 64 << 10, "{v}");
    pair.converged().unwrap();

    // Nothing to do.
    let v = pair.push();
    assert_eq!(u(&v, "bytes_sent"), 0, "{v}");
    assert_eq!(u(&v, "files_created") + u(&v, "renames"), 0, "{v}");
}

#[test]
fn a_replica_changed_behind_ferrys_back_is_repaired() {
    let pair = Pair::new(|s| std::fs::write(s.join("big"), big(1 << 20)).unwrap());
    pair.push();
    // Change the replica's copy, keeping its size.
    let r = std::fs::OpenOptions::new()
        .write(true)
        .open(pair.replica.join("big"))
        .unwrap();
    r.write_all_at(b"tampered", 100_000).unwrap();
    drop(r);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(pair.tm.mnt.join("big"))
        .unwrap();
    f.write_all_at(b"edit", 500_000).unwrap();
    drop(f);
    let v = pair.push();
    assert_eq!(u(&v, "repaired_files"), 1, "{v}");
    assert_eq!(u(&v, "full_files"), 1, "{v}");
    pair.converged().unwrap();
}

#[test]
fn sparse_files_stay_sparse() {
    let pair = Pair::new(|s| {
        let f = std::fs::File::create(s.join("sparse")).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(b"middle", 32 << 20).unwrap();
    });
    pair.push();
    pair.converged().unwrap();
    let md = std::fs::metadata(pair.replica.join("sparse")).unwrap();
    assert_eq!(md.len(), 64 << 20);
    assert!(
        md.blocks() * 512 < 1 << 20,
        "{} bytes allocated",
        md.blocks() * 512
    );
}

#[test]
fn pushes_while_a_writer_runs_converge_once_it_stops() {
    let pair = Pair::new(|s| std::fs::write(s.join("log"), big(256 << 10)).unwrap());
    pair.push();
    let path = pair.tm.mnt.join("log");
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                f.write_all_at(&[i as u8; 3000], (i * 7919) % (300 << 10))
                    .unwrap();
                i += 1;
            }
        });
        for _ in 0..5 {
            pair.push();
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    pair.push();
    pair.converged().unwrap();
}

/// A tree of a few hundred files in directories, and two larger files.
pub(crate) fn fill_many(s: &Path) {
    for d in 0..18 {
        let dir = s.join(format!("d{d}"));
        std::fs::create_dir(&dir).unwrap();
        for f in 0..30 {
            std::fs::write(dir.join(format!("f{f}")), format!("{d}/{f}").repeat(40)).unwrap();
        }
    }
    std::fs::write(s.join("big1"), big(3 << 20)).unwrap();
    std::fs::write(s.join("big2"), big(2 << 20)).unwrap();
}

/// Round `r`'s changes: renames, edits, new and removed files, a mode.
pub(crate) fn mutate(mnt: &Path, r: usize) {
    std::fs::rename(mnt.join(format!("d{r}")), mnt.join(format!("moved{r}"))).unwrap();
    std::fs::remove_file(mnt.join(format!("d{}/f3", r + 1))).unwrap();
    std::fs::create_dir(mnt.join(format!("new{r}"))).unwrap();
    for f in 0..20 {
        std::fs::write(
            mnt.join(format!("new{r}/n{f}")),
            format!("round {r} file {f}"),
        )
        .unwrap();
    }
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(mnt.join("big1"))
        .unwrap();
    f.write_all_at(&[r as u8; 5000], 1_000_000 + r as u64 * 70_000)
        .unwrap();
    std::fs::write(mnt.join("big2"), big((2 << 20) + r)).unwrap();
    crate::util::chmod(&mnt.join(format!("d{}/f5", r + 2)), 0o600);
}

pub(crate) fn equal(a: &Path, b: &Path) -> bool {
    ferry([OsStr::new("verify"), a.as_os_str(), b.as_os_str()]).ok()
}

/// A push killed (SIGKILL) at a random moment leaves the replica as it was
/// or, only while a commit is under way (its commit log exists), part way
/// through the commit; the next push finishes it and converges.
#[test]
fn a_push_killed_at_any_moment_rolls_forward() {
    let pair = Pair::new(fill_many);
    pair.push();
    let before = pair.tm.path("before");
    let commit_log = pair.tm.path(".replica.ferry").join("commit/log");
    let mut rng = crate::util::Rng::new(7);
    let (mut mid_commit, mut untouched, mut done) = (0, 0, 0);
    for round in 0..16 {
        mutate(&pair.tm.mnt, round);
        // cp -a keeps nanosecond times (rsync sets a directory's only when
        // the seconds differ).
        let _ = std::fs::remove_dir_all(&before);
        let copy = run(Command::new("cp").arg("-a").arg(&pair.replica).arg(&before));
        assert!(copy.ok(), "{copy:#?}");
        pair.tm.umount();
        let offline = |cmd: &mut Command| {
            cmd.arg("push")
                .arg("--state")
                .arg(&pair.tm.state)
                .arg("--source")
                .arg(&pair.tm.source)
                .arg(&pair.replica);
        };
        let mut cmd = Command::new(crate::util::ferry_bin());
        offline(&mut cmd);
        let mut child = cmd
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn ferry push");
        // The moment of the kill: the fault this test injects, not a wait
        // for anything.
        std::thread::sleep(std::time::Duration::from_millis(rng.below(50)));
        let _ = child.kill();
        let _ = child.wait();
        if commit_log.exists() {
            mid_commit += 1;
        } else if equal(&before, &pair.replica) {
            untouched += 1;
        } else {
            let diff = |a: &Path| {
                let o = ferry([
                    OsStr::new("verify"),
                    a.as_os_str(),
                    pair.replica.as_os_str(),
                ]);
                o.stdout
            };
            assert!(
                equal(&pair.tm.source, &pair.replica),
                "round {round}: killed outside a commit, the replica is neither as before ({}) nor as the source ({})",
                diff(&before),
                diff(&pair.tm.source)
            );
            done += 1;
        }
        let mut cmd = Command::new(crate::util::ferry_bin());
        offline(&mut cmd);
        let out = run(&mut cmd);
        assert!(
            out.ok(),
            "round {round}: the push after the kill failed: {out:#?}"
        );
        pair.converged()
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        pair.tm.mount();
    }
    eprintln!("killed: {mid_commit} mid-commit, {untouched} before it, {done} after it");
}

/// A replica directory removed and made again is not taken for the old one
/// (whose state is still beside it): the push says so instead of finding
/// nothing to do.
#[test]
fn a_replica_made_again_is_not_taken_for_the_old_one() {
    let pair = Pair::new(|s| std::fs::write(s.join("a"), b"a").unwrap());
    pair.push();
    std::fs::remove_dir_all(&pair.replica).unwrap();
    std::fs::create_dir(&pair.replica).unwrap();
    let out = ferry([
        OsStr::new("push"),
        pair.tm.mnt.as_os_str(),
        pair.replica.as_os_str(),
    ]);
    assert!(!out.ok(), "{out:#?}");
    assert!(
        out.stderr.contains("remove") && out.stderr.contains(".replica.ferry"),
        "{out:#?}"
    );
    std::fs::remove_dir_all(pair.tm.path(".replica.ferry")).unwrap();
    pair.push();
    pair.converged().unwrap();
}
