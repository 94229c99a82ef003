//! `ferry serve`: a daemon that serves the replicas under one directory to
//! authenticated pushes over TCP.
//!
//! tokio accepts connections and runs each handshake under a timeout, so
//! that a client that connects and says nothing costs no thread and not
//! for long. An authenticated connection then runs the receiver (the
//! applier is blocking filesystem work) on tokio's blocking pool, one
//! thread per push: pushes to different replicas run at once, and two to
//! the same replica take turns on its lock (`apply::Session`). A push that
//! sends nothing for the idle timeout is ended, so that a stalled client
//! holds neither a replica's lock nor the daemon's exit for long.
//! SIGINT/SIGTERM stop the accepting; pushes under way finish.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use super::auth::{DaemonChallenge, Key, MacReader, MacWriter, SessionKeys};

/// How long a client has to complete the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);

/// Longest replica name.
const MAX_NAME: usize = 128;

/// Serves until SIGINT or SIGTERM; `idle` bounds how long a push may send
/// nothing (`None`: no bound).
pub fn run(listen: &str, root: PathBuf, key: Key, idle: Option<Duration>) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(serve(listen, Arc::new(root), Arc::new(key), idle))
}

async fn serve(
    listen: &str,
    root: Arc<PathBuf>,
    key: Arc<Key>,
    idle: Option<Duration>,
) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("listening on {listen}"))?;
    let local = listener.local_addr().context("the listening address")?;
    eprintln!(
        "ferry: serving the replicas under {} on {local}",
        root.display()
    );
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let (root, key) = (root.clone(), key.clone());
                    connections.spawn(async move { connection(stream, peer, root, key, idle).await });
                }
                Err(e) => {
                    // Out of descriptors or similar: keep serving, without
                    // spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            // Finished connections are reaped as they end.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            _ = tokio::signal::ctrl_c() => break,
            _ = terminate.recv() => break,
        }
    }
    drop(listener);
    if !connections.is_empty() {
        eprintln!(
            "ferry: stopping; waiting for {} push(es) under way",
            connections.len()
        );
    }
    while connections.join_next().await.is_some() {}
    Ok(())
}

/// One connection: the handshake, then the receiver.
async fn connection(
    mut stream: TcpStream,
    peer: SocketAddr,
    root: Arc<PathBuf>,
    key: Arc<Key>,
    idle: Option<Duration>,
) {
    let keys = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(&mut stream, &key)).await {
        Ok(Ok(Some(keys))) => keys,
        Ok(Ok(None)) => {
            eprintln!("ferry: {peer}: refused: the client does not hold the key");
            return;
        }
        Ok(Err(e)) => {
            eprintln!("ferry: {peer}: handshake failed: {e:#}");
            return;
        }
        Err(_) => {
            eprintln!("ferry: {peer}: no handshake within {HANDSHAKE_TIMEOUT:?}");
            return;
        }
    };
    let stream = match stream
        .into_std()
        .and_then(|s| s.set_nonblocking(false).map(|()| s))
        .and_then(|s| s.set_read_timeout(idle).map(|()| s))
    {
        Ok(s) => s,
        Err(e) => {
            eprintln!("ferry: {peer}: {e}");
            return;
        }
    };
    let received = tokio::task::spawn_blocking(move || receive(stream, &keys, &root, idle)).await;
    match received {
        Ok(Ok(r)) => eprintln!(
            "ferry: {peer}: {}: {} batch(es) applied, at seq {}",
            r.replica.as_deref().unwrap_or(Path::new("?")).display(),
            r.applied,
            r.seq
        ),
        Ok(Err(e)) => eprintln!("ferry: {peer}: {e:#}"),
        Err(e) => eprintln!("ferry: {peer}: the receiver failed: {e}"),
    }
}

