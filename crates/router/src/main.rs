//! `beamline-router`: the binary. It parses the command line and hands over to the
//! library crates; `serve` runs the router, `migrate` applies the schema, `decide`
//! sends a request through a running router, and the operator commands talk to a
//! running router over its admin API.
//!
//! Layout: [`cli`] (arguments), [`config`] (TOML + environment, validated),
//! [`serve`] (wiring and lifecycle), [`migrate`], [`decide`], [`ops`] (operator
//! commands over the admin API), [`private_nats`] (`serve --demo`'s own NATS),
//! [`registry_check`] (`registry validate` / `diff` output),
//! [`logging`], [`telemetry`] (OpenTelemetry export).

mod cli;
mod config;
mod decide;
mod logging;
mod migrate;
mod nats;
mod ops;
mod private_nats;
mod registry_check;
mod serve;
mod telemetry;

use std::process::ExitCode;

use clap::Parser;

/// mimalloc: the pipeline allocates small, short-lived buffers on many threads, where
/// glibc's arenas showed lock contention in profiles (docs/PERFORMANCE.md).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Returns freed pages to the OS as soon as they are free rather than after
/// mimalloc's default delay (1 s in mimalloc v3), which only runs out on a later
/// allocation by the same thread: a full registry reload frees tens of MB at once, and a router idling
/// after it kept them resident (P7 at 10 000 extensions after ten full reloads:
/// 125 MB resident with the delay, 80 MB without). The cost is an madvise per page
/// that becomes free, which request handling, reusing its pages, rarely causes
/// (docs/PERFORMANCE.md has P1/P2 with and without).
fn tune_allocator() {
    // SAFETY: reads and sets a process-wide option, which mimalloc reads at each purge
    // decision. Only when the option at that index holds one of the delay's defaults:
    // a mimalloc with another option layout is left as it is.
    unsafe {
        if PURGE_DELAY_DEFAULTS.contains(&libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY)) {
            libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0);
        }
    }
}

/// `mi_option_purge_delay` of mimalloc.h (the same index in mimalloc v2 and v3);
/// the Rust bindings do not name it.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
/// Its default, ms: 10 in mimalloc v2, 1 000 in v3 (which libmimalloc-sys builds now).
const PURGE_DELAY_DEFAULTS: [std::ffi::c_long; 2] = [10, 1000];

fn main() -> ExitCode {
    tune_allocator();
    let cli = cli::Cli::parse_from(cli::hoist_client_flags(std::env::args_os().collect()));
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
            cli::Command::Decide(args) => decide::run(args).await,
            command => ops::run(command).await,
        }
    });
    // Tasks still running (a NATS reconnect loop, a query to a paused database) are
    // dropped, and a blocking call still in flight is not waited for past this bound:
    // the process ends when `serve` says it is done.
    runtime.shutdown_timeout(std::time::Duration::from_millis(500));
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Guards the hard-coded option index: if a mimalloc update moved the option,
    /// the tuning would silently do nothing.
    #[test]
    fn the_purge_delay_option_is_found_and_set() {
        // SAFETY: reads a process-wide option.
        let get = || unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) };
        assert!(
            PURGE_DELAY_DEFAULTS.contains(&get()),
            "option {MI_OPTION_PURGE_DELAY} is not mimalloc's purge delay: {}",
            get()
        );
        tune_allocator();
        assert_eq!(get(), 0);
    }
}
