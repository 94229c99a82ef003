//! `ferry push`: push what a replica has not applied, through the live
//! mount's control socket (`ferry push MOUNTPOINT DESTINATION`) or from an
//! unmounted state directory (`--state DIR --source SOURCE`), and print
//! the report.
//!
//! A remote destination's stream is opened here, in the user's process:
//! ssh runs with the user's environment (`~/.ssh/config`, the agent) and
//! terminal, and the daemon's key file is read with the user's rights.
//! A live mount is then handed the stream's descriptors and speaks the
//! protocol over them itself (see `control`).

use std::io::{IsTerminal, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use journal::{Journal, JournalError, OpenOptions};
use replicator::push::{Progress, PushOptions, PushReport};
use serde_json::Value;

use super::bytes;
use crate::cli::PushArgs;
use crate::control::{self, Handler, Keep, RemoteStream, Request, Target, TargetSpec};
use crate::remote::auth::{self, Key};
use crate::remote::ssh::{self, SshProcess};
use crate::{mounts, state_dir};

/// How long connecting to a daemon may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// Where a push goes, as the command line names it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Destination {
    /// An existing local directory, canonical.
    Local(PathBuf),
    /// A directory of batch files, canonical.
    BatchDir(PathBuf),
    /// `[user@]host:path`.
    Ssh { host: String, path: String },
    /// `ferry://host:port/name`.
    Daemon { address: String, name: String },
}

