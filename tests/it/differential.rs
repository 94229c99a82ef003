//! Same behaviour as native, and a journal that says what happened: each
//! generated operation sequence runs on a ferry mount and on a plain
//! directory of the same filesystem; every outcome, the final trees, and
//! then the journal's records are compared.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use serde_json::Value;

use crate::ops::{self, Digest, Nobody, Op, RenameFlags, Time, apply, populate, stat_view};
use crate::util::{RecordExt, TestMount, check_namespace, replay_namespace, walk};

/// A record the journal must hold, in workload order.
#[derive(Debug, Clone)]
struct Expect {
    op: &'static str,
    path: String,
    /// (field, value) that must match too.
    detail: Option<(&'static str, String)>,
    /// For records about a file rather than a name (setattr, xattrs): the
    /// other names of the same inode, any of which the record may show.
    alts: Vec<String>,
}

/// Every name of the inode at `rel` (relative to `root`).
fn names_of_inode(root: &Path, rel: &str) -> Vec<String> {
    let Ok(md) = std::fs::symlink_metadata(root.join(rel)) else {
        return vec![];
    };
    walk(root)
        .into_iter()
        .filter(|(_, m)| m.ino() == md.ino())
        .map(|(p, _)| p)
        .collect()
}

/// Where a path lands once its parent's symlinks are resolved, relative to
/// `root`; `follow` resolves the last component too. None when it would
/// leave the tree or cannot be resolved.
fn resolved(root: &Path, rel: &str, follow: bool) -> Option<String> {
    let croot = std::fs::canonicalize(root).ok()?;
    let full = root.join(rel);
    let real = if follow {
        std::fs::canonicalize(&full).ok()?
    } else {
        std::fs::canonicalize(full.parent()?)
            .ok()?
            .join(full.file_name()?)
    };
    real.strip_prefix(&croot)
        .ok()
        .map(|p| p.to_string_lossy().into_owned())
}

fn lstat(root: &Path, rel: &str) -> Option<std::fs::Metadata> {
    std::fs::symlink_metadata(root.join(rel)).ok()
}

/// What the journal must say about a successful `op` that ran on `native`
/// (state before the op described by `before`).
fn expectations(native: &Path, op: &Op, before: &Before) -> Vec<Expect> {
    let e = |op: &'static str, path: String, detail: Option<(&'static str, String)>| {
        let alts = if matches!(op, "setattr" | "setxattr" | "removexattr") {
            names_of_inode(native, &path)
        } else {
            vec![]
        };
        Expect {
            op,
            path,
            detail,
            alts,
        }
    };
    match op {
        Op::Create { path, .. } if before.creates => resolved(native, path, true)
            .map(|p| e("create", p, Some(("kind", "file".into()))))
            .into_iter()
            .collect(),
        Op::Mkdir { .. } | Op::Symlink { .. } => {
            let kind = if matches!(op, Op::Mkdir { .. }) {
                "dir"
            } else {
                "symlink"
            };
            before
                .nofollow
                .clone()
                .map(|p| e("create", p, Some(("kind", kind.into()))))
                .into_iter()
                .collect()
        }
        Op::Link { .. } => before
            .nofollow_to
            .clone()
            .map(|p| e("link", p, None))
            .into_iter()
            .collect(),
        Op::Unlink { .. } => before
            .nofollow
            .clone()
            .map(|p| e("unlink", p, None))
            .into_iter()
            .collect(),
        Op::Rmdir { .. } => before
            .nofollow
            .clone()
            .map(|p| e("rmdir", p, None))
            .into_iter()
            .collect(),
        Op::Rename { .. } if !before.same_inode => match (&before.nofollow, &before.nofollow_to) {
            (Some(from), Some(to)) => vec![e("rename", to.clone(), Some(("from", from.clone())))],
            _ => vec![],
        },
        Op::Chmod { mode, .. } => before
            .follow
            .clone()
            .map(|p| e("setattr", p, Some(("mode", format!("{:o}", mode & 0o7777)))))
            .into_iter()
            .collect(),
        Op::Utimens {
            mtime: Time::Set(s, n),
            ..
        } => before
            .follow
            .clone()
            .map(|p| e("setattr", p, Some(("mtime", format!("{s}.{n:09}")))))
            .into_iter()
            .collect(),
        Op::SetXattr { name, .. } => before
            .nofollow
            .clone()
            .map(|p| e("setxattr", p, Some(("xattr", name.to_string()))))
            .into_iter()
            .collect(),
        Op::RemoveXattr { name, .. } => before
            .nofollow
            .clone()
            .map(|p| e("removexattr", p, Some(("xattr", name.to_string()))))
            .into_iter()
            .collect(),
        _ => vec![],
    }
}

