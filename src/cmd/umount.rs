//! `ferry umount`: asks the mount process to stop (it unmounts lazily,
//! closes the journal cleanly and exits) and waits for it; a dead mount left
//! by a killed process is detached directly.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::mount::mount_pid;
use crate::cli::UmountArgs;
use crate::mounts;

/// How long the mount process may take to stop (it aborts open files after
/// a few seconds, so this is a generous bound).
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

pub fn run(args: UmountArgs) -> anyhow::Result<()> {
    let mountpoint = mounts::resolve(&args.mountpoint)
        .with_context(|| format!("MOUNTPOINT {}", args.mountpoint.display()))?;
    let entry = mounts::at(&mountpoint)?
        .ok_or_else(|| anyhow!("{} is not mounted", mountpoint.display()))?;
    let state = entry.ferry_state().ok_or_else(|| {
        anyhow!(
            "{} is not a ferry mount (it is {} from {})",
            mountpoint.display(),
            entry.fstype,
            entry.source.display()
        )
    })?;
    match mount_pid(&state).filter(|&pid| is_mount_process(pid, &mountpoint)) {
        Some(pid) => {
            kill(Pid::from_raw(pid), Signal::SIGTERM)
                .with_context(|| format!("signalling mount process {pid}"))?;
            wait_for_exit(pid, STOP_TIMEOUT)
                .with_context(|| format!("waiting for mount process {pid} to stop"))?;
        }
        None => detach(&mountpoint)?,
    }
    if mounts::at(&mountpoint)?.is_some_and(|m| m.ferry_state().is_some()) {
        detach(&mountpoint)?;
    }
    Ok(())
}

fn detach(mountpoint: &Path) -> anyhow::Result<()> {
    nix::mount::umount2(mountpoint, nix::mount::MntFlags::MNT_DETACH)
        .with_context(|| format!("unmounting {}", mountpoint.display()))
}

/// Guards against a recycled pid: the process must be a ferry mount of this
/// mountpoint.
fn is_mount_process(pid: i32, mountpoint: &Path) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
    let mentions = |s: &[u8]| args.contains(&s);
    let resolved = args.iter().any(|a| {
        let p = Path::new(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(a));
        mounts::resolve(p).is_ok_and(|r| r == mountpoint)
    });
    args.first().is_some_and(|a| a.ends_with(b"ferry")) && mentions(b"mount") && resolved
}

/// Waits for a process that is not our child to exit, without polling.
fn wait_for_exit(pid: i32, timeout: Duration) -> anyhow::Result<()> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ESRCH) {
            return Ok(());
        }
        return Err(err).context("pidfd_open");
    }
    let mut pfd = libc::pollfd {
        fd: fd as i32,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd; the descriptor is closed right after.
    let ready = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as i32) };
    // SAFETY: fd is ours and not used after this.
    unsafe { libc::close(fd as i32) };
    match ready {
        1 => Ok(()),
        0 => bail!("it did not stop within {} s", timeout.as_secs()),
        _ => Err(std::io::Error::last_os_error()).context("poll"),
    }
}
