//! `ferry verify`: compares a source tree with a replica
//! (`replicator::verify`) and prints each difference, as text lines or as
//! JSON lines, then a summary.
//!
//! Exit codes: 0 equal, 1 different, 2 an error (a root is unusable, an
//! entry could not be read, or the report could not be written). Errors go
//! to stderr, one `ferry: ` line each; the report goes to stdout.

use std::borrow::Cow;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use replicator::verify::{Difference, Options, Report, What, verify};
use serde_json::{Value, json};

use crate::cli::VerifyArgs;

const EQUAL: u8 = 0;
const DIFFERENT: u8 = 1;
const ERROR: u8 = 2;

pub fn run(args: VerifyArgs) -> anyhow::Result<ExitCode> {
    let report = match verify(&args.source, &args.replica, &Options::default()) {
        Ok(report) => report,
        Err(err) => {
            eprintln!("ferry: {err}");
            return Ok(ExitCode::from(ERROR));
        }
    };
    for err in &report.errors {
        eprintln!("ferry: {err}");
    }
    let mut out = BufWriter::new(io::stdout().lock());
    let written = if args.json {
        write_json(&mut out, &report)
    } else {
        write_text(&mut out, &report)
    };
    if let Err(err) = written.and_then(|()| out.flush()) {
        eprintln!("ferry: writing the report: {err}");
        return Ok(ExitCode::from(ERROR));
    }
    Ok(ExitCode::from(exit_code(&report)))
}

fn exit_code(report: &Report) -> u8 {
    if !report.errors.is_empty() {
        ERROR
    } else if !report.differences.is_empty() {
        DIFFERENT
    } else {
        EQUAL
    }
}

fn write_text(out: &mut impl Write, report: &Report) -> io::Result<()> {
    for difference in &report.differences {
        writeln!(out, "{}", text_line(difference))?;
    }
    for skipped in &report.skipped {
        writeln!(
            out,
            "skipped, on another filesystem: {} (in {})",
            shown(&skipped.path),
            skipped.side.name()
        )?;
    }
    writeln!(out, "{}", summary_line(report))
}

/// One line per difference: `KIND differs: PATH (SOURCE vs REPLICA)`, and
/// for entries on one side only `only in source: PATH`.
fn text_line(difference: &Difference) -> String {
    let path = shown(&difference.path);
    let (source, replica) = values(&difference.what);
    let (source, replica) = (text_value(&source), text_value(&replica));
    match &difference.what {
        What::MissingInReplica(_) => format!("only in source: {path}"),
        What::ExtraInReplica(_) => format!("only in replica: {path}"),
        What::Content { .. } => format!("content differs: {path}"),
        What::Xattr { name, .. } => format!(
            "xattr differs: {path} ({}: {source} vs {replica})",
            name.to_string_lossy()
        ),
        What::Links { .. } => format!("hard links differ: {path} ({source} vs {replica})"),
        other => format!("{} differs: {path} ({source} vs {replica})", label(other)),
    }
}

fn label(what: &What) -> &'static str {
    match what {
        What::Symlink { .. } => "symlink target",
        What::Rdev { .. } => "device number",
        other => other.kind(),
    }
}

/// `equal (N files, B bytes compared)`, or the counts of what is wrong.
fn summary_line(report: &Report) -> String {
    let counts = format!(
        "({} files, {} bytes compared)",
        report.files, report.bytes_compared
    );
    let mut parts = Vec::new();
    if report.is_equal() {
        parts.push("equal".to_string());
    } else {
        parts.push(plural(report.differences.len(), "difference"));
    }
    if !report.errors.is_empty() {
        parts.push(plural(report.errors.len(), "error"));
    }
    if !report.skipped.is_empty() {
        parts.push(format!("{} skipped", report.skipped.len()));
    }
    format!("{} {counts}", parts.join(", "))
}

