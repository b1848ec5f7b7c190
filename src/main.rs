//! The poseidon-lite server binary: configuration from file, environment and flags, then the
//! server until SIGTERM or SIGINT.

use clap::Parser;
use poseidon_lite::{
    Config,
    cli::{Command, EnvironmentsCommand},
};
use signal_hook::{
    consts::{SIGHUP, SIGINT, SIGTERM},
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
    let mut cli = poseidon_lite::cli::Cli::parse();
    let command = cli.command.take();
    let destroy_runners = cli.destroy_runners;
    let config = cli.into_config()?;
    if let Some(Command::Environments(command)) = command {
        return environments(&config, command);
    }
    if let Some(Command::Image(args)) = command {
        // Warnings only: the command reports its own progress and result.
        env_logger::Builder::new().parse_filters("warn").init();
        let settings = config.images.settings();
        return poseidon_lite::image::commands::run(&args.into(), &config.state.dir, &settings);
    }
    env_logger::Builder::new()
        .parse_filters(&config.logger.level)
        .format_timestamp_micros()
        .init();
    if destroy_runners {
        let records = poseidon_lite::Server::destroy_runners(&config).map_err(|e| e.to_string())?;
        log::info!("destroyed every runner ({records} claimed)");
        return Ok(());
    }
    raise_file_limit();
    // Registered before the server starts so that no signal arrives unhandled.
    let mut signals = Signals::new([SIGTERM, SIGINT, SIGHUP]).map_err(|err| err.to_string())?;
    let server = poseidon_lite::Server::bind(config).map_err(|err| err.to_string())?;
    let handle = server.spawn().map_err(|err| err.to_string())?;
    for signal in signals.forever() {
        if signal == SIGHUP {
            // SIGHUP reloads the TLS certificate (a renewed one, say) and nothing else.
            match handle.reload_certificates() {
                Ok(()) => log::info!("received SIGHUP: certificates reloaded"),
                Err(err) => log::error!("received SIGHUP: {err}"),
            }
            continue;
        }
        log::info!("received signal {signal}");
        break;
    }
    handle.shutdown();
    Ok(())
}

/// `environments export` and `environments import`.
fn environments(config: &Config, command: EnvironmentsCommand) -> Result<(), String> {
    use poseidon_lite::migrate;
    match command {
        EnvironmentsCommand::Export { from } => {
            let api = from.unwrap_or_else(|| own_api(config));
            let token = config.server.required_token();
            println!("{}", migrate::export(&api, token)?);
        }
        EnvironmentsCommand::Import { url, token, file } => {
            let exported = match file {
                Some(path) => std::fs::read_to_string(&path)
                    .map_err(|err| format!("cannot read {}: {err}", path.display()))?,
                None => std::io::read_to_string(std::io::stdin())
                    .map_err(|err| format!("cannot read standard input: {err}"))?,
            };
            for line in migrate::import(&url, token.as_deref(), &exported)? {
                println!("{line}");
            }
        }
    }
    Ok(())
}

/// The API of the server this configuration describes, reached over loopback when it listens
/// on every address.
fn own_api(config: &Config) -> String {
    let address = match config.server.address {
        address if address.is_unspecified() && address.is_ipv6() => "[::1]".to_owned(),
        address if address.is_unspecified() => "127.0.0.1".to_owned(),
        std::net::IpAddr::V6(address) => format!("[{address}]"),
        address => address.to_string(),
    };
    format!("http://{address}:{}/api/v1", config.server.port)
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
