//! `ferry log` and `ferry status`: read a journal without disturbing the
//! mount that writes it (they read the log files; no lock is taken).

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow};
use journal::{FileId, Name, Op, PathTracker, Record};
use serde_json::{Value, json};

use super::bytes;
use super::mount::mount_pid;
use crate::cli::{JournalArgs, LogArgs, StatusArgs};
use crate::mounts;

/// The state directory named by `--state` or by a mountpoint.
fn state_of(args: &JournalArgs) -> anyhow::Result<(PathBuf, Option<PathBuf>)> {
    if let Some(state) = &args.state {
        return Ok((state.clone(), None));
    }
    let mountpoint = args
        .mountpoint
        .as_ref()
        .expect("clap requires MOUNTPOINT or --state");
    let resolved = mounts::resolve(mountpoint)
        .with_context(|| format!("MOUNTPOINT {}", mountpoint.display()))?;
    let entry = mounts::at(&resolved)?.ok_or_else(|| {
        anyhow!(
            "{} is not mounted (name the journal with --state DIR)",
            resolved.display()
        )
    })?;
    let state = entry
        .ferry_state()
        .ok_or_else(|| anyhow!("{} is not a ferry mount", resolved.display()))?;
    Ok((state, Some(resolved)))
}

pub fn log(args: LogArgs) -> anyhow::Result<()> {
    let (state, _) = state_of(&args.journal)?;
    let records = journal::read_records(&state)
        .with_context(|| format!("reading the journal in {}", state.display()))?;
    let mut paths = PathTracker::new();
    let mut out = BufWriter::new(std::io::stdout().lock());
    for record in records {
        let record =
            record.with_context(|| format!("reading the journal in {}", state.display()))?;
        let fields = describe(&record, &mut paths);
        if matches!(record.op, Op::Exists { .. }) && !args.all {
            continue;
        }
        let written = if args.json {
            serde_json::to_writer(&mut out, &fields)
                .map_err(std::io::Error::from)
                .and_then(|()| writeln!(out))
        } else {
            writeln!(out, "{}", human(&record, &fields))
        };
        if let Err(err) = written {
            // `ferry log | head` closes the pipe early: not an error.
            if err.kind() == std::io::ErrorKind::BrokenPipe {
                return Ok(());
            }
            return Err(err).context("writing to stdout");
        }
    }
    match out.flush() {
        Err(err) if err.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(err).context("writing to stdout")
        }
        _ => Ok(()),
    }
}

fn in_dir(paths: &PathTracker, parent: FileId, name: &Name) -> String {
    let mut p = paths.path_of(parent).unwrap_or_default();
    p.push(name.as_os());
    p.to_string_lossy().into_owned()
}

/// The record as a JSON object; paths are those at the time of the record.
/// Applies the record to `paths`.
fn describe(r: &Record, paths: &mut PathTracker) -> Value {
    let mut v = json!({ "seq": r.seq.0, "unix_ns": r.unix_ns, "op": r.op.kind_name() });
    if let Some(id) = r.op.file_id() {
        v["id"] = json!(id.0);
    }
    let before = r.op.file_id().and_then(|id| paths.path_of(id));
    match &r.op {
        Op::Exists {
            parent, name, kind, ..
        }
        | Op::Create {
            parent, name, kind, ..
        } => {
            v["path"] = json!(in_dir(paths, *parent, name));
            v["name"] = json!(name.display());
            v["kind"] = json!(kind.name());
        }
        Op::Link { parent, name, .. }
        | Op::Unlink { parent, name, .. }
        | Op::Rmdir { parent, name, .. } => {
            v["path"] = json!(in_dir(paths, *parent, name));
            v["name"] = json!(name.display());
        }
        Op::Rename {
            from_parent,
            from_name,
            to_parent,
            to_name,
            mode,
            replaced,
            ..
        } => {
            v["from"] = json!(in_dir(paths, *from_parent, from_name));
            v["to"] = json!(in_dir(paths, *to_parent, to_name));
            v["path"] = v["to"].clone();
            v["name"] = json!(to_name.display());
            v["mode"] = json!(format!("{mode:?}").to_lowercase());
            if let Some(other) = replaced {
                v["replaced"] = json!(other.0);
            }
        }
        Op::Write { ranges, .. } => {
            v["ranges"] = json!(ranges.iter().map(|r| [r.offset, r.len]).collect::<Vec<_>>());
        }
        Op::Truncate { size, .. } => v["size"] = json!(size),
        Op::SetAttr { change, .. } => {
            if let Some(m) = change.mode {
                v["mode"] = json!(format!("{m:o}"));
            }
            if let Some(u) = change.uid {
                v["uid"] = json!(u);
            }
            if let Some(g) = change.gid {
                v["gid"] = json!(g);
            }
            if let Some(t) = change.atime {
                v["atime"] = json!(format!("{}.{:09}", t.sec, t.nsec));
            }
            if let Some(t) = change.mtime {
                v["mtime"] = json!(format!("{}.{:09}", t.sec, t.nsec));
            }
        }
        Op::SetXattr { name, .. } | Op::RemoveXattr { name, .. } => {
            v["xattr"] = json!(name.display())
        }
        Op::MountStart { recovered } => v["recovered"] = json!(recovered),
        Op::Dirty { .. } | Op::Rewritten { .. } | Op::MountStop | Op::Clean { .. } => {}
    }
    if let Some(origin) = origin_of(&r.op) {
        v["origin"] = json!(origin);
    }
    paths.apply(r);
    if v.get("path").is_none()
        && let Some(p) = before.or_else(|| r.op.file_id().and_then(|id| paths.path_of(id)))
    {
        v["path"] = json!(p.to_string_lossy());
    }
    v
}

