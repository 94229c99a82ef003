//! Command-line flags, parsed into plain structs.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "ferry",
    version,
    about = "Replicates live directory trees from a journaling FUSE mount"
)]
pub struct Cli {
    /// More detail on stderr (-v info, -vv debug, -vvv trace); FERRY_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Mount SOURCE at MOUNTPOINT through the journaling filesystem.
    Mount(MountArgs),
    /// Unmount a ferry mount (cleanly, also while files are open).
    Umount(UmountArgs),
    /// Print the journal's records.
    Log(LogArgs),
    /// Print the state of a mount and its journal.
    Status(StatusArgs),
    /// Compare SOURCE with REPLICA and list every difference.
    ///
    /// Compared: type, size and blake3 content, permission bits, owner,
    /// mtime (nanoseconds), symlink targets, device numbers, xattrs and
    /// ACLs, and which paths are hard links of each other. Symlinks are
    /// never followed; other filesystems mounted below the roots are
    /// skipped and listed.
    ///
    /// Exit codes: 0 the trees are equal; 1 they differ; 2 an error (a root
    /// is unusable, or an entry could not be read: the comparison is
    /// incomplete).
    Verify(VerifyArgs),
    /// Push everything a replica has not applied yet.
    ///
    /// Through a live mount: `ferry push MOUNTPOINT REPLICA_DIR` (the mount
    /// process does the push). On an unmounted state directory:
    /// `ferry push --state DIR --source SOURCE REPLICA_DIR`. The first push
    /// to an empty directory copies the whole tree. REPLICA_DIR must exist
    /// and lie outside SOURCE, MOUNTPOINT and the state directory.
    ///
    /// Other destinations: `[user@]host:/path` runs `ferry receive /path`
    /// on the host through ssh; `ferry://host:port/NAME` pushes to the
    /// replica NAME of a `ferry serve` daemon (with --key-file);
    /// `--batch-dir DIR` (instead of a destination) writes the changes as a
    /// batch file for `ferry apply`.
    #[command(allow_missing_positional = true)]
    Push(PushArgs),
    /// Apply batch files (made by `ferry push --batch-dir`) to a replica.
    ///
    /// Every file is checked whole first (every frame, the trailer hash);
    /// the files are taken in sequence order, those already applied are
    /// skipped, and a gap, an overlap or a batch of another source or
    /// stream is refused before anything is applied. Each batch is then
    /// applied with the commit protocol (base hashes checked before
    /// anything is visible).
    Apply(ApplyArgs),
    /// Receive pushes on stdin/stdout (what `ferry push host:/path` runs
    /// through ssh).
    Receive(ReceiveArgs),
    /// Serve replicas under a directory to authenticated pushes over TCP.
    ///
    /// `ferry push MOUNTPOINT ferry://host:port/NAME --key-file FILE`
    /// pushes to the replica DIR/NAME (made on first use). Both ends must
    /// hold the same key file; a client without it is refused before
    /// anything is read, and every frame after the handshake is
    /// authenticated (not encrypted: see docs/SECURITY.md).
    Serve(ServeArgs),
}

#[derive(Args, Debug)]
pub struct MountArgs {
    /// The directory whose tree is served and journaled.
    pub source: PathBuf,
    /// Where to mount it.
    pub mountpoint: PathBuf,
    /// Where the journal lives; must be outside SOURCE and MOUNTPOINT.
    /// Default: /var/lib/ferry/<source path, escaped>.
    #[arg(long)]
    pub state: Option<PathBuf>,
    /// Return once the mount is ready, leaving it served in the background.
    #[arg(long)]
    pub background: bool,
    /// Scan SOURCE against the journal at start, to record changes made
    /// behind the mount's back (always done after an unclean stop).
    #[arg(long)]
    pub reconcile: bool,
    /// FUSE worker threads.
    #[arg(long, default_value_t = 4)]
    pub threads: usize,
    /// Read FUSE requests from /dev/fuse only, even when the kernel offers
    /// its per-CPU io_uring queues (`fuse` module parameter `enable_uring`).
    #[arg(long)]
    pub no_io_uring: bool,
}

#[derive(Args, Debug)]
pub struct UmountArgs {
    pub mountpoint: PathBuf,
}

