//! The mount process's control socket, through which `ferry push
//! MOUNTPOINT ...` asks the process that holds the journal to push.
//!
//! The socket is `<state dir>/control.sock` (mode 0600, in the 0700 state
//! directory: root only). A connection carries one request, one JSON line:
//!
//! ```text
//! {"push":{"replica":"/abs/path","options":{"dry_run":false,"progress":true}}}
//! {"push_to":{"target":{"batch_dir":"/abs/dir"},"options":{...}}}
//! {"push_to":{"target":{"connection":{"name":"host:/path","replica":"","keys":null,"keep":{"key":"...","seconds":60}}},"options":{...}}}
//! {"push_to":{"target":{"kept":{"key":"..."}},"options":{...}}}
//! ```
//!
//! A `connection` request comes with two descriptors (`SCM_RIGHTS`, sent
//! with the line's first byte): the reading and the writing end of a
//! stream to a receiver, which the `ferry push` process opened (ssh
//! started with the user's environment and terminal, or a daemon's socket
//! after the handshake, whose session `keys` the request then carries).
//! The mount process speaks the protocol over them directly. With `keep`,
//! a connection that pushed successfully is released (the replica
//! unlocked) and kept for `seconds` under `key`; a `kept` request pushes
//! through it, or answers `"not_kept"` when there is none (or it died), and
//! the client opens a new one. Continuous pushes over ssh so pay ssh's
//! connection setup once.
//!
//! and gets back JSON lines: `{"progress":{...}}` zero or more times (only
//! when its options ask for `progress`), then
//! exactly one `{"done":{...PushReport...}}`, `{"error":"message"}` or
//! `"not_kept"`; then
//! the server closes the connection. A client that goes away mid-push does
//! not stop the push: it completes (or fails safely) and its replies are
//! dropped.
//!
//! This module owns the protocol ([`Request`], [`Reply`]), the server (one
//! thread accepts, one thread per connection), the client, and [`Pusher`]:
//! a journal with the checks every push makes, used by the server and by
//! an offline `ferry push --state`.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use journal::Journal;
use replicator::push::{Progress, PushOptions, PushReport};
use replicator::remote::Connection;
use serde::{Deserialize, Serialize};

use crate::kept::Kept;
use crate::remote::auth::{MacReader, MacWriter, SessionKeys};

/// The socket's name in the state directory.
pub const SOCKET_NAME: &str = "control.sock";

/// A request line may not be longer than this.
const MAX_REQUEST: u64 = 64 * 1024;
/// How long a connection may take to send its request line.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one reply may wait for a client that does not read; after
/// that the client is treated as gone.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Progress lines are sent at most this often (plus the last one).
const PROGRESS_INTERVAL: Duration = Duration::from_millis(100);

/// What a client asks for: one request per connection.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Push to a local replica directory (an absolute path).
    Push {
        replica: PathBuf,
        #[serde(default)]
        options: PushOptions,
    },
    /// Push to another kind of destination.
    PushTo {
        target: TargetSpec,
        #[serde(default)]
        options: PushOptions,
    },
}

/// A destination other than a local replica, as a request names it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum TargetSpec {
    /// A directory of batch files (an absolute path).
    BatchDir(PathBuf),
    /// The receiver at the other end of the descriptors sent with the
    /// request: `name` names it in the journal and in messages, `replica`
    /// is what its `Hello` asks for, `keys` authenticate a daemon's stream.
    Connection {
        name: String,
        replica: String,
        keys: Option<SessionKeys>,
        /// Keep the connection after a successful push.
        #[serde(default)]
        keep: Option<Keep>,
    },
    /// The connection an earlier push kept under `key`.
    Kept { key: String },
}

/// How a connection is kept after its push: under `key` (what a later
/// request names it by: the destination and how it was reached), for
/// `seconds` after the push.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Keep {
    pub key: String,
    pub seconds: u64,
}

/// The answer to a `kept` request when no connection is kept under its key
/// (or the kept one no longer works): open a new one.
#[derive(Debug)]
pub struct NotKept;

impl std::fmt::Display for NotKept {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("no connection is kept for this destination")
    }
}

impl std::error::Error for NotKept {}

/// Where a push goes.
pub enum Target {
    Local(PathBuf),
    BatchDir(PathBuf),
    Remote(RemoteStream),
    /// The connection kept under this key.
    Kept(String),
}

