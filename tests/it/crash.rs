//! kill -9 of the mount process during a write-heavy workload: the next
//! mount recovers, and every file changed before the kill is named in the
//! journal. The kill point is a number of workload operations drawn from a
//! seeded generator, so every round is reproducible.

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::Path;

use serde_json::Value;

use crate::util::{
    CONTENT_OPS, RecordExt, Rng, TestMount, check_namespace, replay_namespace, walk,
};

/// Regular files by inode: (a path, content hash).
fn snapshot(root: &Path) -> BTreeMap<u64, (String, u64)> {
    walk(root)
        .into_iter()
        .filter(|(_, md)| md.is_file())
        .map(|(p, md)| {
            let data = std::fs::read(root.join(&p)).expect("read source file");
            let mut h = std::hash::DefaultHasher::new();
            data.hash(&mut h);
            (md.ino(), (p, h.finish()))
        })
        .collect()
}

/// A write-heavy workload through the mount, holding some files open.
struct Workload<'a> {
    mnt: &'a Path,
    files: Vec<String>,
    open: Vec<std::fs::File>,
    created: u64,
    round: u64,
    /// What ran, for the failure message.
    trace: Vec<String>,
}

impl<'a> Workload<'a> {
    fn pick(&self, rng: &mut Rng) -> Option<String> {
        (!self.files.is_empty())
            .then(|| self.files[rng.below(self.files.len() as u64) as usize].clone())
    }

    fn data(rng: &mut Rng) -> Vec<u8> {
        let len = 1 + rng.below(9000) as usize;
        let b = rng.next() as u8;
        (0..len).map(|i| b.wrapping_add(i as u8)).collect()
    }

    fn open_existing(&mut self, rng: &mut Rng) {
        let Some(f) = self.pick(rng) else { return };
        if let Ok(file) = std::fs::OpenOptions::new()
            .write(true)
            .open(self.mnt.join(&f))
        {
            if self.open.len() >= 4 {
                self.open.remove(0);
            }
            self.open.push(file);
            self.trace.push(format!("open {f}"));
        }
    }

    /// One operation. Failures of the calls themselves are not the subject
    /// here (the differential suite checks them), so they are ignored.
    fn step(&mut self, rng: &mut Rng) {
        match rng.below(12) {
            0 => self.open_existing(rng),
            1..=3 => {
                if self.open.is_empty() {
                    self.open_existing(rng);
                }
                if !self.open.is_empty() {
                    let i = rng.below(self.open.len() as u64) as usize;
                    let off = rng.below(40_000);
                    let _ = self.open[i].write_all_at(&Self::data(rng), off);
                    self.trace.push(format!("pwrite fd{i} @{off}"));
                }
            }
            4 => {
                if !self.open.is_empty() {
                    let i = rng.below(self.open.len() as u64) as usize;
                    self.open.remove(i);
                    self.trace.push(format!("close fd{i}"));
                }
            }
            5 => {
                self.created += 1;
                let name = format!(
                    "{}n{}_{}",
                    if rng.below(2) == 0 { "" } else { "d/" },
                    self.round,
                    self.created
                );
                if let Ok(file) = std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o644)
                    .open(self.mnt.join(&name))
                {
                    let _ = file.write_all_at(&Self::data(rng), 0);
                    if rng.below(2) == 0 && self.open.len() < 4 {
                        self.open.push(file);
                    }
                    self.files.push(name.clone());
                    self.trace.push(format!("create {name}"));
                }
            }
            6 => {
                let Some(f) = self.pick(rng) else { return };
                if let Ok(file) = std::fs::OpenOptions::new()
                    .write(true)
                    .truncate(true)
                    .open(self.mnt.join(&f))
                {
                    let _ = file.write_all_at(&Self::data(rng), 0);
                    self.trace.push(format!("rewrite {f}"));
                }
            }
            7 => {
                let Some(f) = self.pick(rng) else { return };
                let size = rng.below(30_000);
                if let Ok(file) = std::fs::OpenOptions::new()
                    .write(true)
                    .open(self.mnt.join(&f))
                {
                    let _ = file.set_len(size);
                    self.trace.push(format!("truncate {f} {size}"));
                }
            }
            8 => {
                let (Some(a), Some(b)) = (self.pick(rng), self.pick(rng)) else {
                    return;
                };
                let to = if rng.below(2) == 0 {
                    b
                } else {
                    format!("{a}.r")
                };
                if a != to && std::fs::rename(self.mnt.join(&a), self.mnt.join(&to)).is_ok() {
                    self.files.retain(|f| *f != a && *f != to);
                    self.files.push(to.clone());
                    self.trace.push(format!("rename {a} {to}"));
                }
            }
            9 => {
                if !self.open.is_empty() {
                    let i = rng.below(self.open.len() as u64) as usize;
                    let _ = self.open[i].sync_all();
                    self.trace.push(format!("fsync fd{i}"));
                }
            }
            10 => {
                let Some(f) = self.pick(rng) else { return };
                if let Ok(mut file) = std::fs::OpenOptions::new()
                    .append(true)
                    .open(self.mnt.join(&f))
                {
                    use std::io::Write;
                    let _ = file.write_all(&Self::data(rng));
                    self.trace.push(format!("append {f}"));
                }
            }
            _ => {
                let Some(f) = self.pick(rng) else { return };
                if self.files.len() > 4 && std::fs::remove_file(self.mnt.join(&f)).is_ok() {
                    self.files.retain(|x| *x != f);
                    self.trace.push(format!("unlink {f}"));
                }
            }
        }
    }
}