/// Names a journal: a live mount, or a state directory.
#[derive(Args, Debug)]
pub struct JournalArgs {
    /// A ferry mountpoint.
    #[arg(required_unless_present = "state", conflicts_with = "state")]
    pub mountpoint: Option<PathBuf>,
    /// A state directory, mounted or not.
    #[arg(long)]
    pub state: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct LogArgs {
    #[command(flatten)]
    pub journal: JournalArgs,
    /// One JSON object per record.
    #[arg(long)]
    pub json: bool,
    /// Include the inventory records of the first scan ("exists").
    #[arg(long)]
    pub all: bool,
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    #[command(flatten)]
    pub journal: JournalArgs,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// The source tree (a directory).
    pub source: PathBuf,
    /// The replica tree (a directory).
    pub replica: PathBuf,
    /// One JSON object per difference, then a summary object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct PushArgs {
    /// A ferry mountpoint (or name an unmounted journal with --state and --source).
    #[arg(
        value_name = "MOUNTPOINT",
        required_unless_present_any = ["state", "batch_dir"],
        conflicts_with = "state"
    )]
    pub mountpoint: Option<PathBuf>,
    /// Where to push: a local directory (it must exist), `[user@]host:/path`
    /// (ssh) or `ferry://host:port/NAME` (a ferry daemon).
    #[arg(value_name = "DESTINATION", required_unless_present = "batch_dir")]
    pub replica: Option<PathBuf>,
    /// Write the changes as a batch file in DIR instead (for `ferry apply`).
    #[arg(long, value_name = "DIR")]
    pub batch_dir: Option<PathBuf>,
    /// The ssh command for `host:/path` destinations, with its options
    /// (as rsync's -e).
    #[arg(long, value_name = "COMMAND", default_value = "ssh")]
    pub ssh_command: String,
    /// The ferry program on the remote host (as rsync's --rsync-path).
    #[arg(long, value_name = "PATH", default_value = "ferry")]
    pub ferry_path: String,
    /// The key file shared with a ferry daemon (ferry:// destinations).
    #[arg(long, value_name = "FILE")]
    pub key_file: Option<PathBuf>,
    /// How long a live mount keeps an ssh connection open after a push, for
    /// the next push to the same destination to reuse (0: close it at once).
    #[arg(long, value_name = "SECONDS", default_value_t = 60)]
    pub keep_connection: u64,
    /// An unmounted state directory to push from (needs --source).
    #[arg(long, requires = "source")]
    pub state: Option<PathBuf>,
    /// The source tree the --state journal belongs to.
    #[arg(long, requires = "state")]
    pub source: Option<PathBuf>,
    /// Plan and count the push, but change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print every figure of the report as a table.
    #[arg(long, conflicts_with = "json")]
    pub stats: bool,
    /// Print the report as one JSON object (and nothing else on stdout).
    #[arg(long)]
    pub json: bool,
    /// Draw a progress bar on stderr (the default when stderr is a terminal,
    /// except with --json).
    #[arg(long)]
    pub progress: bool,
}

#[derive(Args, Debug)]
pub struct ApplyArgs {
    /// Batch files, in any order.
    #[arg(value_name = "BATCH", required = true)]
    pub batches: Vec<PathBuf>,
    /// The replica directory (made if missing; its state lives beside it).
    #[arg(long, value_name = "DIR")]
    pub replica: PathBuf,
    /// Print what was done as one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct ReceiveArgs {
    /// The replica directory (made if missing; its parent must exist).
    pub path: PathBuf,
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// The address to listen on, e.g. 0.0.0.0:7300 or [::1]:7300.
    #[arg(long, value_name = "ADDR:PORT")]
    pub listen: String,
    /// The directory holding the replicas, one per name.
    #[arg(long, value_name = "DIR")]
    pub root: PathBuf,
    /// The key file clients must hold too.
    #[arg(long, value_name = "FILE")]
    pub key_file: PathBuf,
    /// How long an authenticated push may send nothing before it is ended
    /// (its replica unlocked, nothing of an unfinished batch applied);
    /// 0: never.
    #[arg(long, value_name = "SECONDS", default_value_t = 600)]
    pub idle_timeout: u64,
}