/// A stream to a receiver.
pub struct RemoteStream {
    /// Names the receiver in the journal and in messages.
    pub name: String,
    /// What to ask the receiver for (a daemon's replica name; empty over
    /// ssh).
    pub replica: String,
    pub reader: Box<dyn Read + Send>,
    pub writer: Box<dyn Write + Send>,
    /// Keep the connection after a successful push.
    pub keep: Option<Keep>,
}

impl RemoteStream {
    /// The stream over `reader` and `writer`, authenticated with a daemon
    /// session's `keys` when there are some.
    pub fn new(
        name: String,
        replica: String,
        reader: std::fs::File,
        writer: std::fs::File,
        keys: Option<SessionKeys>,
    ) -> RemoteStream {
        let (reader, writer): (Box<dyn Read + Send>, Box<dyn Write + Send>) = match keys {
            Some(keys) => (
                Box::new(MacReader::new(reader, &keys)),
                Box::new(MacWriter::new(writer, &keys)),
            ),
            None => (Box::new(reader), Box::new(writer)),
        };
        RemoteStream {
            name,
            replica,
            reader,
            writer,
            keep: None,
        }
    }
}

impl Target {
    fn describe(&self) -> String {
        match self {
            Target::Local(p) | Target::BatchDir(p) => p.display().to_string(),
            Target::Remote(r) => r.name.clone(),
            Target::Kept(key) => format!("the connection kept for {key}"),
        }
    }
}

/// One line of the answer. `R` is the report: [`PushReport`] on the
/// server; the client keeps it as a JSON value so that it can print every
/// field the mount reported.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply<R> {
    Progress(Progress),
    Done(R),
    Error(String),
    /// See [`NotKept`].
    NotKept,
}

/// Does a push for a request: the server's work, behind a trait so that
/// the protocol is testable without a journal.
pub trait Handler: Send + Sync + 'static {
    fn push(
        &self,
        target: Target,
        options: &PushOptions,
        progress: &mut dyn FnMut(Progress),
    ) -> anyhow::Result<PushReport>;
}

/// A journal and the trees a replica must stay out of. Pushes run one at a
/// time.
pub struct Pusher {
    journal: Journal,
    source: PathBuf,
    mountpoint: Option<PathBuf>,
    state: PathBuf,
    one_at_a_time: Mutex<()>,
    /// Connections kept by their pushes' `keep`, by key.
    kept: Kept<Parked>,
}

/// A connection to a receiver, past its `Ready`.
struct Open {
    /// Names the receiver in the journal and in messages.
    name: String,
    /// What its `Hello` asks for.
    replica: String,
    conn: Connection<Box<dyn Read + Send>, Box<dyn Write + Send>>,
}

/// A connection released after its push and kept for the next one.
struct Parked {
    keep: Keep,
    open: Open,
}

impl Pusher {
    /// `source` and `state` canonical; `mountpoint` when the journal is
    /// mounted.
    pub fn new(
        journal: Journal,
        source: PathBuf,
        mountpoint: Option<PathBuf>,
        state: PathBuf,
    ) -> Pusher {
        Pusher {
            journal,
            source,
            mountpoint,
            state,
            one_at_a_time: Mutex::new(()),
            kept: Kept::new(close_parked),
        }
    }

    /// Keeps `open` (released) under `keep.key` for `keep.seconds`,
    /// closing the one kept there before; it is closed then unless a push
    /// has taken it.
    fn park(&self, keep: Keep, open: Open) {
        let (key, time) = (keep.key.clone(), Duration::from_secs(keep.seconds));
        self.kept.park(key, time, Parked { keep, open });
    }
}

/// Ends a kept connection (`Done`: its receiver exits; dropping the stream
/// then ends ssh).
fn close_parked(Parked { open, .. }: Parked) {
    if let Err(e) = open.conn.close() {
        tracing::debug!(destination = %open.name, error = %e, "closing a kept connection");
    }
}

impl Handler for Pusher {
    fn push(
        &self,
        target: Target,
        options: &PushOptions,
        progress: &mut dyn FnMut(Progress),
    ) -> anyhow::Result<PushReport> {
        let target = match target {
            Target::Local(replica) => Target::Local(check_replica(
                &replica,
                &self.source,
                self.mountpoint.as_deref(),
                &self.state,
            )?),
            Target::BatchDir(dir) => Target::BatchDir(check_replica(
                &dir,
                &self.source,
                self.mountpoint.as_deref(),
                &self.state,
            )?),
            remote => remote,
        };
        // A poisoned lock only means an earlier push panicked; the journal
        // and the replica protect their own consistency.
        // A poisoned lock only means a push panicked; pushing goes on.
        let _one = self
            .one_at_a_time
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let name = target.describe();
        tracing::info!(destination = %name, dry_run = options.dry_run, "push");
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.push_to(target, options, progress)
        }));
        let report = match outcome {
            Ok(result) => result?,
            Err(panic) => bail!("the push failed unexpectedly: {}", panic_message(&*panic)),
        };
        tracing::info!(destination = %name, ?report, "pushed");
        Ok(report)
    }
}