impl Destination {
    fn parse(arg: Option<&Path>, batch_dir: Option<&Path>) -> anyhow::Result<Destination> {
        let arg = match (arg, batch_dir) {
            (None, Some(dir)) => {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("batch directory {}", dir.display()))?;
                let dir = std::fs::canonicalize(dir)
                    .with_context(|| format!("batch directory {}", dir.display()))?;
                return Ok(Destination::BatchDir(dir));
            }
            (Some(arg), None) => arg,
            _ => bail!("name a DESTINATION or --batch-dir DIR (one of them)"),
        };
        let text = arg.to_string_lossy();
        if let Some(rest) = text.strip_prefix("ferry://") {
            let (address, name) = rest
                .split_once('/')
                .ok_or_else(|| anyhow!("{text}: a daemon destination is ferry://HOST:PORT/NAME"))?;
            if address.is_empty() || name.is_empty() || name.contains('/') {
                bail!("{text}: a daemon destination is ferry://HOST:PORT/NAME");
            }
            return Ok(Destination::Daemon {
                address: address.to_string(),
                name: name.to_string(),
            });
        }
        let replica = match std::fs::canonicalize(arg) {
            Ok(path) => path,
            // A local path wins: only what cannot be one is taken for a
            // remote destination.
            Err(_) if looks_remote(&text) => {
                let (host, path) = text.split_once(':').expect("looks remote");
                if host.starts_with('-') {
                    // ssh would take it for an option (-oProxyCommand=...).
                    bail!("{text}: a host name cannot start with '-'");
                }
                return Ok(Destination::Ssh {
                    host: host.to_string(),
                    path: if path.is_empty() {
                        ".".into()
                    } else {
                        path.to_string()
                    },
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
                "replica directory {} does not exist: create it first",
                arg.display()
            ),
            Err(e) => {
                return Err(e).with_context(|| format!("replica directory {}", arg.display()));
            }
        };
        if !replica.is_dir() {
            bail!("replica {} is not a directory", arg.display());
        }
        Ok(Destination::Local(replica))
    }
}

/// scp's rule: a colon before any slash names a host.
fn looks_remote(text: &str) -> bool {
    match text.split_once(':') {
        Some((host, _)) => !host.is_empty() && !host.contains('/'),
        None => false,
    }
}

/// A destination made ready to push to: for a remote one, the stream is
/// open (and a daemon's handshake done).
enum Opened {
    Local(PathBuf),
    BatchDir(PathBuf),
    Remote {
        name: String,
        replica: String,
        /// Reading and writing ends.
        reader: std::fs::File,
        writer: std::fs::File,
        keys: Option<auth::SessionKeys>,
        /// The ssh process, waited for at the end.
        ssh: Option<SshProcess>,
    },
}

impl Opened {
    fn open(destination: Destination, args: &PushArgs) -> anyhow::Result<Opened> {
        Ok(match destination {
            Destination::Local(p) => Opened::Local(p),
            Destination::BatchDir(p) => Opened::BatchDir(p),
            Destination::Ssh { host, path } => {
                let r = ssh::spawn(&args.ssh_command, &host, &args.ferry_path, &path)?;
                Opened::Remote {
                    name: format!("{host}:{path}"),
                    replica: String::new(),
                    reader: std::fs::File::from(std::os::fd::OwnedFd::from(r.from_ssh)),
                    writer: std::fs::File::from(std::os::fd::OwnedFd::from(r.to_ssh)),
                    keys: None,
                    ssh: Some(r.process),
                }
            }
            Destination::Daemon { address, name } => {
                let key_file = args.key_file.as_deref().ok_or_else(|| {
                    anyhow!("ferry://{address}/{name}: a daemon needs --key-file FILE")
                })?;
                let key = Key::from_file(key_file)?;
                let mut stream = connect(&address)?;
                let keys = auth::client_handshake(&key, &mut stream, &address)?;
                let writer = stream.try_clone().context("duplicating the socket")?;
                Opened::Remote {
                    name: format!("ferry://{address}/{name}"),
                    replica: name,
                    reader: std::fs::File::from(std::os::fd::OwnedFd::from(stream)),
                    writer: std::fs::File::from(std::os::fd::OwnedFd::from(writer)),
                    keys: Some(keys),
                    ssh: None,
                }
            }
        })
    }
}

fn connect(address: &str) -> anyhow::Result<TcpStream> {
    let addrs = address
        .to_socket_addrs()
        .with_context(|| format!("resolving {address}"))?;
    let mut last = None;
    for a in addrs {
        match TcpStream::connect_timeout(&a, CONNECT_TIMEOUT) {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(match last {
        Some(e) => anyhow!(e).context(format!("connecting to the daemon at {address}")),
        None => anyhow!("{address} resolves to no address"),
    })
}

pub fn run(mut args: PushArgs) -> anyhow::Result<()> {
    // A lone positional fills DESTINATION (MOUNTPOINT may be missing, for
    // --state); with --batch-dir it is the MOUNTPOINT.
    if args.batch_dir.is_some() && args.mountpoint.is_none() && args.state.is_none() {
        args.mountpoint = args.replica.take();
    }
    let destination = Destination::parse(args.replica.as_deref(), args.batch_dir.as_deref())?;
    let mut bar = Bar::new(args.progress || (!args.json && std::io::stderr().is_terminal()));
    // Options the engine adds later keep their defaults here.
    #[allow(clippy::needless_update)]
    let options = PushOptions {
        dry_run: args.dry_run,
        progress: bar.enabled,
        ..PushOptions::default()
    };
    let mode = match (&args.mountpoint, &args.state, &args.source) {
        (Some(mountpoint), None, None) => Ok(Mode::Live(mountpoint.clone())),
        (None, Some(state), Some(source)) => Ok(Mode::Offline(state.clone(), source.clone())),
        _ => Err(anyhow!(
            "name a MOUNTPOINT, or an unmounted journal with --state DIR --source SOURCE"
        )),
    }?;
    let mut ssh = None;
    let pushed = match mode {
        Mode::Live(mountpoint) => live(
            &mountpoint,
            destination,
            &args,
            &mut ssh,
            &options,
            &mut |p| bar.update(p),
        ),
        Mode::Offline(state, source) => Opened::open(destination, &args)
            .and_then(|opened| {
                offline(&state, &source, opened, &mut ssh, &options, &mut |p| {
                    bar.update(p)
                })
            })
            .and_then(|r| serde_json::to_value(&r).context("encoding the report")),
    };
    bar.finish();
    let pushed = finish_ssh(ssh, pushed);
    let raw = pushed?;
    let report: PushReport = serde_json::from_value(raw.clone()).with_context(|| {
        format!("the mount process sent a report this ferry cannot read: {raw}")
    })?;
    print_report(&report, &raw, &args)
}

enum Mode {
    Live(PathBuf),
    Offline(PathBuf, PathBuf),
}

/// Waits for the ssh process (its stream is closed by now, so it ends),
/// and adds how it ended to a failed push's error.
fn finish_ssh<T>(ssh: Option<SshProcess>, pushed: anyhow::Result<T>) -> anyhow::Result<T> {
    let Some(process) = ssh else {
        return pushed;
    };
    let status = process.wait();
    match (pushed, status) {
        (Err(e), Ok(status)) if !status.success() => {
            Err(e.context(format!("ssh ended with {status} (its messages are above)")))
        }
        (pushed, _) => pushed,
    }
}

/// Pushes through the live mount at `mountpoint`: over the ssh connection
/// it kept from an earlier push to the same destination if there is one,
/// else over a new stream (which the mount then keeps, for ssh).
fn live(
    mountpoint: &Path,
    destination: Destination,
    args: &PushArgs,
    ssh: &mut Option<SshProcess>,
    options: &PushOptions,
    progress: &mut dyn FnMut(Progress),
) -> anyhow::Result<Value> {
    let mount = MountControl::find(mountpoint)?;
    let keep = match &destination {
        Destination::Ssh { host, path } if args.keep_connection > 0 => Some(Keep {
            // Another ssh command or remote ferry is another connection.
            key: format!(
                "{host}:{path} (ssh command {:?}, ferry {:?})",
                args.ssh_command, args.ferry_path
            ),
            seconds: args.keep_connection,
        }),
        _ => None,
    };
    if let Some(keep) = &keep {
        let request = Request::PushTo {
            target: TargetSpec::Kept {
                key: keep.key.clone(),
            },
            options: options.clone(),
        };
        match control::request_push(mount.connect()?, &request, &[], progress) {
            Err(e) if e.is::<control::NotKept>() => {}
            pushed => return pushed,
        }
    }
    let opened = Opened::open(destination, args)?;
    let pushed = through_mount(&mount, opened, ssh, keep.clone(), options, progress);
    if pushed.is_ok()
        && keep.is_some()
        && let Some(process) = ssh.take()
    {
        process.leave();
    }
    pushed
}

/// A live mount's control socket.
struct MountControl {
    mountpoint: PathBuf,
    state: PathBuf,
    socket: PathBuf,
}

impl MountControl {
    /// The control socket of the ferry mount at `mountpoint`.
    fn find(mountpoint: &Path) -> anyhow::Result<MountControl> {
        let resolved = mounts::resolve(mountpoint)
            .with_context(|| format!("MOUNTPOINT {}", mountpoint.display()))?;
        let entry = mounts::at(&resolved)?.ok_or_else(|| {
            anyhow!(
                "{} is not mounted (push from an unmounted journal with --state DIR --source SOURCE)",
                resolved.display()
            )
        })?;
        let state = entry.ferry_state().ok_or_else(|| {
            anyhow!(
                "{} is not a ferry mount (it is {} from {})",
                resolved.display(),
                entry.fstype,
                entry.source.display()
            )
        })?;
        Ok(MountControl {
            socket: state.join(control::SOCKET_NAME),
            mountpoint: resolved,
            state,
        })
    }

    /// A new connection to it (one per request).
    fn connect(&self) -> anyhow::Result<std::os::unix::net::UnixStream> {
        let (mountpoint, socket) = (self.mountpoint.display(), self.socket.display());
        control::connect(&self.socket).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => anyhow!(
                "the ferry mount at {mountpoint} does not answer: it has no control socket {socket} (a mount started by an older ferry, or stopping); remount it, or unmount it and push with --state {} --source SOURCE",
                self.state.display()
            ),
            std::io::ErrorKind::ConnectionRefused => anyhow!(
                "the ferry mount at {mountpoint} does not answer on {socket} (its process is gone: run `ferry umount {mountpoint}`)"
            ),
            _ => anyhow!(e).context(format!(
                "connecting to the ferry mount at {mountpoint} ({socket})"
            )),
        })
    }
}

/// Asks the mount process to push to `opened`.
fn through_mount(
    mount: &MountControl,
    opened: Opened,
    ssh: &mut Option<SshProcess>,
    keep: Option<Keep>,
    options: &PushOptions,
    progress: &mut dyn FnMut(Progress),
) -> anyhow::Result<Value> {
    let stream = mount.connect()?;
    let options = options.clone();
    match opened {
        Opened::Local(replica) => {
            control::request_push(stream, &Request::Push { replica, options }, &[], progress)
        }
        Opened::BatchDir(dir) => control::request_push(
            stream,
            &Request::PushTo {
                target: TargetSpec::BatchDir(dir),
                options,
            },
            &[],
            progress,
        ),
        Opened::Remote {
            name,
            replica,
            reader,
            writer,
            keys,
            ssh: child,
        } => {
            *ssh = child;
            let request = Request::PushTo {
                target: TargetSpec::Connection {
                    name,
                    replica,
                    keys,
                    keep,
                },
                options,
            };
            let fds = [reader.as_raw_fd(), writer.as_raw_fd()];
            // Sent; this process's copies close here so that only the
            // mount process holds the stream.
            let sent = control::request_push(stream, &request, &fds, progress);
            drop((reader, writer));
            sent
        }
    }
}

/// Opens the unmounted journal in `state` (recovering it if need be),
/// pushes, and closes it.
fn offline(
    state: &Path,
    source: &Path,
    opened: Opened,
    ssh: &mut Option<SshProcess>,
    options: &PushOptions,
    progress: &mut dyn FnMut(Progress),
) -> anyhow::Result<PushReport> {
    let state = state_dir::absolute(state)?;
    // Opening creates a journal where there is none: refuse instead.
    if !state.join("journal").is_dir() {
        bail!(
            "{} is not a ferry state directory (it holds no journal)",
            state.display()
        );
    }
    let source =
        std::fs::canonicalize(source).with_context(|| format!("SOURCE {}", source.display()))?;
    let target = match opened {
        // Refused before the journal is opened (opening records a session).
        Opened::Local(replica) => {
            Target::Local(control::check_replica(&replica, &source, None, &state)?)
        }
        Opened::BatchDir(dir) => {
            Target::BatchDir(control::check_replica(&dir, &source, None, &state)?)
        }
        Opened::Remote {
            name,
            replica,
            reader,
            writer,
            keys,
            ssh: child,
        } => {
            *ssh = child;
            Target::Remote(RemoteStream::new(name, replica, reader, writer, keys))
        }
    };
    let (journal, recovery) =
        Journal::open(&state, &source, &OpenOptions::default()).map_err(|e| match e {
            JournalError::Locked { .. } => in_use(&state, e),
            e => anyhow!(e).context(format!("opening the journal in {}", state.display())),
        })?;
    if recovery.unclean {
        eprintln!(
            "ferry: recovered from an unclean stop: replayed {} records, scanned {} entries, recorded {} changes",
            recovery.replayed, recovery.scanned, recovery.reconciled
        );
    }
    let pusher = control::Pusher::new(journal.clone(), source, None, state.clone());
    let pushed = pusher.push(target, options, progress);
    drop(pusher);
    let closed = journal
        .close()
        .with_context(|| format!("closing the journal in {}", state.display()));
    let report = pushed?;
    closed?;
    Ok(report)
}

/// The error for a state directory whose journal is locked, naming the
/// mount that holds it when mountinfo shows one.
fn in_use(state: &Path, err: JournalError) -> anyhow::Error {
    let mounted = mounts::all().ok().and_then(|all| {
        all.into_iter()
            .rev()
            .find(|m| m.ferry_state().as_deref() == Some(state))
    });
    match mounted {
        Some(m) => anyhow!(
            "state directory {} is in use by the ferry mount at {}: push through it with `ferry push {} REPLICA_DIR`",
            state.display(),
            m.mountpoint.display(),
            m.mountpoint.display()
        ),
        None => anyhow!(err),
    }
}

fn print_report(report: &PushReport, raw: &Value, args: &PushArgs) -> anyhow::Result<()> {
    let mut text = String::new();
    if args.json {
        text = format!("{raw}\n");
    } else {
        text += &summary(report);
        text.push('\n');
        if args.stats {
            text += &table(report, raw);
        }
        for w in &report.warnings {
            eprintln!("ferry: warning: {w}");
        }
    }
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        // The push is done; a reader that went away does not undo it.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other.context("writing to stdout"),
    }
}