#[test]
fn kill_9_during_writes_then_recovery_misses_no_changed_file() {
    let tm = TestMount::unmounted();
    std::fs::create_dir(tm.source.join("d")).unwrap();
    let mut files = Vec::new();
    for i in 0..12 {
        let name = if i < 8 {
            format!("f{i}")
        } else {
            format!("d/f{i}")
        };
        std::fs::write(tm.source.join(&name), vec![i as u8; 20_000]).unwrap();
        files.push(name);
    }
    let rounds: u64 = std::env::var("FERRY_IT_CRASH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(24);
    let mut last_seq = 0;
    for round in 0..rounds {
        let before = snapshot(&tm.source);
        tm.mount();
        let mut rng = Rng::new(round + 1);
        let n = rng.below(80);
        let mut w = Workload {
            mnt: &tm.mnt,
            files: files.clone(),
            open: Vec::new(),
            created: 0,
            round,
            trace: Vec::new(),
        };
        for _ in 0..n {
            w.step(&mut rng);
        }
        tm.kill9();
        files = std::mem::take(&mut w.files);
        let trace = std::mem::take(&mut w.trace);
        drop(w); // the open files close here, on the dead mount
        let after = snapshot(&tm.source);

        tm.mount(); // recovers from the unclean stop
        tm.umount();
        let records = tm.log(true);
        let ctx = || format!("round {round} (seed {}, {n} ops: {trace:?})", round + 1);

        let model = replay_namespace(&records).unwrap_or_else(|e| panic!("{}: {e}", ctx()));
        check_namespace(&model, &tm.source)
            .unwrap_or_else(|e| panic!("{}: after recovery: {e}", ctx()));

        let session: Vec<&Value> = records.iter().filter(|r| r.seq() > last_seq).collect();
        let recovered = session.iter().rfind(|r| r.op() == "mount-start");
        assert_eq!(
            recovered
                .and_then(|r| r.get("recovered"))
                .and_then(Value::as_bool),
            Some(true),
            "{}: the mount after kill -9 does not say it recovered: {session:?}",
            ctx()
        );
        for (ino, (path, hash)) in &after {
            if before.get(ino).map(|(_, h)| h) == Some(hash) {
                continue;
            }
            let id = model[path];
            // "Marked changed" means the file is dirty in the journal. Nothing
            // takes a file clean before a replica acknowledges it, so a file
            // made dirty in an earlier session (created, rewritten) is still
            // marked: any content record for it in the whole log counts. A
            // file that was clean must have one in this session.
            let named = records.iter().any(|r| {
                r.id() == Some(id)
                    && (CONTENT_OPS.contains(&r.op()) || r.str_field("origin") == Some("reconcile"))
            });
            assert!(
                named,
                "{}: {path} (FileId {id}) changed before the kill but the journal has no content, create or reconcile record for it; records since seq {last_seq}: {session:?}",
                ctx()
            );
        }
        last_seq = records.iter().map(RecordExt::seq).max().unwrap_or(last_seq);
    }
}