/// The daemon's side of the handshake (`auth`): the session's keys, or
/// `None` for a client that does not hold the key.
async fn handshake(stream: &mut TcpStream, key: &Key) -> anyhow::Result<Option<SessionKeys>> {
    let mut hello = [0u8; 40];
    stream
        .read_exact(&mut hello)
        .await
        .context("reading the hello")?;
    let Some(challenge) = DaemonChallenge::new(key, &hello)? else {
        bail!("not a ferry client");
    };
    stream
        .write_all(&challenge.reply)
        .await
        .context("answering the hello")?;
    let mut proof = [0u8; 32];
    if stream.read_exact(&mut proof).await.is_err() {
        // A client that found our proof wrong hangs up here.
        return Ok(None);
    }
    let (keys, verdict) = challenge.check(&proof);
    stream
        .write_all(verdict)
        .await
        .context("sending the verdict")?;
    Ok(keys)
}

fn receive(
    stream: std::net::TcpStream,
    keys: &SessionKeys,
    root: &Path,
    idle: Option<Duration>,
) -> anyhow::Result<replicator::remote::Received> {
    let writer = stream.try_clone().context("duplicating the socket")?;
    let reader = MacReader::new(Idle { stream, idle }, keys);
    let writer: MacWriter<std::net::TcpStream> = MacWriter::new(writer, keys);
    Ok(replicator::remote::receive(reader, writer, |name| {
        replica_dir(root, name)
    })?)
}

/// A client's stream whose read timeout (`idle`) says so when it expires,
/// rather than "Resource temporarily unavailable".
struct Idle {
    stream: std::net::TcpStream,
    idle: Option<Duration>,
}

impl std::io::Read for Idle {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.stream
            .read(buf)
            .map_err(|e| match (e.kind(), self.idle) {
                (std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut, Some(idle)) => {
                    std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("the client sent nothing for {} s", idle.as_secs_f64()),
                    )
                }
                _ => e,
            })
    }
}

/// The replica directory `name` names under `root`, made if missing. A
/// name is one path component of letters, digits, `.`, `_` and `-`, not
/// starting with `.` (the replicas' state lives beside them as
/// `.NAME.ferry`).
fn replica_dir(root: &Path, name: &str) -> Result<PathBuf, String> {
    let valid = !name.is_empty()
        && name.len() <= MAX_NAME
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if !valid {
        return Err(format!(
            "{name:?} is not a replica name (1 to {MAX_NAME} letters, digits, '.', '_' or '-', \
             not starting with '.')"
        ));
    }
    let dir = root.join(name);
    crate::cmd::make_replica_dir(&dir)
        .map(|()| dir)
        .map_err(|e| format!("making the replica {name}: {e}"))
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;
    use crate::remote::auth::client_handshake;

    /// A client that authenticates and then says nothing is cut off once
    /// the idle timeout has passed; without the timeout, the read below
    /// would wait for its own 20 s limit and fail.
    #[test]
    fn a_push_that_sends_nothing_is_ended_after_the_idle_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("key");
        std::fs::write(&key_file, "0123456789abcdef0123").unwrap();
        let key = Key::from_file(&key_file).unwrap();
        let root = Arc::new(dir.path().to_path_buf());
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let listener = runtime.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
        let address = listener.local_addr().unwrap();
        let daemon_key = Arc::new(key.clone());
        let served = runtime.spawn(async move {
            let (stream, peer) = listener.accept().await.unwrap();
            let idle = Some(Duration::from_millis(200));
            connection(stream, peer, root, daemon_key, idle).await;
        });
        let mut client = std::net::TcpStream::connect(address).unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        client_handshake(&key, &mut client, "the test's daemon").unwrap();
        // The receiver's greeting, then the end of the stream.
        let mut rest = Vec::new();
        let ended = client.read_to_end(&mut rest);
        assert!(
            ended.is_ok(),
            "the daemon did not end the idle push: {ended:?}"
        );
        runtime.block_on(served).unwrap();
    }

    #[test]
    fn replica_names_are_one_safe_component() {
        let root = tempfile::tempdir().unwrap();
        for bad in [
            "",
            ".",
            "..",
            ".hidden",
            "a/b",
            "../x",
            "a b",
            "x\0",
            &"n".repeat(129),
        ] {
            assert!(replica_dir(root.path(), bad).is_err(), "{bad:?}");
        }
        assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 0);
        for good in ["home", "a.b_c-1"] {
            let dir = replica_dir(root.path(), good).unwrap();
            assert!(dir.is_dir());
            // A second time it is found, not refused.
            assert_eq!(replica_dir(root.path(), good).unwrap(), dir);
        }
    }
}