/// The one line printed by default.
fn summary(r: &PushReport) -> String {
    if r.ops == 0 {
        return format!(
            "nothing to push: the replica is up to date at seq {}{}",
            r.to_seq,
            if r.dry_run { " (dry run)" } else { "" }
        );
    }
    let mut kinds = vec![
        format!("{} delta", r.delta_files),
        format!("{} full", r.full_files),
    ];
    if r.range_files > 0 {
        kinds.push(format!("{} in place", r.range_files));
    }
    if r.repaired_files > 0 {
        kinds.push(format!("{} repaired", r.repaired_files));
    }
    if r.resumed_files > 0 {
        kinds.push(format!(
            "{} kept by the replica from a cut-off push ({})",
            r.resumed_files,
            bytes(r.resumed_bytes)
        ));
    }
    let what = format!(
        "seq {}..{}: {} created, {} removed, {} renames, {} files",
        r.from_seq,
        r.to_seq,
        r.files_created,
        r.files_removed,
        r.renames,
        r.delta_files + r.full_files + r.range_files,
    );
    let kinds = kinds.join(", ");
    if let Some(file) = &r.batch_file {
        return format!(
            "wrote {file}, {what} ({kinds}), {}, {}; apply it with `ferry apply`",
            bytes(r.bytes_sent),
            millis(r.elapsed_ms),
        );
    }
    format!(
        "{} {what} sent ({kinds}), {} sent, commit window {}, {}{}",
        if r.dry_run { "would push" } else { "pushed" },
        bytes(r.bytes_sent),
        micros(r.commit_window_us),
        millis(r.elapsed_ms),
        if r.dry_run {
            " (dry run: nothing applied)"
        } else {
            ""
        }
    )
}

