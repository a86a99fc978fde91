//! `beamline-router`: the binary. It parses the command line and hands over to the
//! library crates; `serve` runs the router, `migrate` applies the schema, and the
//! operator commands (later) talk to a running router over its admin API.
//!
//! Layout: [`cli`] (arguments), [`config`] (TOML + environment, validated),
//! [`serve`] (wiring and lifecycle), [`migrate`], [`ops`] (operator commands over
//! the admin API), [`logging`].

mod cli;
mod config;
mod logging;
mod migrate;
mod ops;
mod serve;

use std::process::ExitCode;

use clap::Parser;

/// mimalloc: the pipeline allocates small, short-lived buffers on many threads, where
/// glibc's arenas showed lock contention in profiles (docs/PERFORMANCE.md).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            cli::Command::Serve(args) => serve::run(args).await,
            cli::Command::Migrate(args) => migrate::run(args).await,
            command => ops::run(&cli.global, command).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            match e.downcast_ref::<tonic::Status>() {
                Some(status) => eprintln!("error: {}", status.message()),
                None => eprintln!("error: {e:#}"),
            }
            ExitCode::from(cli::exit_code(&e))
        }
    }
}