fn origin_of(op: &Op) -> Option<&'static str> {
    use journal::Origin;
    let origin = match op {
        Op::Create { origin, .. }
        | Op::Link { origin, .. }
        | Op::Unlink { origin, .. }
        | Op::Rmdir { origin, .. }
        | Op::Rename { origin, .. }
        | Op::Rewritten { origin, .. }
        | Op::SetAttr { origin, .. }
        | Op::SetXattr { origin, .. }
        | Op::RemoveXattr { origin, .. } => origin,
        _ => return None,
    };
    Some(match origin {
        Origin::Mount => "mount",
        Origin::Reconcile => "reconcile",
    })
}

/// One line for a person: sequence, time, operation, file, path and detail.
fn human(r: &Record, v: &Value) -> String {
    let id = v
        .get("id")
        .and_then(Value::as_u64)
        .map(|i| format!("#{i}"))
        .unwrap_or_default();
    let path = match (&r.op, v.get("from"), v.get("to")) {
        (Op::Rename { .. }, Some(from), Some(to)) => {
            format!(
                "{} -> {}",
                from.as_str().unwrap_or(""),
                to.as_str().unwrap_or("")
            )
        }
        _ => v
            .get("path")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string(),
    };
    let detail = match &r.op {
        Op::Write { ranges, .. } => ranges
            .iter()
            .map(|r| format!("[{}..{})", r.offset, r.end()))
            .collect::<Vec<_>>()
            .join(" "),
        Op::Truncate { size, .. } => format!("size={size}"),
        Op::Create { kind, .. } | Op::Exists { kind, .. } => kind.name().to_string(),
        Op::SetXattr { name, .. } | Op::RemoveXattr { name, .. } => name.display().into_owned(),
        Op::SetAttr { .. } => ["mode", "uid", "gid", "atime", "mtime"]
            .iter()
            .filter_map(|k| {
                v.get(*k).map(|x| {
                    format!(
                        "{k}={}",
                        x.as_str().map(str::to_string).unwrap_or(x.to_string())
                    )
                })
            })
            .collect::<Vec<_>>()
            .join(" "),
        Op::MountStart { recovered: true } => "recovered".into(),
        _ => String::new(),
    };
    let origin = match v.get("origin").and_then(Value::as_str) {
        Some("reconcile") => " (reconcile)",
        _ => "",
    };
    format!(
        "{:>8} {} {:<11} {:>7} {}{}{}",
        r.seq.0,
        format_time(r.unix_ns),
        r.op.kind_name(),
        id,
        path,
        if detail.is_empty() {
            String::new()
        } else {
            format!("  {detail}")
        },
        origin
    )
}

/// UTC time with milliseconds, from nanoseconds since the epoch.
fn format_time(unix_ns: i64) -> String {
    let secs = unix_ns.div_euclid(1_000_000_000);
    let millis = unix_ns.rem_euclid(1_000_000_000) / 1_000_000;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

pub fn status(args: StatusArgs) -> anyhow::Result<()> {
    let (state, mountpoint) = state_of(&args.journal)?;
    let summary = journal::summarize(&state)
        .with_context(|| format!("reading the journal in {}", state.display()))?;
    let pid = mount_pid(&state).filter(|pid| Path::new(&format!("/proc/{pid}")).exists());
    let journal_bytes = summary.log_bytes + summary.index_bytes;
    if args.json {
        let v = json!({
            "mountpoint": mountpoint.as_ref().map(|m| m.to_string_lossy().into_owned()),
            "mounted": pid.is_some(),
            "pid": pid,
            "state_dir": state.to_string_lossy(),
            "last_seq": summary.last_seq.0,
            "files": summary.files,
            "dirty_files": summary.dirty_files,
            "journal_bytes": journal_bytes,
            "log_bytes": summary.log_bytes,
            "index_bytes": summary.index_bytes,
        });
        println!("{v}");
        return Ok(());
    }
    match (&mountpoint, pid) {
        (Some(m), Some(pid)) => println!("mount:       {} (pid {pid})", m.display()),
        (Some(m), None) => println!(
            "mount:       {} (its process is gone: run `ferry umount`)",
            m.display()
        ),
        (None, Some(pid)) => println!("mount:       mounted (pid {pid})"),
        (None, None) => println!("mount:       not mounted"),
    }
    println!("state:       {}", state.display());
    println!("last seq:    {}", summary.last_seq.0);
    println!("files:       {}", summary.files);
    println!("dirty files: {}", summary.dirty_files);
    println!(
        "journal:     {} (log {}, index {})",
        bytes(journal_bytes),
        bytes(summary.log_bytes),
        bytes(summary.index_bytes)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_utc_times() {
        assert_eq!(format_time(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            format_time(1_795_394_123_456_000_000),
            "2026-11-23T00:35:23.456Z"
        );
    }
}