impl Pusher {
    fn push_to(
        &self,
        target: Target,
        options: &PushOptions,
        progress: &mut dyn FnMut(Progress),
    ) -> anyhow::Result<PushReport> {
        use replicator::push;
        let (journal, source) = (&self.journal, self.source.as_path());
        Ok(match target {
            Target::Local(replica) => push::push(journal, source, &replica, options, progress)?,
            Target::BatchDir(dir) => {
                push::push_batch_dir(journal, source, &dir, options, progress)?
            }
            Target::Remote(stream) => {
                let (conn, ready) = Connection::open(stream.reader, stream.writer, &stream.replica)
                    .with_context(|| format!("the replica {}", stream.name))?;
                let open = Open {
                    name: stream.name,
                    replica: stream.replica,
                    conn,
                };
                self.push_connection(open, ready, stream.keep, options, progress)?
            }
            Target::Kept(key) => {
                let Some(Parked { keep, mut open }) = self.kept.take(&key) else {
                    return Err(NotKept.into());
                };
                let ready = match open.conn.reopen(&open.replica) {
                    Ok(ready) => ready,
                    Err(e) => {
                        // Ended by the other side, or ssh gone: a new one.
                        tracing::info!(destination = %open.name, error = %e, "the kept connection no longer works");
                        return Err(NotKept.into());
                    }
                };
                let mut report =
                    self.push_connection(open, ready, Some(keep), options, progress)?;
                report.reused_connection = true;
                report
            }
        })
    }

    /// Pushes through an open connection; then keeps it (released) as
    /// `keep` says, or ends it.
    fn push_connection(
        &self,
        mut open: Open,
        ready: replicator::remote::Ready,
        keep: Option<Keep>,
        options: &PushOptions,
        progress: &mut dyn FnMut(Progress),
    ) -> anyhow::Result<PushReport> {
        let report = replicator::push::push_remote(
            &self.journal,
            &self.source,
            &mut open.conn,
            ready,
            &open.name,
            options,
            progress,
        )?;
        let context = || format!("the replica {}", open.name);
        match keep.filter(|k| k.seconds > 0) {
            None => open.conn.close().with_context(context)?,
            Some(keep) => {
                open.conn.release().with_context(context)?;
                self.park(keep, open);
            }
        }
        Ok(report)
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".into())
}

/// The canonical replica directory, refused unless it is an existing
/// directory outside the source, the mountpoint and the state directory.
pub fn check_replica(
    replica: &Path,
    source: &Path,
    mountpoint: Option<&Path>,
    state: &Path,
) -> anyhow::Result<PathBuf> {
    if !replica.is_absolute() {
        bail!("replica {} is not an absolute path", replica.display());
    }
    let replica = std::fs::canonicalize(replica)
        .with_context(|| format!("replica directory {}", replica.display()))?;
    if !replica.is_dir() {
        bail!("replica {} is not a directory", replica.display());
    }
    let mut trees = vec![(source, "SOURCE"), (state, "the state directory")];
    if let Some(m) = mountpoint {
        trees.push((m, "MOUNTPOINT"));
    }
    check_replica_outside(&replica, &trees)?;
    Ok(replica)
}

/// Refuses a replica inside one of `trees` or containing one: it would
/// replicate into itself (or overwrite the journal).
pub fn check_replica_outside(replica: &Path, trees: &[(&Path, &str)]) -> anyhow::Result<()> {
    for (tree, what) in trees {
        if replica.starts_with(tree) {
            bail!(
                "replica {} is inside {what} {}: it would replicate into itself; choose a directory outside it",
                replica.display(),
                tree.display()
            );
        }
        if tree.starts_with(replica) {
            bail!(
                "replica {} contains {what} {}: it would replicate into itself; choose a directory outside it",
                replica.display(),
                tree.display()
            );
        }
    }
    Ok(())
}

/// A socket path usable with bind and connect: `sun_path` holds 108 bytes,
/// so a longer path is reached through `/proc/self/fd/<dir>/` instead (the
/// descriptor must stay open while the address is used).
fn socket_address(path: &Path) -> io::Result<(PathBuf, Option<OwnedFd>)> {
    const SUN_PATH_MAX: usize = 100;
    if path.as_os_str().len() < SUN_PATH_MAX {
        return Ok((path.to_path_buf(), None));
    }
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Ok((path.to_path_buf(), None));
    };
    let fd = nix::fcntl::open(
        dir,
        nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_DIRECTORY | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )?;
    let short = PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd())).join(name);
    Ok((short, Some(fd)))
}

