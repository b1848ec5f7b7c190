//! The poseidon-lite server binary: configuration from file, environment and flags, then the
//! server until SIGTERM or SIGINT.

use clap::Parser;
use signal_hook::{
    consts::{SIGINT, SIGTERM},
    iterator::Signals,
};

/// Keeps absurd announced body sizes from aborting the server (see the type's docs).
#[global_allocator]
static ALLOCATOR: poseidon_lite::Allocator = poseidon_lite::Allocator;

fn main() {
    // The binary doubles as the sandbox agent; this returns unless started as one. It must
    // come first: the agent has to be single-threaded.
    poseidon_lite::run_agent_if_requested();
    if let Err(message) = run() {
        eprintln!("poseidon-lite: {message}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    let config = poseidon_lite::cli::Cli::parse().into_config()?;
    env_logger::Builder::new()
        .parse_filters(&config.logger.level)
        .format_timestamp_micros()
        .init();
    raise_file_limit();
    // Registered before the server starts so that no signal arrives unhandled.
    let mut signals = Signals::new([SIGTERM, SIGINT]).map_err(|err| err.to_string())?;
    let server = poseidon_lite::Server::bind(config).map_err(|err| err.to_string())?;
    let handle = server.spawn().map_err(|err| err.to_string())?;
    if let Some(signal) = signals.forever().next() {
        log::info!("received signal {signal}");
    }
    handle.shutdown();
    Ok(())
}

/// Every connection, execution and runner takes descriptors: allow as many as permitted.
fn raise_file_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        limit.current = limit.maximum;
        if let Err(err) = setrlimit(Resource::Nofile, limit) {
            log::warn!("cannot raise the open file limit: {err}");
        }
    }
}