/// Every figure of the report, one per line; fields this version does not
/// know are listed at the end as they came.
fn table(r: &PushReport, raw: &Value) -> String {
    let mut rows: Vec<(&str, &str, String)> = vec![
        ("from_seq", "from seq", r.from_seq.to_string()),
        ("to_seq", "to seq", r.to_seq.to_string()),
        ("files_created", "created", r.files_created.to_string()),
        ("files_removed", "removed", r.files_removed.to_string()),
        ("renames", "renames", r.renames.to_string()),
        ("delta_files", "delta files", r.delta_files.to_string()),
        ("full_files", "full files", r.full_files.to_string()),
        ("range_files", "in-place files", r.range_files.to_string()),
        (
            "repaired_files",
            "repaired files",
            r.repaired_files.to_string(),
        ),
        (
            "resumed_files",
            "kept by the replica",
            r.resumed_files.to_string(),
        ),
        (
            "resumed_bytes",
            "  their bytes",
            exact_bytes(r.resumed_bytes),
        ),
        ("ops", "operations", r.ops.to_string()),
        (
            "content_bytes_read",
            "content read",
            exact_bytes(r.content_bytes_read),
        ),
        ("bytes_sent", "bytes sent", exact_bytes(r.bytes_sent)),
        (
            "commit_window_us",
            "commit window",
            micros(r.commit_window_us),
        ),
        ("elapsed_ms", "elapsed", millis(r.elapsed_ms)),
        ("staging_ms", "  of it staging", millis(r.staging_ms)),
        ("sync_ms", "  of it syncing", millis(r.sync_ms)),
        (
            "dry_run",
            "dry run",
            if r.dry_run { "yes" } else { "no" }.into(),
        ),
        ("warnings", "warnings", r.warnings.len().to_string()),
    ];
    if let Some(file) = &r.batch_file {
        rows.push(("batch_file", "batch file", file.clone()));
    }
    let mut extra = Vec::new();
    if let Value::Object(fields) = raw {
        for (key, value) in fields {
            if !rows.iter().any(|(k, _, _)| k == key) {
                extra.push((key.as_str(), key.as_str(), value.to_string()));
            }
        }
    }
    let all: Vec<_> = rows
        .iter()
        .map(|(k, l, v)| (*k, *l, v.as_str()))
        .chain(extra.iter().map(|(k, l, v)| (*k, *l, v.as_str())))
        .collect();
    let width = all.iter().map(|(_, l, _)| l.len()).max().unwrap_or(0) + 1;
    all.iter()
        .map(|(_, label, value)| format!("  {:<width$} {value}\n", format!("{label}:")))
        .collect()
}