/// The listening side, running in the mount process. Dropping it stops it
/// as [`Server::finish`] does.
pub struct Server {
    path: PathBuf,
    listener: Arc<UnixListener>,
    closing: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
    connections: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Server {
    /// Listens on `path` (a stale socket there is removed: the caller holds
    /// the journal's lock, so no live mount owns it) with mode 0600.
    pub fn start(path: &Path, handler: Arc<dyn Handler>) -> anyhow::Result<Server> {
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(e).with_context(|| format!("removing the stale {}", path.display()));
            }
        }
        let (address, _dir) =
            socket_address(path).with_context(|| format!("opening {}", path.display()))?;
        let listener = UnixListener::bind(&address)
            .with_context(|| format!("listening on {}", path.display()))?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&address, std::fs::Permissions::from_mode(0o600))
                .with_context(|| format!("chmod 0600 {}", path.display()))?;
        }
        let listener = Arc::new(listener);
        let closing = Arc::new(AtomicBool::new(false));
        let connections = Arc::new(Mutex::new(Vec::new()));
        let accept = {
            let (listener, closing, connections) =
                (listener.clone(), closing.clone(), connections.clone());
            std::thread::Builder::new()
                .name("control".into())
                .spawn(move || accept_loop(&listener, &closing, &connections, &handler))
                .context("starting the control thread")?
        };
        Ok(Server {
            path: path.to_path_buf(),
            listener,
            closing,
            accept: Some(accept),
            connections,
        })
    }

    /// Stops accepting and removes the socket; requests already accepted go
    /// on.
    pub fn close(&mut self) {
        let Some(accept) = self.accept.take() else {
            return;
        };
        self.closing.store(true, Ordering::Release);
        // shutdown(2) on a listening socket wakes a blocked accept(2).
        // SAFETY: the listener's descriptor is open (we hold an Arc to it).
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        let _ = accept.join();
        let _ = std::fs::remove_file(&self.path);
    }

    /// Closes, then waits for the requests being served (a running push
    /// finishes; a client that sends nothing is cut off after a timeout).
    pub fn finish(mut self) {
        self.close();
        self.join_connections();
    }

    fn join_connections(&mut self) {
        let running: Vec<_> = std::mem::take(
            &mut *self
                .connections
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        );
        if running.iter().any(|h| !h.is_finished()) {
            tracing::info!("waiting for a running push to finish");
        }
        for h in running {
            let _ = h.join();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.close();
        self.join_connections();
    }
}

fn accept_loop(
    listener: &UnixListener,
    closing: &AtomicBool,
    connections: &Mutex<Vec<JoinHandle<()>>>,
    handler: &Arc<dyn Handler>,
) {
    loop {
        let accepted = listener.accept();
        if closing.load(Ordering::Acquire) {
            return;
        }
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                // Out of descriptors or similar: keep serving, without
                // spinning.
                tracing::warn!(error = %e, "control socket: accept failed");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let handler = handler.clone();
        let spawned = std::thread::Builder::new()
            .name("control-conn".into())
            .spawn(move || serve_connection(stream, &*handler));
        let mut running = connections
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        running.retain(|h| !h.is_finished());
        match spawned {
            Ok(h) => running.push(h),
            Err(e) => tracing::warn!(error = %e, "control socket: cannot start a thread"),
        }
    }
}

/// Sends reply lines until the client is gone; then drops them.
struct Replies<'a> {
    stream: &'a UnixStream,
    gone: bool,
    last_progress: Option<Instant>,
}

