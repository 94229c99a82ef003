//! Random batches checked against a reference: each operation is generated
//! from the reference tree (so it is valid), applied to the reference
//! directly with std and nix calls, and written to a batch; the batch is
//! then applied to the replica (sometimes with a crash and a recovery), and
//! `verify` must find the two trees equal.

use std::fs;
use std::os::unix::fs::{FileExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};

use nix::fcntl::{AT_FDCWD, RenameFlags, renameat2};
use nix::sys::stat::{UtimensatFlags, utimensat};
use nix::sys::time::TimeSpec;

use super::*;
use crate::batch::{BatchHeader, BatchWriter, Content, Hash, Op, RelPath, Timestamp, WriteRange};
use crate::verify;

/// xorshift64*: deterministic, so a failing seed can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn bytes(&mut self, max: usize) -> Vec<u8> {
        let n = 1 + self.below(max);
        (0..n).map(|_| b"abcxyz\n"[self.below(7)]).collect()
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum K {
    Dir,
    File,
    Link,
}

/// Every entry of the reference tree (not the root), with its kind.
fn entries(root: &Path) -> Vec<(PathBuf, K)> {
    fn walk(root: &Path, rel: &Path, out: &mut Vec<(PathBuf, K)>) {
        let mut names: Vec<_> = fs::read_dir(root.join(rel))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        for n in names {
            let r = rel.join(n);
            let m = fs::symlink_metadata(root.join(&r)).unwrap();
            let k = if m.is_dir() {
                K::Dir
            } else if m.file_type().is_symlink() {
                K::Link
            } else {
                K::File
            };
            out.push((r.clone(), k));
            if k == K::Dir {
                walk(root, &r, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(root, Path::new(""), &mut out);
    out
}

fn rel(p: &Path) -> RelPath {
    RelPath::parse(p.as_os_str().as_encoded_bytes()).unwrap()
}

fn is_empty_dir(p: &Path) -> bool {
    fs::read_dir(p).unwrap().next().is_none()
}

/// A random path that does not exist yet, in an existing directory.
fn fresh_path(rng: &mut Rng, root: &Path, all: &[(PathBuf, K)]) -> Option<PathBuf> {
    let dirs: Vec<PathBuf> = std::iter::once(PathBuf::new())
        .chain(
            all.iter()
                .filter(|(_, k)| *k == K::Dir)
                .map(|(p, _)| p.clone()),
        )
        .collect();
    let d = &dirs[rng.below(dirs.len())];
    let p = d.join(["a", "b", "c", "d", "e"][rng.below(5)]);
    (fs::symlink_metadata(root.join(&p)).is_err()).then_some(p)
}

/// Generates one valid op, applies it to the reference, and returns it.
fn one_op(rng: &mut Rng, root: &Path) -> Option<Op> {
    let all = entries(root);
    let pick = |rng: &mut Rng, want: &dyn Fn(K) -> bool| {
        let c: Vec<_> = all.iter().filter(|(_, k)| want(*k)).collect();
        (!c.is_empty()).then(|| c[rng.below(c.len())].clone())
    };
    Some(match rng.below(13) {
        0 => {
            let p = fresh_path(rng, root, &all)?;
            fs::create_dir(root.join(&p)).unwrap();
            fs::set_permissions(root.join(&p), fs::Permissions::from_mode(0o755)).unwrap();
            Op::Mkdir {
                path: rel(&p),
                mode: 0o755,
            }
        }
        1 | 2 => {
            let p = fresh_path(rng, root, &all)?;
            let data = rng.bytes(300);
            fs::write(root.join(&p), &data).unwrap();
            fs::set_permissions(root.join(&p), fs::Permissions::from_mode(0o640)).unwrap();
            Op::CreateFile {
                path: rel(&p),
                mode: 0o640,
                result: Hash::of(&data),
                content: Content::compress_if_it_pays(&data),
            }
        }
        3 => {
            let p = fresh_path(rng, root, &all)?;
            symlink("../x", root.join(&p)).unwrap();
            Op::Symlink {
                path: rel(&p),
                target: b"../x".to_vec(),
            }
        }
        4 => {
            let (e, _) = pick(rng, &|k| k == K::File)?;
            let p = fresh_path(rng, root, &all)?;
            fs::hard_link(root.join(&e), root.join(&p)).unwrap();
            Op::Link {
                existing: rel(&e),
                new: rel(&p),
            }
        }
        5 | 6 => {
            let (from, fk) = pick(rng, &|_| true)?;
            let exchange = rng.below(4) == 0;
            let to = if exchange || rng.below(2) == 0 {
                pick(rng, &|_| true)?.0
            } else {
                fresh_path(rng, root, &all)?
            };
            if to.starts_with(&from) || (exchange && from.starts_with(&to)) || to == from {
                return None;
            }
            let tm = fs::symlink_metadata(root.join(&to)).ok();
            if !exchange && let Some(tm) = &tm {
                let ok = match (fk == K::Dir, tm.is_dir()) {
                    (true, true) => is_empty_dir(&root.join(&to)),
                    (false, false) => true,
                    _ => false,
                };
                if !ok {
                    return None;
                }
            }
            let flags = if exchange {
                RenameFlags::RENAME_EXCHANGE
            } else {
                RenameFlags::empty()
            };
            renameat2(
                AT_FDCWD,
                &root.join(&from),
                AT_FDCWD,
                &root.join(&to),
                flags,
            )
            .ok()?;
            Op::Rename {
                from: rel(&from),
                to: rel(&to),
                exchange,
            }
        }
        7 => {
            let (p, _) = pick(rng, &|k| k != K::Dir)?;
            fs::remove_file(root.join(&p)).unwrap();
            Op::Unlink { path: rel(&p) }
        }
        8 => {
            let (p, _) = pick(rng, &|k| k == K::Dir)?;
            if !is_empty_dir(&root.join(&p)) {
                return None;
            }
            fs::remove_dir(root.join(&p)).unwrap();
            Op::Rmdir { path: rel(&p) }
        }
        9 => {
            let (p, _) = pick(rng, &|k| k == K::File)?;
            let before = fs::read(root.join(&p)).unwrap();
            let offset = rng.below(before.len() + 20) as u64;
            let data = rng.bytes(40);
            let f = fs::File::options().write(true).open(root.join(&p)).unwrap();
            f.write_all_at(&data, offset).unwrap();
            let after = fs::read(root.join(&p)).unwrap();
            Op::WriteRanges {
                path: rel(&p),
                ranges: vec![WriteRange { offset, data }],
                base: Hash::of(&before),
                result: Hash::of(&after),
            }
        }
        10 => {
            let (p, _) = pick(rng, &|k| k == K::File)?;
            let size = rng.below(400) as u64;
            fs::File::options()
                .write(true)
                .open(root.join(&p))
                .unwrap()
                .set_len(size)
                .unwrap();
            Op::Truncate {
                path: rel(&p),
                size,
            }
        }
        11 => {
            let (p, _) = pick(rng, &|k| k == K::File)?;
            let before = fs::read(root.join(&p)).unwrap();
            let mut after = before.clone();
            after.extend(rng.bytes(100));
            after.drain(..after.len() / 3);
            let sig = fast_rsync::Signature::calculate(
                &before,
                fast_rsync::SignatureOptions {
                    block_size: 16,
                    crypto_hash_size: 8,
                },
            );
            let mut delta = Vec::new();
            fast_rsync::diff(&sig.index(), &after, &mut delta).unwrap();
            if rng.below(2) == 0 {
                fs::write(root.join(&p), &after).unwrap();
                return Some(Op::Delta {
                    path: rel(&p),
                    base: Hash::of(&before),
                    delta,
                    result: Hash::of(&after),
                });
            }
            // Saved as a new file renamed over the basis or to a new name.
            let q = match rng.below(2) {
                0 => p.clone(),
                _ => fresh_path(rng, root, &all)?,
            };
            let tmp = root.with_extension("saving");
            fs::write(&tmp, &after).unwrap();
            fs::set_permissions(&tmp, fs::Permissions::from_mode(0o600)).unwrap();
            fs::rename(&tmp, root.join(&q)).unwrap();
            Op::CreateFromDelta {
                path: rel(&q),
                basis: rel(&p),
                base: Hash::of(&before),
                delta,
                mode: 0o600,
                result: Hash::of(&after),
            }
        }
        _ => {
            let (p, k) = pick(rng, &|_| true)?;
            if k == K::Link {
                return None;
            }
            if rng.below(2) == 0 {
                let mode = [0o700, 0o755, 0o644, 0o2750][rng.below(4)];
                fs::set_permissions(root.join(&p), fs::Permissions::from_mode(mode)).unwrap();
                Op::Chmod {
                    path: rel(&p),
                    mode,
                }
            } else {
                let value = rng.bytes(10);
                xattr::set(root.join(&p), "user.m", &value).unwrap();
                Op::SetXattr {
                    path: rel(&p),
                    name: b"user.m".to_vec(),
                    value,
                }
            }
        }
    })
}

/// Times for every entry, on the reference and as ops.
fn stamp_all(root: &Path, salt: u64) -> Vec<Op> {
    let mut all: Vec<PathBuf> = entries(root).into_iter().map(|(p, _)| p).collect();
    all.push(PathBuf::new());
    all.iter()
        .enumerate()
        .map(|(i, p)| {
            let t = Timestamp {
                sec: 1_650_000_000 + (salt * 1000 + i as u64) as i64,
                nsec: (i as u32 * 7919) % 1_000_000_000,
            };
            let ts = TimeSpec::new(t.sec, i64::from(t.nsec));
            utimensat(
                AT_FDCWD,
                &root.join(p),
                &ts,
                &ts,
                UtimensatFlags::NoFollowSymlink,
            )
            .unwrap();
            Op::Utimes {
                path: rel(p),
                atime: t,
                mtime: t,
            }
        })
        .collect()
}

fn batch(from: u64, ops: &[Op]) -> Vec<u8> {
    let header = BatchHeader {
        source_id: [3; 16],
        from_seq: from,
        to_seq: from + 1,
        op_count: ops.len() as u64,
        content_bytes: ops.iter().map(Op::data_len).sum(),
        ..BatchHeader::default()
    };
    let mut w = BatchWriter::new(Vec::new(), header).unwrap();
    for op in ops {
        w.push(op).unwrap();
    }
    w.finish().unwrap().0
}

fn run_seed(seed: u64) {
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let dir = tempfile::tempdir().unwrap();
    let reference = dir.path().join("reference");
    let replica = dir.path().join("replica");
    fs::create_dir(&reference).unwrap();
    fs::create_dir(&replica).unwrap();
    for b in 0..3u64 {
        let mut ops = Vec::new();
        while ops.len() < 6 + rng.below(20) {
            if let Some(op) = one_op(&mut rng, &reference) {
                ops.push(op);
            }
        }
        ops.extend(stamp_all(&reference, seed * 10 + b));
        let bytes = batch(b, &ops);
        let crash = (rng.below(3) == 0).then(|| 1 + rng.below(ops.len() + 5));
        let opts = ApplyOptions {
            crash_after_step: crash,
            ..ApplyOptions::default()
        };
        match apply(&replica, bytes.as_slice(), &opts) {
            Ok(_) => {}
            Err(ApplyError::InjectedCrash(_)) => {
                recover(&replica).unwrap_or_else(|e| panic!("seed {seed} batch {b}: {e}"));
                let r = apply(&replica, bytes.as_slice(), &ApplyOptions::default());
                r.unwrap_or_else(|e| panic!("seed {seed} batch {b}: {e}"));
            }
            Err(e) => panic!("seed {seed} batch {b}: {e}\n{ops:#?}"),
        }
        let report = verify::verify(&reference, &replica, &verify::Options::default()).unwrap();
        assert!(
            report.is_equal(),
            "seed {seed} batch {b}: {:#?}\n{ops:#?}",
            report.differences
        );
    }
}

/// `FERRY_APPLY_SEEDS=N` runs seeds 1..=N (60 by default);
/// `FERRY_APPLY_SEED=S` runs only seed S.
#[test]
fn random_batches_match_the_reference() {
    let env = |name: &str| std::env::var(name).ok().and_then(|s| s.parse::<u64>().ok());
    if let Some(seed) = env("FERRY_APPLY_SEED") {
        return run_seed(seed);
    }
    for seed in 1..=env("FERRY_APPLY_SEEDS").unwrap_or(60) {
        run_seed(seed);
    }
}

/// Batches of arbitrary (mostly invalid) operations on paths from a small
/// pool: the applier must never panic, and a refused batch must leave the
/// replica exactly as it was.
#[test]
fn arbitrary_batches_are_applied_whole_or_not_at_all() {
    let pool = ["a", "b", "a/b", "a/c", "b/a", "c", "a/b/c", "d"];
    for seed in 1..=150u64 {
        let mut rng = Rng(seed.wrapping_mul(0x2545_f491_4f6c_dd1d) | 1);
        let dir = tempfile::tempdir().unwrap();
        let replica = dir.path().join("replica");
        let snapshot = dir.path().join("snapshot");
        fs::create_dir(&replica).unwrap();
        // Start from a valid random tree.
        let mut ops = Vec::new();
        while ops.len() < 8 {
            if let Some(op) = one_op(&mut rng, &snapshot_or(&snapshot)) {
                ops.push(op);
            }
        }
        ops.extend(stamp_all(&snapshot, seed));
        apply(
            &replica,
            batch(0, &ops).as_slice(),
            &ApplyOptions::default(),
        )
        .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        let mut ops = Vec::new();
        for _ in 0..1 + rng.below(6) {
            let path = rel(Path::new(pool[rng.below(pool.len())]));
            let other = rel(Path::new(pool[rng.below(pool.len())]));
            let data = rng.bytes(20);
            ops.push(match rng.below(9) {
                0 => Op::Mkdir { path, mode: 0o755 },
                1 => Op::CreateFile {
                    path,
                    mode: 0o644,
                    result: Hash::of(&data),
                    content: Content::Raw(data),
                },
                2 => Op::Rename {
                    from: path,
                    to: other,
                    exchange: rng.below(2) == 0,
                },
                3 => Op::Link {
                    existing: path,
                    new: other,
                },
                4 => Op::Unlink { path },
                5 => Op::Rmdir { path },
                6 => Op::WriteRanges {
                    path,
                    ranges: vec![WriteRange {
                        offset: rng.below(50) as u64,
                        data: data.clone(),
                    }],
                    base: Hash::of(&data),
                    result: Hash::of(b""),
                },
                7 => Op::Truncate {
                    path,
                    size: rng.below(50) as u64,
                },
                _ => Op::Chmod { path, mode: 0o700 },
            });
        }
        let before = dir.path().join("before");
        let status = std::process::Command::new("cp")
            .arg("-a")
            .arg(&replica)
            .arg(&before)
            .status()
            .unwrap();
        assert!(status.success());
        match apply(
            &replica,
            batch(1, &ops).as_slice(),
            &ApplyOptions::default(),
        ) {
            Ok(_) => {}
            Err(ApplyError::Op { .. } | ApplyError::BaseMismatch { .. }) => {
                let report =
                    verify::verify(&before, &replica, &verify::Options::default()).unwrap();
                assert!(
                    report.is_equal(),
                    "seed {seed}: a refused batch changed the replica: {:#?}\n{ops:#?}",
                    report.differences
                );
            }
            Err(e) => panic!("seed {seed}: unexpected error {e}\n{ops:#?}"),
        }
    }
}

/// Creates the snapshot directory on first use.
fn snapshot_or(p: &Path) -> PathBuf {
    if !p.exists() {
        fs::create_dir(p).unwrap();
    }
    p.to_path_buf()
}
