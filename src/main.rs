//! The `ferry` command: parses flags into plain structs and hands them to
//! the command modules, which do the work through the library crates.
//!
//! Exit codes: 0 success; 1 the command failed (the message says why);
//! 2 bad usage. `ferry verify` adds its own (see its help).

mod cli;
mod cmd;
mod control;
mod kept;
mod mounts;
mod remote;
mod state_dir;

use std::process::ExitCode;

use clap::Parser;

// glibc's allocator cost a push of small files about 8% of its CPU:
// `malloc_consolidate` on every mid-sized request, and heap trims whose pages
// the next file's buffers fault back in (docs/BENCHMARKS.md, session 10).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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

/// An error and its causes on one line, outermost first. A cause the
/// message before it already ends with (an error whose text includes its
/// source, as `thiserror`'s `{source}` does) is not said twice.
pub(crate) fn one_line(err: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if line.ends_with(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
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

#[cfg(test)]
mod tests {
    use super::one_line;

    #[derive(Debug)]
    struct Outer(std::io::Error);

    impl std::fmt::Display for Outer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "reading /x: {}", self.0)
        }
    }

    impl std::error::Error for Outer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn a_cause_is_said_once() {
        let io = std::io::Error::other("no space left");
        let err = anyhow::Error::new(Outer(io)).context("pushing to /r");
        assert_eq!(one_line(&err), "pushing to /r: reading /x: no space left");
        let plain = anyhow::anyhow!("inner").context("outer");
        assert_eq!(one_line(&plain), "outer: inner");
    }
}