impl Replies<'_> {
    fn send<R: Serialize>(&mut self, reply: &Reply<R>) {
        if self.gone {
            return;
        }
        let mut line = serde_json::to_vec(reply).expect("replies serialize to JSON");
        line.push(b'\n');
        // Rust ignores SIGPIPE: a closed client is an EPIPE error here.
        if let Err(e) = (&mut &*self.stream).write_all(&line) {
            tracing::debug!(error = %e, "control client gone");
            self.gone = true;
        }
    }

    fn progress(&mut self, p: Progress) {
        let complete = p.files_done >= p.files_total && p.bytes_done >= p.bytes_total;
        if !complete
            && self
                .last_progress
                .is_some_and(|t| t.elapsed() < PROGRESS_INTERVAL)
        {
            return;
        }
        self.last_progress = Some(Instant::now());
        self.send(&Reply::<PushReport>::Progress(p));
    }
}

fn serve_connection(stream: UnixStream, handler: &dyn Handler) {
    let _ = stream.set_read_timeout(Some(REQUEST_TIMEOUT));
    let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
    let mut replies = Replies {
        stream: &stream,
        gone: false,
        last_progress: None,
    };
    let target = match read_request(&stream).and_then(|r| r.map(into_target).transpose()) {
        Ok(Some(r)) => r,
        Ok(None) => return,
        Err(msg) => {
            tracing::debug!(%msg, "control socket: bad request");
            replies.send(&Reply::<PushReport>::Error(msg));
            return;
        }
    };
    let (target, options) = target;
    let name = target.describe();
    let reply = match handler.push(target, &options, &mut |p| replies.progress(p)) {
        Ok(report) => Reply::Done(report),
        Err(err) if err.is::<NotKept>() => Reply::NotKept,
        Err(err) => {
            let msg = crate::one_line(&err);
            tracing::warn!(destination = %name, error = %msg, "push failed");
            Reply::Error(msg)
        }
    };
    replies.send(&reply);
}

/// The request and the descriptors that came with it as a target.
fn into_target(
    (request, mut fds): (Request, Vec<OwnedFd>),
) -> Result<(Target, PushOptions), String> {
    match request {
        Request::Push { replica, options } => Ok((Target::Local(replica), options)),
        Request::PushTo {
            target: TargetSpec::BatchDir(dir),
            options,
        } => Ok((Target::BatchDir(dir), options)),
        Request::PushTo {
            target: TargetSpec::Kept { key },
            options,
        } => Ok((Target::Kept(key), options)),
        Request::PushTo {
            target:
                TargetSpec::Connection {
                    name,
                    replica,
                    keys,
                    keep,
                },
            options,
        } => {
            if fds.len() != 2 {
                return Err(format!(
                    "bad request: a connection needs 2 descriptors, {} came",
                    fds.len()
                ));
            }
            let writer = std::fs::File::from(fds.pop().expect("two"));
            let reader = std::fs::File::from(fds.pop().expect("two"));
            let stream = RemoteStream {
                keep,
                ..RemoteStream::new(name, replica, reader, writer, keys)
            };
            Ok((Target::Remote(stream), options))
        }
    }
}