fn plural(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

fn write_json(out: &mut impl Write, report: &Report) -> io::Result<()> {
    for difference in &report.differences {
        writeln!(out, "{}", json_line(difference))?;
    }
    for skipped in &report.skipped {
        let line = json!({
            "path": shown(&skipped.path),
            "kind": "skipped",
            "side": skipped.side.name(),
        });
        writeln!(out, "{line}")?;
    }
    let summary = json!({
        "equal": report.is_equal(),
        "differences": report.differences.len(),
        "errors": report.errors.len(),
        "skipped": report.skipped.len(),
        "files": report.files,
        "bytes_compared": report.bytes_compared,
    });
    writeln!(out, "{summary}")
}

/// `{"path", "kind", "source", "replica"}`, plus `"name"` for an xattr.
fn json_line(difference: &Difference) -> Value {
    let (source, replica) = values(&difference.what);
    let mut line = json!({
        "path": shown(&difference.path),
        "kind": difference.what.kind(),
        "source": source,
        "replica": replica,
    });
    if let What::Xattr { name, .. } = &difference.what {
        line["name"] = Value::from(name.to_string_lossy());
    }
    line
}

/// The source's and the replica's value, null where there is none. Sizes
/// are numbers, hard-link groups arrays of paths, everything else strings.
fn values(what: &What) -> (Value, Value) {
    let pair = |s: String, r: String| (Value::from(s), Value::from(r));
    match what {
        What::MissingInReplica(t) => (Value::from(t.name()), Value::Null),
        What::ExtraInReplica(t) => (Value::Null, Value::from(t.name())),
        What::Type { source, replica } => pair(source.name().into(), replica.name().into()),
        What::Size { source, replica } => (Value::from(*source), Value::from(*replica)),
        What::Content { source, replica } => {
            pair(source.to_hex().to_string(), replica.to_hex().to_string())
        }
        What::Mode { source, replica } => pair(format!("{source:04o}"), format!("{replica:04o}")),
        What::Owner { source, replica } => pair(source.to_string(), replica.to_string()),
        What::Mtime { source, replica } => pair(source.to_string(), replica.to_string()),
        What::Symlink { source, replica } => pair(shown(source).into(), shown(replica).into()),
        What::Rdev { source, replica } => pair(device(*source), device(*replica)),
        What::Xattr {
            source, replica, ..
        } => (
            xattr_value(source.as_deref()),
            xattr_value(replica.as_deref()),
        ),
        What::Links { source, replica } => (paths(source), paths(replica)),
    }
}

/// A value as the text format shows it.
fn text_value(value: &Value) -> String {
    match value {
        Value::Null => "none".to_string(),
        Value::String(s) => s.clone(),
        Value::Array(items) => {
            let items: Vec<String> = items.iter().map(text_value).collect();
            format!("[{}]", items.join(", "))
        }
        other => other.to_string(),
    }
}

/// A relative path for people: lossy where the name is not UTF-8, and `.`
/// for the roots themselves.
fn shown(path: &Path) -> Cow<'_, str> {
    if path.as_os_str().is_empty() {
        Cow::Borrowed(".")
    } else {
        path.to_string_lossy()
    }
}

fn paths(paths: &[PathBuf]) -> Value {
    Value::Array(paths.iter().map(|p| Value::from(shown(p))).collect())
}

fn device(rdev: u64) -> String {
    format!(
        "{}:{}",
        nix::sys::stat::major(rdev),
        nix::sys::stat::minor(rdev)
    )
}

/// An xattr value as getfattr shows it: printable text in double quotes,
/// anything else (ACLs, capabilities) as `0x` and hex.
fn xattr_value(value: Option<&[u8]>) -> Value {
    let Some(bytes) = value else {
        return Value::Null;
    };
    let text = match std::str::from_utf8(bytes) {
        Ok(s) if !s.chars().any(char::is_control) => format!("\"{s}\""),
        _ => {
            let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            format!("0x{hex}")
        }
    };
    Value::from(text)
}
