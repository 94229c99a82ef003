//! `ferry mount`: validate, optionally detach into the background, open the
//! journal, mount, serve (the filesystem, and pushes on the control socket)
//! until told to stop, and stop cleanly.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use journal::{Journal, OpenOptions};
use nix::sys::signal::{SigSet, Signal};

use crate::cli::MountArgs;
use crate::{control, mounts, state_dir};

/// How long an unmount waits for open files to close before aborting them.
const UNMOUNT_GRACE: Duration = Duration::from_secs(5);

/// A validated mount request.
struct Plan {
    source: PathBuf,
    mountpoint: PathBuf,
    state: PathBuf,
    state_created: bool,
    reconcile: bool,
    threads: usize,
    io_uring: bool,
}

pub fn run(args: MountArgs) -> anyhow::Result<()> {
    let plan = validate(&args)?;
    if args.background {
        return background(plan);
    }
    println!(
        "ferry: mounting {} at {} (state: {})",
        plan.source.display(),
        plan.mountpoint.display(),
        plan.state.display()
    );
    // A state directory this run created is removed if the mount never
    // became ready; once it served, its journal is kept whatever happens.
    let mut served = false;
    let result = serve(&plan, &mut |_| served = true);
    if result.is_err() && plan.state_created && !served {
        let _ = std::fs::remove_dir_all(&plan.state);
    }
    result
}

/// Every check that can fail before anything is created or mounted.
fn validate(args: &MountArgs) -> anyhow::Result<Plan> {
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "ferry mount needs root (kernel FUSE passthrough and allow_other require it): run it with sudo"
        );
    }
    if !Path::new("/dev/fuse").exists() {
        bail!(
            "/dev/fuse does not exist: load the fuse kernel module (modprobe fuse) or run where FUSE is available"
        );
    }
    let source = std::fs::canonicalize(&args.source)
        .with_context(|| format!("SOURCE {}", args.source.display()))?;
    if !source.is_dir() {
        bail!("SOURCE {} is not a directory", source.display());
    }
    let mountpoint = mounts::resolve(&args.mountpoint)
        .with_context(|| format!("MOUNTPOINT {}", args.mountpoint.display()))?;
    match std::fs::metadata(&mountpoint) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => bail!("MOUNTPOINT {} is not a directory", mountpoint.display()),
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => bail!(
            "MOUNTPOINT {} holds a dead FUSE mount: run `ferry umount {}` first",
            mountpoint.display(),
            mountpoint.display()
        ),
        Err(e) => return Err(e).with_context(|| format!("MOUNTPOINT {}", mountpoint.display())),
    }
    if let Some(existing) = mounts::at(&mountpoint)? {
        // Mounting over the source itself is allowed (the source is opened first).
        if existing.fstype.starts_with("fuse") || mountpoint != source {
            bail!(
                "MOUNTPOINT {} is in use: {} ({}) is mounted there",
                mountpoint.display(),
                existing.source.display(),
                existing.fstype
            );
        }
    }
    let state = match &args.state {
        Some(s) => state_dir::absolute(s)?,
        None => state_dir::default_for(&source),
    };
    state_dir::check_outside(&state, &source, &mountpoint)?;
    let state_created = !state.exists();
    Ok(Plan {
        source,
        mountpoint,
        state,
        state_created,
        reconcile: args.reconcile,
        threads: args.threads,
        io_uring: !args.no_io_uring,
    })
}

/// Forks before any thread exists; the child serves the mount and tells the
/// parent through a pipe whether it is ready or why it failed.
fn background(plan: Plan) -> anyhow::Result<()> {
    let (read_end, write_end) = nix::unistd::pipe().context("creating a pipe")?;
    // SAFETY: no other thread exists yet (validation spawns none), so the
    // child may run arbitrary code after fork.
    match unsafe { nix::unistd::fork() }.context("fork")? {
        nix::unistd::ForkResult::Parent { .. } => {
            drop(write_end);
            let mut answer = String::new();
            File::from(read_end)
                .read_to_string(&mut answer)
                .context("waiting for the mount")?;
            match answer.strip_prefix("ok\n") {
                Some(rest) => {
                    print!("{rest}");
                    Ok(())
                }
                None if answer.is_empty() => {
                    bail!("the mount process exited before the mount was ready")
                }
                None => bail!("{}", answer.trim_end()),
            }
        }
        nix::unistd::ForkResult::Child => {
            drop(read_end);
            // The parent reads to end of file: the pipe closes once the
            // outcome is reported, while the mount goes on being served.
            let mut pipe = Some(File::from(write_end));
            let _ = nix::unistd::setsid();
            let outcome = detach_stdio(&plan.state).and_then(|()| {
                serve(&plan, &mut |msg| {
                    if let Some(mut pipe) = pipe.take() {
                        let _ = pipe.write_all(format!("ok\n{msg}").as_bytes());
                    }
                })
            });
            if let (Err(err), Some(mut pipe)) = (&outcome, pipe.take()) {
                if plan.state_created {
                    let _ = std::fs::remove_dir_all(&plan.state);
                }
                let msg = err
                    .chain()
                    .map(|e| e.to_string())
                    .collect::<Vec<_>>()
                    .join(": ");
                let _ = pipe.write_all(msg.as_bytes());
            }
            std::process::exit(if outcome.is_ok() { 0 } else { 1 });
        }
    }
}