/// The request line and the descriptors sent with it; `None` when the
/// client closed without sending one.
fn read_request(stream: &UnixStream) -> Result<Option<(Request, Vec<OwnedFd>)>, String> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    let mut line = Vec::new();
    let mut fds = Vec::new();
    let mut buf = vec![0u8; 16 << 10];
    while !line.contains(&b'\n') {
        if line.len() as u64 >= MAX_REQUEST {
            return Err(format!("bad request: longer than {MAX_REQUEST} bytes"));
        }
        let mut space = nix::cmsg_space!([RawFd; 2]);
        let mut iov = [io::IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(|e| format!("reading the request: {e}"))?;
        let n = msg.bytes;
        for c in msg
            .cmsgs()
            .map_err(|e| format!("reading the request: {e}"))?
        {
            if let ControlMessageOwned::ScmRights(received) = c {
                // SAFETY: the kernel just made these descriptors ours.
                fds.extend(
                    received
                        .into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
        }
        if n == 0 {
            break;
        }
        line.extend_from_slice(&buf[..n]);
    }
    if line.is_empty() {
        return Ok(None);
    }
    let end = line.iter().position(|&b| b == b'\n').unwrap_or(line.len());
    serde_json::from_slice(&line[..end])
        .map(|r| Some((r, fds)))
        .map_err(|e| format!("bad request: {e}"))
}

/// Connects to a control socket.
pub fn connect(path: &Path) -> io::Result<UnixStream> {
    let (address, _dir) = socket_address(path)?;
    UnixStream::connect(address)
}

/// Sends one request (with `fds`, for a connection) and reads the
/// answer, passing progress on; returns the report as the server sent it.
/// An `{"error":...}` answer is returned as an error with the server's
/// message.
pub fn request_push(
    stream: UnixStream,
    request: &Request,
    fds: &[RawFd],
    progress: &mut dyn FnMut(Progress),
) -> anyhow::Result<serde_json::Value> {
    use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
    let mut line = serde_json::to_vec(request).context("encoding the request")?;
    line.push(b'\n');
    let cmsgs: Vec<ControlMessage> = if fds.is_empty() {
        Vec::new()
    } else {
        vec![ControlMessage::ScmRights(fds)]
    };
    // The descriptors go with the first byte; the rest of the line after.
    let sent = sendmsg::<()>(
        stream.as_raw_fd(),
        &[io::IoSlice::new(&line[..1])],
        &cmsgs,
        MsgFlags::empty(),
        None,
    )
    .map_err(io::Error::from)
    .and_then(|_| (&stream).write_all(&line[1..]));
    sent.context("sending the request to the mount process")?;
    let reader = BufReader::new(&stream);
    for line in reader.lines() {
        let line = line.context("reading the mount process's answer")?;
        if line.trim().is_empty() {
            continue;
        }
        let reply: Reply<serde_json::Value> = serde_json::from_str(&line)
            .with_context(|| format!("the mount process answered something unexpected: {line}"))?;
        match reply {
            Reply::Progress(p) => progress(p),
            Reply::Done(report) => return Ok(report),
            Reply::Error(msg) => return Err(anyhow!(msg)),
            Reply::NotKept => return Err(NotKept.into()),
        }
    }
    bail!("the mount process closed the connection before the push finished (see its log)")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sends `steps` progress lines (sleeping `pause` between them), then
    /// answers with a report whose `ops` is the number of the call.
    struct Fake {
        steps: u64,
        pause: Duration,
        calls: Mutex<u64>,
        finished: Mutex<u64>,
    }

    impl Fake {
        fn new(steps: u64, pause: Duration) -> Arc<Fake> {
            Arc::new(Fake {
                steps,
                pause,
                calls: Mutex::new(0),
                finished: Mutex::new(0),
            })
        }
    }

    impl Handler for Fake {
        fn push(
            &self,
            target: Target,
            options: &PushOptions,
            progress: &mut dyn FnMut(Progress),
        ) -> anyhow::Result<PushReport> {
            if target.describe() == "/fail" {
                bail!("no such replica");
            }
            if let Target::Kept(_) = target {
                return Err(NotKept.into());
            }
            if let Target::Remote(mut r) = target {
                // Echo what the stream brings, and count it.
                let mut got = Vec::new();
                r.reader.read_to_end(&mut got)?;
                r.writer.write_all(&got)?;
                r.writer.flush()?;
                return Ok(PushReport {
                    ops: got.len() as u64,
                    ..PushReport::default()
                });
            }
            let call = {
                let mut c = self.calls.lock().unwrap();
                *c += 1;
                *c
            };
            for i in 1..=self.steps {
                progress(Progress {
                    files_total: self.steps,
                    files_done: i,
                    bytes_total: self.steps * 10,
                    bytes_done: i * 10,
                });
                std::thread::sleep(self.pause);
            }
            *self.finished.lock().unwrap() += 1;
            Ok(PushReport {
                ops: call,
                dry_run: options.dry_run,
                ..PushReport::default()
            })
        }
    }

    fn local(replica: &str, dry_run: bool) -> Request {
        Request::Push {
            replica: replica.into(),
            options: PushOptions {
                dry_run,
                ..PushOptions::default()
            },
        }
    }

    #[test]
    fn a_connection_request_hands_its_descriptors_over() {
        let dir = tempfile::tempdir().unwrap();
        let fake = Fake::new(0, Duration::ZERO);
        let (server, path) = start(dir.path(), &fake);
        let (to_read, mut feed) = std::io::pipe().unwrap();
        let (mut answer, to_write) = std::io::pipe().unwrap();
        feed.write_all(b"through the pipe").unwrap();
        drop(feed);
        let request = Request::PushTo {
            target: TargetSpec::Connection {
                name: "host:/r".into(),
                replica: String::new(),
                keys: None,
                keep: None,
            },
            options: PushOptions::default(),
        };
        let report = request_push(
            connect(&path).unwrap(),
            &request,
            &[to_read.as_raw_fd(), to_write.as_raw_fd()],
            &mut |_| {},
        )
        .unwrap();
        drop((to_read, to_write));
        assert_eq!(report["ops"], 16);
        let mut echoed = Vec::new();
        answer.read_to_end(&mut echoed).unwrap();
        assert_eq!(echoed, b"through the pipe");
        // Without its descriptors, a connection request is refused.
        let err = request_push(connect(&path).unwrap(), &request, &[], &mut |_| {}).unwrap_err();
        assert!(err.to_string().contains("2 descriptors"), "{err}");
        server.finish();
    }

    fn start(dir: &Path, fake: &Arc<Fake>) -> (Server, PathBuf) {
        let path = dir.join(SOCKET_NAME);
        let server = Server::start(&path, fake.clone()).expect("start the server");
        (server, path)
    }

    fn raw_exchange(path: &Path, request: &[u8]) -> Vec<serde_json::Value> {
        let mut s = connect(path).expect("connect");
        s.write_all(request).unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        text.lines()
            .map(|l| serde_json::from_str(l).expect("a JSON line"))
            .collect()
    }

    #[test]
    fn request_and_reply_lines_have_the_documented_shape() {
        let req = Request::Push {
            replica: "/r".into(),
            options: PushOptions {
                dry_run: true,
                progress: true,
            },
        };
        let v = serde_json::to_value(&req).unwrap();
        assert_eq!(v["push"]["replica"], "/r");
        assert_eq!(v["push"]["options"]["dry_run"], true);
        assert_eq!(v["push"]["options"]["progress"], true);
        let parsed: Request = serde_json::from_str(r#"{"push":{"replica":"/r"}}"#).unwrap();
        let Request::Push { options, .. } = parsed else {
            panic!("not a push: {parsed:?}");
        };
        assert!(!options.dry_run);
        // Options a client leaves out keep their defaults.
        let parsed: Request =
            serde_json::from_str(r#"{"push":{"replica":"/r","options":{"dry_run":true}}}"#)
                .unwrap();
        let Request::Push { options, .. } = parsed else {
            panic!("not a push: {parsed:?}");
        };
        assert!(options.dry_run && !options.progress);
        let v = serde_json::to_value(Request::PushTo {
            target: TargetSpec::BatchDir("/b".into()),
            options: PushOptions::default(),
        })
        .unwrap();
        assert_eq!(v["push_to"]["target"]["batch_dir"], "/b");
        let v = serde_json::to_value(Request::PushTo {
            target: TargetSpec::Connection {
                name: "h:/r".into(),
                replica: String::new(),
                keys: None,
                keep: None,
            },
            options: PushOptions::default(),
        })
        .unwrap();
        assert_eq!(v["push_to"]["target"]["connection"]["name"], "h:/r");
        let done = serde_json::to_value(Reply::Done(PushReport::default())).unwrap();
        assert!(done["done"]["to_seq"].is_u64());
        let err = serde_json::to_value(Reply::<PushReport>::Error("x".into())).unwrap();
        assert_eq!(err, serde_json::json!({"error": "x"}));
        let kept: Request =
            serde_json::from_str(r#"{"push_to":{"target":{"kept":{"key":"h:/r"}}}}"#).unwrap();
        assert!(matches!(
            kept,
            Request::PushTo { target: TargetSpec::Kept { ref key }, .. } if key == "h:/r"
        ));
        let keep: Request = serde_json::from_str(
            r#"{"push_to":{"target":{"connection":{"name":"h:/r","replica":"","keys":null,"keep":{"key":"k","seconds":60}}}}}"#,
        )
        .unwrap();
        let Request::PushTo {
            target: TargetSpec::Connection { keep, .. },
            ..
        } = keep
        else {
            panic!("not a connection: {keep:?}");
        };
        assert_eq!(keep.unwrap().seconds, 60);
        let not_kept = serde_json::to_value(Reply::<PushReport>::NotKept).unwrap();
        assert_eq!(not_kept, serde_json::json!("not_kept"));
    }

    #[test]
    fn a_kept_request_without_a_kept_connection_is_answered_not_kept() {
        let dir = tempfile::tempdir().unwrap();
        let fake = Fake::new(0, Duration::ZERO);
        let (server, path) = start(dir.path(), &fake);
        let request = Request::PushTo {
            target: TargetSpec::Kept { key: "h:/r".into() },
            options: PushOptions::default(),
        };
        let err = request_push(connect(&path).unwrap(), &request, &[], &mut |_| {}).unwrap_err();
        assert!(err.is::<NotKept>(), "{err:#}");
        server.finish();
    }

    #[test]
    fn push_round_trip_with_progress_and_socket_mode() {
        let dir = tempfile::tempdir().unwrap();
        let fake = Fake::new(3, Duration::ZERO);
        let (server, path) = start(dir.path(), &fake);
        {
            use std::os::unix::fs::{FileTypeExt, PermissionsExt};
            let md = std::fs::metadata(&path).unwrap();
            assert!(md.file_type().is_socket());
            assert_eq!(md.permissions().mode() & 0o777, 0o600);
        }
        let mut seen = Vec::new();
        let report = request_push(connect(&path).unwrap(), &local("/r", true), &[], &mut |p| {
            seen.push(p)
        })
        .unwrap();
        assert_eq!(report["ops"], 1);
        assert_eq!(report["dry_run"], true);
        // The first and the complete progress are always sent.
        assert_eq!(seen.first().map(|p| p.files_done), Some(1));
        assert_eq!(seen.last().map(|p| p.files_done), Some(3));

        let err = request_push(
            connect(&path).unwrap(),
            &local("/fail", false),
            &[],
            &mut |_| {},
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "no such replica");
        server.finish();
        assert!(!path.exists(), "the socket is removed at stop");
    }

    #[test]
    fn bad_requests_get_an_error_line_and_the_server_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let fake = Fake::new(0, Duration::ZERO);
        let (server, path) = start(dir.path(), &fake);
        for garbage in [
            &b"this is not json\n"[..],
            b"{\"pull\":{}}\n",
            b"{\"push\":{}}\n",
            b"\xff\xfe\n",
        ] {
            let replies = raw_exchange(&path, garbage);
            assert_eq!(replies.len(), 1, "{replies:?}");
            let msg = replies[0]["error"].as_str().expect("an error reply");
            assert!(msg.starts_with("bad request"), "{msg}");
        }
        // Too long, without a newline.
        let long = vec![b'x'; MAX_REQUEST as usize + 10];
        let mut s = connect(&path).unwrap();
        let _ = s.write_all(&long);
        let mut text = String::new();
        let _ = s.read_to_string(&mut text);
        assert!(text.contains("\"error\""), "{text}");
        // A client that says nothing and leaves.
        drop(connect(&path).unwrap());
        // Still serving.
        let replies = raw_exchange(&path, b"{\"push\":{\"replica\":\"/r\"}}\n");
        assert_eq!(replies.last().unwrap()["done"]["ops"], 1);
        server.finish();
    }

    #[test]
    fn a_client_that_leaves_mid_push_does_not_stop_it() {
        let dir = tempfile::tempdir().unwrap();
        let fake = Fake::new(20, Duration::from_millis(10));
        let (server, path) = start(dir.path(), &fake);
        let mut s = connect(&path).unwrap();
        s.write_all(b"{\"push\":{\"replica\":\"/r\"}}\n").unwrap();
        let mut first = [0u8; 1];
        s.read_exact(&mut first).unwrap();
        drop(s);
        // finish waits for the running push, which completes.
        server.finish();
        assert_eq!(*fake.finished.lock().unwrap(), 1);
    }

    #[test]
    fn stale_sockets_are_replaced_and_long_paths_work() {
        let dir = tempfile::tempdir().unwrap();
        let mut deep = dir.path().to_path_buf();
        while deep.as_os_str().len() < 150 {
            deep.push("a-rather-long-directory-name");
        }
        std::fs::create_dir_all(&deep).unwrap();
        let fake = Fake::new(0, Duration::ZERO);
        // A stale socket: bound, and its listener gone.
        let (address, _fd) = socket_address(&deep.join(SOCKET_NAME)).unwrap();
        drop(UnixListener::bind(&address).unwrap());
        let (server, path) = start(&deep, &fake);
        let report = request_push(
            connect(&path).unwrap(),
            &local("/r", false),
            &[],
            &mut |_| {},
        )
        .unwrap();
        assert_eq!(report["ops"], 1);
        drop(server);
        assert!(!path.exists());
        assert_eq!(connect(&path).unwrap_err().kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn replicas_overlapping_a_tree_are_refused() {
        let trees = [(Path::new("/src"), "SOURCE")];
        assert!(check_replica_outside(Path::new("/src/r"), &trees).is_err());
        assert!(check_replica_outside(Path::new("/src"), &trees).is_err());
        assert!(check_replica_outside(Path::new("/"), &trees).is_err());
        assert!(check_replica_outside(Path::new("/srcx"), &trees).is_ok());
        assert!(check_replica_outside(Path::new("/backup/src"), &trees).is_ok());
    }
}
