//! Mounting the journaling filesystem and taking it down again.
//!
//! Unmounting is always lazy (`MNT_DETACH`): the mountpoint is released at
//! once even while programs hold files open. The FUSE connection lives on
//! until those files close; after a grace period it is aborted through the
//! fusectl filesystem so that the session, and with it the journal, can end
//! cleanly.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError};
use fuser::{Config, MountOption, Session, SessionACL, SessionUnmounter};

use crate::fs::JournalingFs;
use crate::fuse::FuseAdapter;

/// How long to wait for the session to end once its connection was aborted.
const ABORT_TIMEOUT: Duration = Duration::from_secs(10);

/// How to mount.
pub struct MountConfig {
    /// Shown as the mount's source in /proc/mounts; ferry puts the state
    /// directory there so that `ferry status MOUNTPOINT` can find it.
    pub fsname: String,
    /// Let other users use the mount (as a home directory needs). Root only.
    pub allow_other: bool,
    /// FUSE worker threads.
    pub threads: usize,
    /// Take requests through the kernel's per-CPU io_uring queues when it
    /// offers them (the `fuse` module's `enable_uring` parameter).
    pub io_uring: bool,
}

/// A live mount. Dropping it without `unmount` leaves the mount in place
/// until the process exits.
pub struct Mounted {
    mountpoint: PathBuf,
    unmounter: SessionUnmounter,
    connection: Option<u32>,
    ended: Receiver<io::Result<()>>,
    thread: Option<JoinHandle<()>>,
}

/// Mounts `fs` at `mountpoint` and starts serving it on worker threads.
/// Returns once the kernel has completed the FUSE handshake.
pub fn mount(
    fs: Arc<JournalingFs>,
    mountpoint: &Path,
    config: &MountConfig,
) -> io::Result<Mounted> {
    let mut options = vec![
        MountOption::FSName(config.fsname.clone()),
        MountOption::Subtype("ferry".into()),
        MountOption::DefaultPermissions,
    ];
    let root = nix::unistd::geteuid().is_root();
    if root {
        options.extend([MountOption::Dev, MountOption::Suid]);
    }
    let mut fuse_config = Config::default();
    fuse_config.mount_options = options;
    fuse_config.acl = if config.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    fuse_config.n_threads = Some(config.threads.max(1));
    fuse_config.clone_fd = true;

    let adapter = FuseAdapter::new(
        fs.clone(),
        Arc::new(AtomicBool::new(false)),
        config.io_uring,
    );
    let mut session = Session::new(adapter, mountpoint, &fuse_config)?;
    let notifier = session.notifier();
    // A negative offset invalidates attributes only, never page cache, so it
    // takes no inode lock and is safe from inside a request.
    fs.set_attr_invalidator(Box::new(move |node| {
        let _ = notifier.inval_inode(fuser::INodeNo(node), -1, 0);
    }));
    let unmounter = session.unmount_callable();
    let (tx, ended) = crossbeam_channel::bounded(1);
    let thread = std::thread::Builder::new()
        .name("fuse-session".into())
        .spawn(move || {
            let _ = tx.send(session.run());
        })?;
    // Only now that requests are served may this process stat its own mount.
    let connection = connection_id(mountpoint);
    Ok(Mounted {
        mountpoint: mountpoint.to_path_buf(),
        unmounter,
        connection,
        ended,
        thread: Some(thread),
    })
}

/// The fusectl connection number of the FUSE mount at `mountpoint`.
fn connection_id(mountpoint: &Path) -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(mountpoint).ok()?.dev();
    // fusectl names connections by the kernel's internal dev_t encoding.
    Some((libc::major(dev) << 20) | libc::minor(dev))
}

impl Mounted {
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// A channel that yields once the session has ended (the filesystem was
    /// unmounted from outside, or the connection aborted).
    pub fn ended(&self) -> &Receiver<io::Result<()>> {
        &self.ended
    }

    /// Unmounts lazily and waits for the session to end, aborting the
    /// connection if files are still open after `grace`.
    pub fn unmount(mut self, grace: Duration) -> io::Result<()> {
        if let Err(err) = self.unmounter.unmount() {
            tracing::warn!(%err, mountpoint = %self.mountpoint.display(), "unmount failed");
        }
        let result = match self.ended.recv_timeout(grace) {
            Ok(result) => result,
            Err(RecvTimeoutError::Timeout) => {
                tracing::warn!(
                    "files are still open on the detached mount; aborting the connection"
                );
                self.abort();
                match self.ended.recv_timeout(ABORT_TIMEOUT) {
                    Ok(result) => result,
                    // The abort did not take (no fusectl, say): leave the
                    // session thread behind, the journal must still be closed.
                    Err(_) => {
                        return Err(io::Error::other(
                            "the FUSE connection did not end after abort",
                        ));
                    }
                }
            }
            Err(RecvTimeoutError::Disconnected) => Ok(()),
        };
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        result
    }

    fn abort(&self) {
        let Some(id) = self.connection else { return };
        if let Err(err) = fuser::abort_connection(id) {
            tracing::error!(%err, id, "could not abort the FUSE connection");
        }
    }
}