/// Points the background process's stdio at the state directory's log.
fn detach_stdio(state: &Path) -> anyhow::Result<()> {
    create_state_dir(state)?;
    let log_path = state.join("mount.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    let null = File::open("/dev/null").context("opening /dev/null")?;
    for (from, to) in [
        (null.as_raw_fd(), 0),
        (log.as_raw_fd(), 1),
        (log.as_raw_fd(), 2),
    ] {
        // SAFETY: both descriptors are open; dup2 replaces the standard stream.
        if unsafe { libc::dup2(from, to) } < 0 {
            return Err(std::io::Error::last_os_error()).context("redirecting stdio");
        }
    }
    Ok(())
}

/// Creates the state directory (and missing parents) readable by root only.
fn create_state_dir(state: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(state)
        .with_context(|| format!("creating state directory {}", state.display()))
}

/// Opens the journal, mounts, starts the control socket, reports readiness,
/// serves until a signal or an external unmount, then unmounts, lets a
/// running push finish, and closes the journal cleanly.
fn serve(plan: &Plan, ready: &mut dyn FnMut(&str)) -> anyhow::Result<()> {
    // Block the stop signals in every thread; one thread waits for them.
    let mut signals = SigSet::empty();
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        signals.add(s);
    }
    signals.thread_block().context("blocking signals")?;
    raise_fd_limit()?;
    // Before the umask is cleared: the journal's directory is private, so
    // the files the journal creates later (under umask 0) are reachable by
    // root only.
    create_state_dir(&plan.state)?;
    // New files in the source get exactly the mode the filesystem computes.
    nix::sys::stat::umask(nix::sys::stat::Mode::empty());
    let options = OpenOptions {
        force_reconcile: plan.reconcile,
        ..OpenOptions::default()
    };
    let (journal, recovery) = Journal::open(&plan.state, &plan.source, &options)
        .with_context(|| format!("opening the journal in {}", plan.state.display()))?;
    let mut report = String::new();
    if recovery.unclean {
        report += &format!(
            "ferry: recovered from an unclean stop: replayed {} records, scanned {} entries, recorded {} changes\n",
            recovery.replayed, recovery.scanned, recovery.reconciled
        );
    }
    let fs = Arc::new(
        vfs::JournalingFs::new(&plan.source, journal.clone())
            .with_context(|| format!("serving {}", plan.source.display()))?,
    );
    let config = vfs::MountConfig {
        fsname: format!("{}{}", mounts::FSNAME_PREFIX, plan.state.display()),
        allow_other: true,
        threads: plan.threads,
        io_uring: plan.io_uring,
    };
    let mounted = match vfs::mount(fs.clone(), &plan.mountpoint, &config) {
        Ok(m) => m,
        Err(err) => {
            drop(fs);
            let _ = journal.close();
            return Err(err).with_context(|| format!("mounting at {}", plan.mountpoint.display()));
        }
    };
    // The journal's lock is held, so a control socket left in the state
    // directory is stale and may be replaced.
    let pusher = control::Pusher::new(
        journal.clone(),
        plan.source.clone(),
        Some(plan.mountpoint.clone()),
        plan.state.clone(),
    );
    let socket = plan.state.join(control::SOCKET_NAME);
    let mut control = match control::Server::start(&socket, Arc::new(pusher)) {
        Ok(server) => server,
        Err(err) => {
            let _ = mounted.unmount(UNMOUNT_GRACE);
            drop(fs);
            let _ = journal.close();
            return Err(err).context("starting the control socket");
        }
    };
    let pid_file = plan.state.join("mount.pid");
    std::fs::write(
        &pid_file,
        format!("{}\n{}\n", std::process::id(), plan.mountpoint.display()),
    )
    .with_context(|| format!("writing {}", pid_file.display()))?;
    report += &format!(
        "ferry: mounted {} at {} (state: {})\n",
        plan.source.display(),
        plan.mountpoint.display(),
        plan.state.display()
    );
    ready(&report);
    if !report.is_empty() {
        eprint!("{report}");
    }

    let (stop_tx, stop_rx) = crossbeam_channel::bounded(1);
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let signal = signals.wait();
            let _ = stop_tx.send(signal);
        })?;
    // The session ends by itself when unmounted from outside, or with an
    // error when it could no longer serve (its connection is then aborted).
    let mut failed = None;
    crossbeam_channel::select! {
        recv(stop_rx) -> signal => tracing::info!(?signal, "stopping"),
        recv(mounted.ended()) -> ended => match ended {
            Ok(Err(err)) => failed = Some(err),
            _ => tracing::info!("unmounted from outside"),
        },
    }
    // No new pushes; one already running finishes before the journal
    // closes (it reads the source, not the mount).
    control.close();
    let unmounted = mounted.unmount(UNMOUNT_GRACE);
    control.finish();
    drop(fs);
    journal.close().context("closing the journal")?;
    let _ = std::fs::remove_file(&pid_file);
    if let Some(err) = failed {
        anyhow::bail!(
            "the mount at {} stopped serving: {err}",
            plan.mountpoint.display()
        );
    }
    unmounted.context("unmounting")?;
    Ok(())
}

/// One `O_PATH` descriptor is held per inode the kernel knows, and the
/// kernel keeps every inode of a 100,000-file tree cached when memory
/// allows: raise the limit as far as the kernel allows (root may raise the
/// hard limit up to `fs.nr_open`).
fn raise_fd_limit() -> anyhow::Result<()> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).context("reading RLIMIT_NOFILE")?;
    let limit = nr_open.map_or(hard, |n| n.max(hard));
    setrlimit(Resource::RLIMIT_NOFILE, limit, limit)
        .or_else(|_| setrlimit(Resource::RLIMIT_NOFILE, hard, hard))
        .context("raising RLIMIT_NOFILE")
}

/// Reads the pid file a mount process leaves in its state directory.
pub fn mount_pid(state: &Path) -> Option<i32> {
    let text = std::fs::read_to_string(state.join("mount.pid")).ok()?;
    text.lines().next()?.trim().parse().ok()
}