fn exact_bytes(n: u64) -> String {
    if n < 1024 {
        bytes(n)
    } else {
        format!("{} ({n} bytes)", bytes(n))
    }
}

fn micros(us: u64) -> String {
    if us < 10_000 {
        format!("{us} us")
    } else {
        format!("{:.1} ms", us as f64 / 1000.0)
    }
}

fn millis(ms: u64) -> String {
    if ms < 10_000 {
        format!("{ms} ms")
    } else {
        format!("{:.1} s", ms as f64 / 1000.0)
    }
}

/// A progress bar on stderr, redrawn in place with `\r`.
struct Bar {
    enabled: bool,
    last_draw: Option<Instant>,
    drawn: Option<Progress>,
    pending: Option<Progress>,
    width: usize,
}

impl Bar {
    const INTERVAL: Duration = Duration::from_millis(100);

    fn new(enabled: bool) -> Bar {
        Bar {
            enabled,
            last_draw: None,
            drawn: None,
            pending: None,
            width: 0,
        }
    }

    fn update(&mut self, p: Progress) {
        if !self.enabled {
            return;
        }
        self.pending = Some(p);
        if self.last_draw.is_none_or(|t| t.elapsed() >= Self::INTERVAL) {
            self.draw();
        }
    }

    fn draw(&mut self) {
        let Some(p) = self.pending.take() else {
            return;
        };
        let fraction = if p.bytes_total > 0 {
            p.bytes_done as f64 / p.bytes_total as f64
        } else if p.files_total > 0 {
            p.files_done as f64 / p.files_total as f64
        } else {
            1.0
        }
        .clamp(0.0, 1.0);
        const CELLS: usize = 24;
        let full = (fraction * CELLS as f64).round() as usize;
        let line = format!(
            "[{}{}] {:>3}%  {}/{} files  {}/{}",
            "#".repeat(full),
            "-".repeat(CELLS - full),
            (fraction * 100.0).floor() as u32,
            p.files_done,
            p.files_total,
            bytes(p.bytes_done),
            bytes(p.bytes_total),
        );
        // Pad over what a longer previous line left behind.
        let pad = self.width.saturating_sub(line.len());
        self.width = line.len();
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r{line}{}", " ".repeat(pad));
        let _ = err.flush();
        self.last_draw = Some(Instant::now());
        self.drawn = Some(p);
    }

