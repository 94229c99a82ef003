//! One module per command.

mod apply;
mod journal_view;
mod mount;
mod push;
mod receive;
mod serve;
mod umount;
mod verify;

use std::process::ExitCode;

use crate::cli::Command;

pub fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Mount(args) => mount::run(args),
        Command::Umount(args) => umount::run(args),
        Command::Log(args) => journal_view::log(args),
        Command::Status(args) => journal_view::status(args),
        Command::Push(args) => push::run(args),
        Command::Apply(args) => apply::run(args),
        Command::Receive(args) => receive::run(args),
        Command::Serve(args) => serve::run(args),
        // The one command with its own exit codes (0 equal, 1 differ, 2 error).
        Command::Verify(args) => return verify::run(args),
    }
    .map(|()| ExitCode::SUCCESS)
}

/// Makes the replica directory `path` if it is missing (not its parents:
/// a mistyped path should not grow a tree); an existing directory is fine.
pub(crate) fn make_replica_dir(path: &std::path::Path) -> std::io::Result<()> {
    match std::fs::create_dir(path) {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && path.is_dir() => Ok(()),
        made => made,
    }
}

/// A byte count for people: `512 B`, `1.5 KiB`, `3.2 GiB`.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}
