//! `ferry serve`: see `crate::remote::serve`.

use std::time::Duration;

use anyhow::Context;

use crate::cli::ServeArgs;
use crate::remote::auth::Key;
use crate::remote::serve;

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let key = Key::from_file(&args.key_file)?;
    std::fs::create_dir_all(&args.root)
        .with_context(|| format!("the replicas' directory {}", args.root.display()))?;
    let root = std::fs::canonicalize(&args.root)
        .with_context(|| format!("the replicas' directory {}", args.root.display()))?;
    let idle = (args.idle_timeout > 0).then(|| Duration::from_secs(args.idle_timeout));
    serve::run(&args.listen, root, key, idle)
}
