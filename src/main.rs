//! The `ferry` command: parses flags into plain structs and hands them to
//! the command modules, which do the work through the library crates.
//!
//! Exit codes: 0 success; 1 the command failed (the message says why);
//! 2 bad usage. `ferry verify` adds its own (see its help).

mod cli;
mod cmd;
mod control;
mod mounts;
mod remote;
mod state_dir;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    init_logging(cli.verbose);
    match cmd::run(cli.command) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("ferry: {}", one_line(&err));
            ExitCode::from(1)
        }
    }
}

/// An error and its causes on one line, outermost first.
fn one_line(err: &anyhow::Error) -> String {
    err.chain()
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join(": ")
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