    /// Draws the last state and ends the line.
    fn finish(&mut self) {
        if !self.enabled {
            return;
        }
        self.draw();
        if self.drawn.is_some() {
            let _ = writeln!(std::io::stderr());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations_that_look_remote_are_told_apart_from_local_paths() {
        assert!(looks_remote("host:/backup"));
        assert!(looks_remote("user@host:backup"));
        assert!(!looks_remote("./a:b"));
        assert!(!looks_remote("/abs/a:b"));
        assert!(!looks_remote("plain"));
        assert!(!looks_remote(":x"));
        let parse = |s: &str| Destination::parse(Some(Path::new(s)), None);
        assert_eq!(
            parse("me@nosuchhost-ferry-test:/x").unwrap(),
            Destination::Ssh {
                host: "me@nosuchhost-ferry-test".into(),
                path: "/x".into()
            }
        );
        assert_eq!(
            parse("h:").unwrap(),
            Destination::Ssh {
                host: "h".into(),
                path: ".".into()
            }
        );
        assert_eq!(
            parse("ferry://h:1/n").unwrap(),
            Destination::Daemon {
                address: "h:1".into(),
                name: "n".into()
            }
        );
        for bad in [
            "ferry://h:1",
            "ferry://h:1/",
            "ferry:///n",
            "ferry://h:1/a/b",
            "-oProxyCommand=touch /tmp/x:/r",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        // An existing directory named like a remote is a local path.
        let dir = tempfile::tempdir().unwrap();
        let local = dir.path().join("host:x");
        std::fs::create_dir(&local).unwrap();
        assert_eq!(
            Destination::parse(Some(&local), None).unwrap(),
            Destination::Local(std::fs::canonicalize(&local).unwrap())
        );
        let batches = dir.path().join("batches");
        assert_eq!(
            Destination::parse(None, Some(&batches)).unwrap(),
            Destination::BatchDir(std::fs::canonicalize(&batches).unwrap())
        );
        assert!(Destination::parse(Some(&local), Some(&batches)).is_err());
    }

    #[test]
    fn the_summary_reads_as_the_issue_shows() {
        let r = PushReport {
            from_seq: 12,
            to_seq: 40,
            files_created: 3,
            files_removed: 1,
            renames: 2,
            delta_files: 1,
            full_files: 4,
            bytes_sent: 12_595,
            commit_window_us: 850,
            elapsed_ms: 42,
            ops: 9,
            ..PushReport::default()
        };
        assert_eq!(
            summary(&r),
            "pushed seq 12..40: 3 created, 1 removed, 2 renames, 5 files sent (1 delta, 4 full), 12.3 KiB sent, commit window 850 us, 42 ms"
        );
        let raw = serde_json::to_value(&r).unwrap();
        let t = table(&r, &raw);
        let fields = raw.as_object().expect("an object").len();
        assert_eq!(t.lines().count(), fields, "one line per field: {t}");
        let batch = PushReport {
            batch_file: Some("/b/00000000000000000012-00000000000000000040.ferry".into()),
            ..r.clone()
        };
        assert_eq!(
            summary(&batch),
            "wrote /b/00000000000000000012-00000000000000000040.ferry, seq 12..40: 3 created, 1 removed, \
             2 renames, 5 files (1 delta, 4 full), 12.3 KiB, 42 ms; apply it with `ferry apply`"
        );
        let batch_raw = serde_json::to_value(&batch).unwrap();
        assert_eq!(table(&batch, &batch_raw).lines().count(), fields + 1);
        let mut raw = raw;
        raw["future_field"] = 7.into();
        let t = table(&r, &raw);
        let line = t
            .lines()
            .find(|l| l.contains("future_field:"))
            .expect("{t}");
        assert!(line.ends_with(" 7"), "{t}");
    }
}