/// Facts about the native tree just before an operation.
#[derive(Default)]
struct Before {
    /// The op's (first) path, parent resolved.
    nofollow: Option<String>,
    /// Its second path (rename/link target), parent resolved.
    nofollow_to: Option<String>,
    /// The first path, fully resolved (for calls that follow symlinks).
    follow: Option<String>,
    /// O_CREAT of a name that does not resolve to a file yet (it may be a
    /// dangling symlink: the file appears at its target).
    creates: bool,
    /// rename: both names are one inode (the call does nothing).
    same_inode: bool,
}

fn before(native: &Path, op: &Op) -> Before {
    let (first, second): (Option<&str>, Option<&str>) = match op {
        Op::Create { path, .. }
        | Op::Mkdir { path, .. }
        | Op::Rmdir { path }
        | Op::Unlink { path }
        | Op::Symlink { path, .. }
        | Op::Chmod { path, .. }
        | Op::Utimens { path, .. }
        | Op::SetXattr { path, .. }
        | Op::RemoveXattr { path, .. } => (Some(path), None),
        Op::Rename { from, to, .. } | Op::Link { from, to } => (Some(from), Some(to)),
        _ => (None, None),
    };
    let mut b = Before::default();
    if let Some(p) = first {
        b.nofollow = resolved(native, p, false);
        b.follow = resolved(native, p, true);
        b.creates = matches!(op, Op::Create { .. }) && std::fs::metadata(native.join(p)).is_err();
    }
    if let Some(q) = second {
        b.nofollow_to = resolved(native, q, false);
        if let (Some(x), Some(y)) = (lstat(native, first.unwrap_or("")), lstat(native, q)) {
            b.same_inode = x.ino() == y.ino();
        }
    }
    b
}

/// What the journal must hold after a workload.
#[derive(Default)]
struct Expected {
    /// Records in workload order.
    records: Vec<Expect>,
    /// Successful renames: (from, to, mode).
    renames: Vec<(String, String, &'static str)>,
}

/// A non-root child's operation as the call it makes (for what the journal
/// must say); other operations as they are.
fn equivalent(op: &Op) -> Op {
    match op {
        Op::AsNobody(n) => match n {
            Nobody::Create(path) => Op::Create {
                path,
                excl: false,
                trunc: false,
                mode: 0o644,
            },
            Nobody::Mkdir(path) => Op::Mkdir { path, mode: 0o755 },
            Nobody::Unlink(path) => Op::Unlink { path },
            Nobody::Rename(from, to) => Op::Rename {
                from,
                to,
                flags: RenameFlags::Plain,
            },
            Nobody::Chmod(path, mode) => Op::Chmod { path, mode: *mode },
            Nobody::SetXattr(path) => Op::SetXattr {
                path,
                name: "user.nobody",
                value: 0,
                flags: 0,
            },
            _ => Op::Stat { path: "" },
        },
        other => other.clone(),
    }
}

/// Runs `ops` on `subject` and on `native`, comparing every outcome and then
/// the trees; returns what the journal must say about `subject`.
fn run_both(subject: &Path, native: &Path, ops: &[Op]) -> Result<Expected, String> {
    let mut expected = Expected::default();
    for (i, op) in ops.iter().enumerate() {
        // What a non-root child did, as the equivalent call, for the journal.
        let call = equivalent(op);
        let b = before(native, &call);
        let on_subject = apply(subject, op);
        let on_native = apply(native, op);
        if std::env::var_os("FERRY_IT_TRACE").is_some() {
            eprintln!("#{i} {op:?} -> {on_native:?}");
        }
        if on_subject != on_native {
            return Err(format!(
                "op #{i} {op:?}: the mount returned {on_subject:?}, native {on_native:?}"
            ));
        }
        let succeeded = match &on_native {
            Ok(ops::Ret::Child(out)) => out.starts_with("ok:"),
            other => other.is_ok(),
        };
        if succeeded {
            for x in expectations(native, &call, &b) {
                if let (Op::Rename { flags, .. }, Some((_, from))) = (&call, &x.detail) {
                    let mode = match flags {
                        RenameFlags::Plain => "replace",
                        RenameFlags::NoReplace => "noreplace",
                        RenameFlags::Exchange => "exchange",
                    };
                    expected.renames.push((from.clone(), x.path.clone(), mode));
                }
                expected.records.push(x);
            }
        }
    }
    compare_trees(subject, native).map_err(|e| format!("after all ops: {e}"))?;
    Ok(expected)
}

/// Runs `ops` on a fresh mount and a native directory and checks everything;
/// the error says what differed.
pub fn check_sequence(ops: &[Op]) -> Result<(), String> {
    check_sequence_mounted_with(ops, &[])
}

/// `check_sequence` on a mount made with `options`.
fn check_sequence_mounted_with(ops: &[Op], options: &[&str]) -> Result<(), String> {
    let tm = TestMount::with_source_and_options(populate, options);
    let native = tm.path("native");
    std::fs::create_dir(&native).map_err(|e| e.to_string())?;
    populate(&native);
    let initial = read_files(&tm.source);

    let expected = run_both(&tm.mnt, &native, ops)?;
    check_inodes(&tm.mnt, &tm.source)?;

    tm.umount();
    compare_trees(&tm.source, &native).map_err(|e| format!("after unmount, in SOURCE: {e}"))?;

    let records = tm.log(true);
    check_journal(
        &records,
        &tm.source,
        &initial,
        &expected.records,
        &expected.renames,
    )
    .map_err(|e| {
        format!(
            "{e}\njournal:\n{}",
            records
                .iter()
                .map(|r| r.to_string())
                .collect::<Vec<_>>()
                .join("\n")
        )
    })
}

/// Regular files' contents by path.
fn read_files(root: &Path) -> BTreeMap<String, Vec<u8>> {
    walk(root)
        .into_iter()
        .filter(|(_, md)| md.is_file())
        .map(|(p, _)| (p.clone(), std::fs::read(root.join(&p)).expect("read file")))
        .collect()
}

fn xattrs(path: &Path) -> Result<Vec<(String, Vec<u8>)>, String> {
    let mut out = Vec::new();
    for name in xattr::list(path).map_err(|e| format!("listxattr {}: {e}", path.display()))? {
        let n = name.to_string_lossy().into_owned();
        if n.starts_with("user.") {
            let v = xattr::get(path, &name)
                .map_err(|e| format!("getxattr {} {n}: {e}", path.display()))?;
            out.push((n, v.unwrap_or_default()));
        }
    }
    out.sort();
    Ok(out)
}

/// Hard-link groups: each path mapped to the smallest path of its inode.
fn link_groups(tree: &BTreeMap<String, std::fs::Metadata>) -> BTreeMap<String, String> {
    let mut first: BTreeMap<(u64, u64), String> = BTreeMap::new();
    for (p, md) in tree {
        first
            .entry((md.dev(), md.ino()))
            .or_insert_with(|| p.clone());
    }
    tree.iter()
        .map(|(p, md)| (p.clone(), first[&(md.dev(), md.ino())].clone()))
        .collect()
}

/// Same paths, types, modes, sizes, link counts, owners, contents, symlink
/// targets, user xattrs and hard-link structure; sparse stays sparse.
pub fn compare_trees(a: &Path, b: &Path) -> Result<(), String> {
    let (ta, tb) = (walk(a), walk(b));
    let (ka, kb): (BTreeSet<_>, BTreeSet<_>) = (ta.keys().collect(), tb.keys().collect());
    if ka != kb {
        return Err(format!(
            "paths differ: only in {}: {:?}; only in {}: {:?}",
            a.display(),
            ka.difference(&kb).collect::<Vec<_>>(),
            b.display(),
            kb.difference(&ka).collect::<Vec<_>>()
        ));
    }
    for (p, ma) in &ta {
        let mb = &tb[p];
        if stat_view(ma) != stat_view(mb) {
            return Err(format!(
                "{p}: stat {:?} vs {:?}",
                stat_view(ma),
                stat_view(mb)
            ));
        }
        let (pa, pb) = (a.join(p), b.join(p));
        if ma.is_file() {
            let (da, db) = (
                std::fs::read(&pa).map_err(|e| format!("read {p}: {e}"))?,
                std::fs::read(&pb).map_err(|e| format!("read {p}: {e}"))?,
            );
            if da != db {
                let at = da.iter().zip(&db).position(|(x, y)| x != y);
                return Err(format!(
                    "{p}: content {:?} vs {:?}, first difference at {at:?}",
                    Digest::of(&da),
                    Digest::of(&db)
                ));
            }
            // A file that is sparse natively must not have its holes filled.
            if mb.blocks() * 512 + 65_536 < mb.size() && ma.blocks() * 512 >= mb.size() {
                return Err(format!(
                    "{p}: sparse natively ({} blocks for {} bytes) but {} blocks here",
                    mb.blocks(),
                    mb.size(),
                    ma.blocks()
                ));
            }
        }
        if ma.file_type().is_symlink() {
            let (la, lb) = (
                std::fs::read_link(&pa).map_err(|e| e.to_string())?,
                std::fs::read_link(&pb).map_err(|e| e.to_string())?,
            );
            if la != lb {
                return Err(format!("{p}: symlink target {la:?} vs {lb:?}"));
            }
        }
        let (xa, xb) = (xattrs(&pa)?, xattrs(&pb)?);
        if xa != xb {
            return Err(format!("{p}: xattrs {xa:?} vs {xb:?}"));
        }
    }
    let (ga, gb) = (link_groups(&ta), link_groups(&tb));
    if ga != gb {
        return Err(format!("hard links differ: {ga:?} vs {gb:?}"));
    }
    Ok(())
}

/// st_ino through the mount is the source's, for every path.
pub fn check_inodes(mnt: &Path, source: &Path) -> Result<(), String> {
    let (tm, ts) = (walk(mnt), walk(source));
    for (p, m) in &tm {
        match ts.get(p) {
            Some(s) if s.ino() == m.ino() => {}
            Some(s) => {
                return Err(format!(
                    "{p}: st_ino {} through the mount, {} in SOURCE",
                    m.ino(),
                    s.ino()
                ));
            }
            None => return Err(format!("{p}: seen through the mount but not in SOURCE")),
        }
    }
    Ok(())
}

/// Byte positions where `old` and `new` differ (including size changes).
fn changed_positions(old: &[u8], new: &[u8]) -> Vec<u64> {
    let n = old.len().max(new.len());
    (0..n)
        .filter(|&i| old.get(i) != new.get(i))
        .map(|i| i as u64)
        .collect()
}

fn check_journal(
    records: &[Value],
    source: &Path,
    initial: &BTreeMap<String, Vec<u8>>,
    expected: &[Expect],
    renames: &[(String, String, &str)],
) -> Result<(), String> {
    // 1. The namespace replayed from the records is the tree.
    let model = replay_namespace(records)?;
    check_namespace(&model, source)?;

    // 2. Every pre-existing file whose bytes changed has records covering
    //    each changed byte.
    let start: Vec<Value> = records
        .iter()
        .filter(|r| r.op() == "exists")
        .cloned()
        .collect();
    let initial_ids = replay_namespace(&start)?;
    let final_files = read_files(source);
    for (path, old) in initial {
        let Some(&id) = initial_ids.get(path) else {
            return Err(format!(
                "{path} existed at the first mount but has no exists record"
            ));
        };
        let Some(now_at) = model
            .iter()
            .find(|(p, i)| **i == id && final_files.contains_key(*p))
            .map(|(p, _)| p)
        else {
            continue; // gone
        };
        let new = &final_files[now_at];
        let changed = changed_positions(old, new);
        if changed.is_empty() {
            continue;
        }
        let mine: Vec<&Value> = records.iter().filter(|r| r.id() == Some(id)).collect();
        if mine
            .iter()
            .any(|r| r.op() == "rewritten" || r.op() == "create")
        {
            continue;
        }
        let covered = |o: u64| {
            mine.iter().any(|r| match r.op() {
                // A write past the end also zero-fills the gap before it.
                "write" => r
                    .ranges()
                    .iter()
                    .any(|&(off, len)| (o >= off || o >= old.len() as u64) && o < off + len),
                "truncate" => {
                    let size = r.get("size").and_then(Value::as_u64).unwrap_or(u64::MAX);
                    // A shrink loses everything from `size` on; growth adds
                    // zeros below `size` past the old end.
                    o >= size || o >= old.len() as u64
                }
                _ => false,
            })
        };
        if let Some(o) = changed.iter().copied().find(|&o| !covered(o)) {
            return Err(format!(
                "{path} (FileId {id}, now {now_at}) changed at byte {o} ({} bytes changed, size {} -> {}) but no write/truncate/rewritten record covers it; its records: {mine:?}",
                changed.len(),
                old.len(),
                new.len()
            ));
        }
    }

    // 3. Renames are renames, in order, with their mode: exactly the
    //    successful renames of the workload.
    let journal_renames: Vec<(String, String, String)> = records
        .iter()
        .filter(|r| r.op() == "rename")
        .map(|r| {
            let f = |k: &str| {
                r.str_field(k)
                    .unwrap_or("")
                    .trim_start_matches('/')
                    .to_string()
            };
            (f("from"), f("to"), f("mode"))
        })
        .collect();
    let want: Vec<(String, String, String)> = renames
        .iter()
        .map(|(a, b, m)| (a.clone(), b.clone(), m.to_string()))
        .collect();
    if journal_renames != want {
        return Err(format!(
            "rename records {journal_renames:?}, but the workload renamed {want:?}"
        ));
    }

    // 4. Every successful namespace/metadata call has its record, in order.
    let mut pos = 0;
    for x in expected {
        let hit = records[pos..].iter().position(|r| {
            r.op() == x.op
                && r.str_field("path")
                    .map(|p| p.trim_start_matches('/'))
                    .is_some_and(|p| p == x.path || x.alts.iter().any(|a| a == p))
                && x.detail.as_ref().is_none_or(|(k, v)| {
                    let got = r
                        .str_field(k)
                        .map(|s| s.trim_start_matches('/').to_string());
                    got.as_deref() == Some(v.as_str())
                        || (*k == "mode"
                            && got.as_deref().map(|g| g.trim_start_matches('0'))
                                == Some(v.trim_start_matches('0')))
                })
        });
        match hit {
            Some(h) => pos += h + 1,
            None => {
                return Err(format!(
                    "no {} record for {} {:?} after seq {}",
                    x.op,
                    x.path,
                    x.detail,
                    records
                        .get(pos.saturating_sub(1))
                        .map(|r| r.seq())
                        .unwrap_or(0)
                ));
            }
        }
    }
    Ok(())
}

fn config() -> ProptestConfig {
    let cases = std::env::var("FERRY_IT_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    ProptestConfig {
        cases,
        max_shrink_iters: 400,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    /// The harness itself: two native trees always agree, so any difference
    /// the suite reports comes from the mount.
    #[test]
    fn harness_agrees_on_two_native_trees(ops in proptest::collection::vec(ops::op(), 1..40)) {
        let dir = crate::util::open_tempdir();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        for d in [&a, &b] {
            std::fs::create_dir(d).unwrap();
            populate(d);
        }
        run_both(&a, &b, &ops).map_err(TestCaseError::fail)?;
    }

    /// The mount and native agree on every call, the trees agree at the end,
    /// and the journal describes what happened.
    #[test]
    fn mount_behaves_like_native_and_journal_is_complete(ops in proptest::collection::vec(ops::op(), 1..40)) {
        check_sequence(&ops).map_err(TestCaseError::fail)?;
    }
}

// ---- named regressions and fixed scenarios ----

/// Every kind of operation, in one fixed sequence.
fn fixed_scenario() -> Vec<Op> {
    use Op::*;
    vec![
        Create {
            path: "d",
            excl: true,
            trunc: false,
            mode: 0o644,
        },
        Create {
            path: "d",
            excl: true,
            trunc: false,
            mode: 0o644,
        },
        Write {
            path: "d",
            offset: 0,
            len: 5000,
            byte: 1,
            append: false,
        },
        Write {
            path: "a",
            offset: 100,
            len: 10,
            byte: 2,
            append: false,
        },
        Write {
            path: "a",
            offset: 0,
            len: 10,
            byte: 3,
            append: true,
        },
        Write {
            path: "b/x",
            offset: (1 << 24) + 3,
            len: 10,
            byte: 4,
            append: false,
        },
        Truncate {
            path: "a",
            size: 4096,
        },
        Create {
            path: "b/y",
            excl: false,
            trunc: true,
            mode: 0o600,
        },
        Mkdir {
            path: "a/x",
            mode: 0o755,
        },
        Mkdir {
            path: "c",
            mode: 0o755,
        },
        Mkdir {
            path: "b/x/y",
            mode: 0o755,
        },
        Rmdir { path: "b" },
        Rename {
            from: "d",
            to: "b/x",
            flags: RenameFlags::Plain,
        },
        Rename {
            from: "a",
            to: "b/y",
            flags: RenameFlags::NoReplace,
        },
        Rename {
            from: "a",
            to: "b/y",
            flags: RenameFlags::Exchange,
        },
        Mkdir {
            path: "d",
            mode: 0o700,
        },
        Rename {
            from: "d",
            to: "b",
            flags: RenameFlags::Plain,
        },
        Rename {
            from: "b",
            to: "d",
            flags: RenameFlags::Plain,
        },
        Link { from: "a", to: "b" },
        Link {
            from: "a",
            to: "b/x/y",
        },
        Symlink {
            target: "nonexistent",
            path: "b/x/y",
        },
        Chmod {
            path: "a",
            mode: 0o600,
        },
        Utimens {
            path: "a",
            atime: Time::Set(1_000_000_000, 123_456_789),
            mtime: Time::Set(1_500_000_000, 987_654_321),
        },
        Utimens {
            path: "d",
            atime: Time::Omit,
            mtime: Time::Set(12, 1),
        },
        SetXattr {
            path: "a",
            name: "user.other",
            value: 7,
            flags: libc::XATTR_CREATE,
        },
        SetXattr {
            path: "a",
            name: "user.other",
            value: 7,
            flags: libc::XATTR_CREATE,
        },
        SetXattr {
            path: "a",
            name: "user.k",
            value: 9,
            flags: libc::XATTR_REPLACE,
        },
        RemoveXattr {
            path: "a",
            name: "user.k",
        },
        RemoveXattr {
            path: "a",
            name: "user.k",
        },
        SetXattr {
            path: "c",
            name: "user.k",
            value: 1,
            flags: 0,
        },
        Read {
            path: "a",
            offset: 0,
            len: 5000,
        },
        Read {
            path: "b/x",
            offset: 1 << 20,
            len: 100,
        },
        Stat { path: "b/x" },
        Readdir { path: "" },
        Readdir { path: "d" },
        PunchHole {
            path: "a",
            offset: 1,
            len: 4096,
        },
        CopyRange {
            from: "a",
            to: "d",
            off_in: 0,
            off_out: 0,
            len: 100,
        },
        CopyRange {
            from: "b/y",
            to: "a",
            off_in: 10,
            off_out: 5000,
            len: 100,
        },
        Unlink { path: "b" },
        Unlink { path: "d" },
        Rmdir { path: "d" },
    ]
}

#[test]
fn fixed_scenario_covers_every_kind_of_operation() {
    check_sequence(&fixed_scenario()).unwrap();
}

/// The same through `/dev/fuse` alone, the transport used where the kernel
/// offers no io_uring queues (the rest of the suite uses them when offered).
#[test]
fn fixed_scenario_through_dev_fuse_only() {
    check_sequence_mounted_with(&fixed_scenario(), &["--no-io-uring"]).unwrap();
}

#[test]
fn fixed_scenario_as_non_root_user() {
    use Op::*;
    check_sequence(&[
        AsNobody(Nobody::Create("d")),
        AsNobody(Nobody::Write("d")),
        AsNobody(Nobody::Write("a")),
        AsNobody(Nobody::Write("b/x")),
        AsNobody(Nobody::Read("a")),
        AsNobody(Nobody::Create("b/z")),
        AsNobody(Nobody::Mkdir("x")),
        AsNobody(Nobody::Unlink("a")),
        AsNobody(Nobody::Unlink("b/x")),
        AsNobody(Nobody::Rename("d", "e")),
        AsNobody(Nobody::Rename("b", "f")),
        AsNobody(Nobody::Chmod("a", 0o777)),
        AsNobody(Nobody::Chmod("e", 0o600)),
        AsNobody(Nobody::List("b")),
        AsNobody(Nobody::Truncate("a")),
        AsNobody(Nobody::Truncate("b/x")),
        AsNobody(Nobody::Touch("a")),
        AsNobody(Nobody::Touch("e")),
        AsNobody(Nobody::SetXattr("a")),
        AsNobody(Nobody::SetXattr("e")),
        Chmod {
            path: "b",
            mode: 0o700,
        },
        AsNobody(Nobody::List("b")),
        AsNobody(Nobody::Read("b/x")),
        Chmod {
            path: "",
            mode: 0o1777,
        },
        AsNobody(Nobody::Unlink("a")),
        AsNobody(Nobody::Unlink("e")),
        Stat { path: "x" },
    ])
    .unwrap();
}

#[test]
fn sparse_write_far_beyond_the_end() {
    use Op::*;
    check_sequence(&[
        Create {
            path: "d",
            excl: true,
            trunc: false,
            mode: 0o644,
        },
        Write {
            path: "d",
            offset: 1 << 24,
            len: 10,
            byte: 1,
            append: false,
        },
        Stat { path: "d" },
        Truncate {
            path: "d",
            size: 100,
        },
        Write {
            path: "d",
            offset: 1 << 23,
            len: 10,
            byte: 1,
            append: false,
        },
        Read {
            path: "d",
            offset: (1 << 23) - 5,
            len: 100,
        },
    ])
    .unwrap();
    // 1 TiB offset: the size is exact and the file stays sparse.
    let tm = TestMount::new();
    let f = tm.mnt.join("huge");
    let file = std::fs::File::create(&f).unwrap();
    use std::os::unix::fs::FileExt;
    file.write_all_at(b"tail", 1 << 40).unwrap();
    drop(file);
    let md = std::fs::metadata(&f).unwrap();
    assert_eq!(md.len(), (1 << 40) + 4);
    assert!(
        md.blocks() < 1024,
        "a 1 TiB sparse file allocated {} blocks",
        md.blocks()
    );
    let mut buf = [0u8; 8];
    std::fs::File::open(&f)
        .unwrap()
        .read_exact_at(&mut buf, (1 << 40) - 4)
        .unwrap();
    assert_eq!(&buf, b"\0\0\0\0tail");
    assert_eq!(
        std::fs::metadata(tm.source.join("huge")).unwrap().len(),
        (1 << 40) + 4
    );
}

#[test]
fn harness_runs_the_fixed_scenarios_on_two_native_trees() {
    use Op::*;
    let dir = crate::util::open_tempdir();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    for d in [&a, &b] {
        std::fs::create_dir(d).unwrap();
        populate(d);
    }
    let ops = [
        AsNobody(Nobody::Create("d")),
        AsNobody(Nobody::Write("d")),
        AsNobody(Nobody::Write("a")),
        AsNobody(Nobody::Read("a")),
        AsNobody(Nobody::List("b")),
        Write {
            path: "a",
            offset: 100,
            len: 10,
            byte: 2,
            append: false,
        },
        Rename {
            from: "a",
            to: "b/y",
            flags: RenameFlags::Exchange,
        },
        Utimens {
            path: "a",
            atime: Time::Set(1_000_000_000, 123_456_789),
            mtime: Time::Set(1_500_000_000, 987_654_321),
        },
        CopyRange {
            from: "a",
            to: "b/x",
            off_in: 0,
            off_out: 0,
            len: 100,
        },
    ];
    let expected = run_both(&a, &b, &ops).unwrap();
    assert!(
        expected.renames.is_empty(),
        "rename of two links of one inode is a no-op"
    );
}
