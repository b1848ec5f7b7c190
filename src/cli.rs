//! Command-line flags. Every setting of the configuration file can also be given as a flag or
//! as a `POSEIDON_<SECTION>_<KEY>` environment variable; flags win over variables, variables
//! over the file, the file over the defaults.

use std::{net::IpAddr, path::PathBuf};

use clap::{Parser, Subcommand};

use crate::{
    config::{Config, ExecutorKind},
    image::commands::ImageCommand,
};

/// poseidon-lite: a single-host runner management server speaking Poseidon's API for CodeOcean.
///
/// With no configuration at all it listens on 127.0.0.1:7200 (HTTP) and 7201 (WebSocket) and
/// keeps its state under ~/.local/state/poseidon-lite.
#[derive(Debug, Parser)]
#[command(version, about, long_about)]
pub struct Cli {
    /// Instead of serving: a command (see `poseidon-lite help environments`, `poseidon-lite
    /// help image`).
    #[command(subcommand)]
    pub command: Option<Command>,

    /// TOML configuration file (sections `[server]`, `[runner]`, `[sandbox]`, `[network]`,
    /// `[images]`, `[state]`, `[logger]`, `[metrics]`, `[influxdb]`).
    #[arg(long, env = "POSEIDON_CONFIG", value_name = "FILE", global = true)]
    pub config: Option<PathBuf>,

    /// server.address: address both listeners bind to [default: 127.0.0.1].
    #[arg(long, env = "POSEIDON_SERVER_ADDRESS")]
    pub address: Option<IpAddr>,
    /// server.port: HTTP port, 0 = any free port [default: 7200].
    #[arg(long, env = "POSEIDON_SERVER_PORT")]
    pub port: Option<u16>,
    /// server.websocket_port: WebSocket port, 0 = any free port, the HTTP port = no second
    /// listener (the HTTP port serves WebSocket upgrades too) [default: HTTP port + 1].
    #[arg(long, env = "POSEIDON_SERVER_WEBSOCKET_PORT")]
    pub websocket_port: Option<u16>,
    /// server.token: secret expected in the Poseidon-Token header; unset = no authentication.
    #[arg(long, env = "POSEIDON_SERVER_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// server.websocket_url: public base of WebSocket URLs (e.g. wss://runners.example.org)
    /// when behind a proxy [default: ws://HOST:PORT with the request's Host and the WebSocket port].
    #[arg(long, env = "POSEIDON_SERVER_WEBSOCKET_URL")]
    pub websocket_url: Option<String>,
    /// server.workers: HTTP worker threads, and as many again for downloads, listings and
    /// large bodies [default: 8].
    #[arg(long, env = "POSEIDON_SERVER_WORKERS")]
    pub workers: Option<usize>,
    /// server.max_connections: most open HTTP connections; more get 503 [default: 1024].
    #[arg(long, env = "POSEIDON_SERVER_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// server.max_body_bytes: largest request body; larger ones get 413 [default: 64 MiB].
    #[arg(long, env = "POSEIDON_SERVER_MAX_BODY_BYTES")]
    pub max_body_bytes: Option<u64>,
    /// server.max_message_bytes: largest WebSocket message (stdin) [default: 1 MiB].
    #[arg(long, env = "POSEIDON_SERVER_MAX_MESSAGE_BYTES")]
    pub max_message_bytes: Option<usize>,
    /// server.prewarming_pool_threshold: /health answers 503 when an environment's idle runners
    /// fall below this fraction of its pool size; 0 = never [default: 0].
    #[arg(long, env = "POSEIDON_SERVER_PREWARMING_POOL_THRESHOLD")]
    pub prewarming_pool_threshold: Option<f64>,
    /// server.websocket_timeout_secs: time a WebSocket client gets for its handshake and for
    /// accepting output before it is dropped [default: 30].
    #[arg(long, env = "POSEIDON_SERVER_WEBSOCKET_TIMEOUT_SECS")]
    pub websocket_timeout_secs: Option<u64>,
    /// server.http_timeout_secs: an HTTP connection silent this long (idle, or stalled while
    /// sending a request or taking a response) is closed [default: 60].
    #[arg(long, env = "POSEIDON_SERVER_HTTP_TIMEOUT_SECS")]
    pub http_timeout_secs: Option<u64>,
    /// server.release: version string served by /version [default: the crate version].
    #[arg(long, env = "POSEIDON_SERVER_RELEASE")]
    pub release: Option<String>,
    /// server.systemd_socket_activation: listen on the sockets systemd passes (LISTEN_FDS):
    /// the one named `http` (or the first) for the API, `websocket` (or the second) for
    /// executions [default: false].
    #[arg(long, env = "POSEIDON_SERVER_SYSTEMDSOCKETACTIVATION")]
    pub systemd_socket_activation: Option<bool>,

    /// runner.executor: `sandbox` (isolated Linux sandboxes, needs root) or `process` (plain
    /// directories, NO isolation) [default: sandbox].
    #[arg(long, env = "POSEIDON_RUNNER_EXECUTOR")]
    pub executor: Option<ExecutorKind>,
    /// runner.capacity: most runners (idle, claimed and being created) at once [default: 1000].
    #[arg(long, env = "POSEIDON_RUNNER_CAPACITY")]
    pub capacity: Option<usize>,
    /// runner.prewarm_threads: threads creating runners for the pools [default: 2].
    #[arg(long, env = "POSEIDON_RUNNER_PREWARM_THREADS")]
    pub prewarm_threads: Option<usize>,
    /// runner.max_output_bytes: output of one execution after which it is stopped with an
    /// error; 0 = unlimited [default: 0].
    #[arg(long, env = "POSEIDON_RUNNER_MAX_OUTPUT_BYTES")]
    pub max_output_bytes: Option<u64>,

    /// sandbox.images_dir: directory with one root file system directory per image.
    #[arg(long, env = "POSEIDON_SANDBOX_IMAGES_DIR")]
    pub images_dir: Option<PathBuf>,
    /// sandbox.images: alias an image name to an image directory or `host`, as NAME=TARGET
    /// (repeatable).
    #[arg(long = "image", value_name = "NAME=TARGET", value_parser = parse_alias)]
    pub images: Vec<(String, String)>,
    /// sandbox.agent: poseidon-lite binary run inside each sandbox [default: this executable].
    #[arg(long, env = "POSEIDON_SANDBOX_AGENT")]
    pub agent: Option<PathBuf>,
    /// sandbox.pids_limit: most processes per runner [default: 512].
    #[arg(long, env = "POSEIDON_SANDBOX_PIDS_LIMIT")]
    pub pids_limit: Option<u32>,
    /// sandbox.total_pids_limit: most processes of all runners together; 0 = half the
    /// kernel's pid_max [default: 0].
    #[arg(long, env = "POSEIDON_SANDBOX_TOTAL_PIDS_LIMIT")]
    pub total_pids_limit: Option<u64>,
    /// sandbox.disk_limit_mb: size of a runner's writable layer in MiB [default: 256].
    #[arg(long, env = "POSEIDON_SANDBOX_DISK_LIMIT_MB")]
    pub disk_limit_mb: Option<u64>,
    /// sandbox.default_memory_limit_mb: memory limit for environments without one; 0 = none
    /// [default: 512].
    #[arg(long, env = "POSEIDON_SANDBOX_DEFAULT_MEMORY_LIMIT_MB")]
    pub default_memory_limit_mb: Option<u64>,
    /// sandbox.cpu_hard_limit: enforce cpuLimit as a hard quota besides the weight [default: false].
    #[arg(long, env = "POSEIDON_SANDBOX_CPU_HARD_LIMIT")]
    pub cpu_hard_limit: Option<bool>,
    /// sandbox.cpu_mhz: MHz of one core, to turn cpuLimit into a share of a core [default: 2000].
    #[arg(long, env = "POSEIDON_SANDBOX_CPU_MHZ")]
    pub cpu_mhz: Option<u32>,
    /// sandbox.uid_base: first host uid mapped into runners, 65536 per runner [default: 1048576].
    #[arg(long, env = "POSEIDON_SANDBOX_UID_BASE")]
    pub uid_base: Option<u32>,
    /// sandbox.cgroup_name: cgroup created under each controller for the runners
    /// [default: poseidon-lite].
    #[arg(long, env = "POSEIDON_SANDBOX_CGROUP_NAME")]
    pub cgroup_name: Option<String>,

    /// network.enabled: allow environments with networkAccess (refused with 400 otherwise)
    /// [default: true].
    #[arg(long, env = "POSEIDON_NETWORK_ENABLED")]
    pub network_enabled: Option<bool>,
    /// network.ipv4_range: range runners' IPv4 /31s come from [default: 10.200.0.0/16].
    #[arg(long, env = "POSEIDON_NETWORK_IPV4_RANGE")]
    pub network_ipv4_range: Option<String>,
    /// network.ipv6_range: range runners' IPv6 /64s come from [default: fd00:200::/48].
    #[arg(long, env = "POSEIDON_NETWORK_IPV6_RANGE")]
    pub network_ipv6_range: Option<String>,
    /// network.allowed_ranges: private or special-purpose ranges runners may reach anyway,
    /// comma-separated CIDRs (e.g. a package mirror) [default: none].
    #[arg(long, env = "POSEIDON_NETWORK_ALLOWED_RANGES", value_delimiter = ',')]
    pub network_allowed_ranges: Vec<String>,
    /// network.dns: resolvers for runners' /etc/resolv.conf, comma-separated [default: the
    /// host's non-loopback resolvers, else 8.8.8.8, 8.8.4.4].
    #[arg(long, env = "POSEIDON_NETWORK_DNS", value_delimiter = ',')]
    pub network_dns: Vec<IpAddr>,
    /// network.publish_address: address exposed ports listen on [default: 127.0.0.1].
    #[arg(long, env = "POSEIDON_NETWORK_PUBLISH_ADDRESS")]
    pub network_publish_address: Option<IpAddr>,
    /// network.advertise_host: host written into mappedPorts [default: the publish address].
    #[arg(long, env = "POSEIDON_NETWORK_ADVERTISE_HOST")]
    pub network_advertise_host: Option<String>,
    /// network.connection_limit: connections one runner may have open at once [default: 64].
    #[arg(long, env = "POSEIDON_NETWORK_CONNECTION_LIMIT")]
    pub network_connection_limit: Option<u32>,
    /// network.forward_connections: connections the exposed ports of one runner forward at
    /// once; more wait in the backlog [default: 32].
    #[arg(long, env = "POSEIDON_NETWORK_FORWARD_CONNECTIONS")]
    pub network_forward_connections: Option<usize>,
    /// network.mtu: MTU of runner interfaces, 0 = that of the host's default route [default: 0].
    #[arg(long, env = "POSEIDON_NETWORK_MTU")]
    pub network_mtu: Option<u32>,

    /// images.registry_mirrors: base URL tried first for Docker Hub names, like Docker's
    /// registry-mirrors (repeatable; comma-separated in the variable) [default: none].
    #[arg(
        long = "registry-mirror",
        value_name = "URL",
        env = "POSEIDON_IMAGES_REGISTRY_MIRRORS",
        value_delimiter = ',',
        global = true
    )]
    pub registry_mirrors: Vec<String>,
    /// images.insecure_registries: registry reached over plain HTTP, as `HOST[:PORT]`
    /// (repeatable; loopback registries always are) [default: none].
    #[arg(
        long = "insecure-registry",
        value_name = "HOST[:PORT]",
        env = "POSEIDON_IMAGES_INSECURE_REGISTRIES",
        value_delimiter = ',',
        global = true
    )]
    pub insecure_registries: Vec<String>,
    /// images.ca_file: PEM certificates trusted for registries besides the system's roots.
    #[arg(
        long = "images-ca-file",
        env = "POSEIDON_IMAGES_CA_FILE",
        global = true
    )]
    pub images_ca_file: Option<PathBuf>,
    /// images.auth_file: registry credentials in Docker's config.json format.
    #[arg(
        long = "images-auth-file",
        env = "POSEIDON_IMAGES_AUTH_FILE",
        global = true
    )]
    pub images_auth_file: Option<PathBuf>,
    /// images.offline: never contact a registry; only stored (imported) images [default: false].
    #[arg(
        long = "images-offline",
        env = "POSEIDON_IMAGES_OFFLINE",
        global = true
    )]
    pub images_offline: Option<bool>,
    /// images.max_unpacked_bytes: most uncompressed bytes of one image [default: 32 GiB].
    #[arg(
        long = "images-max-unpacked-bytes",
        env = "POSEIDON_IMAGES_MAX_UNPACKED_BYTES",
        global = true
    )]
    pub images_max_unpacked_bytes: Option<u64>,
    /// images.max_entries: most files (tar entries) of one image [default: 4000000].
    #[arg(
        long = "images-max-entries",
        env = "POSEIDON_IMAGES_MAX_ENTRIES",
        global = true
    )]
    pub images_max_entries: Option<u64>,
    /// images.max_path_bytes: longest path or link target in a layer [default: 4096].
    #[arg(
        long = "images-max-path-bytes",
        env = "POSEIDON_IMAGES_MAX_PATH_BYTES",
        global = true
    )]
    pub images_max_path_bytes: Option<usize>,
    /// images.max_header_bytes: largest tar extension header in a layer [default: 1 MiB].
    #[arg(
        long = "images-max-header-bytes",
        env = "POSEIDON_IMAGES_MAX_HEADER_BYTES",
        global = true
    )]
    pub images_max_header_bytes: Option<u64>,

    /// state.dir: directory for environments, claimed runners, workspaces and images
    /// [default: $XDG_STATE_HOME/poseidon-lite or ~/.local/state/poseidon-lite].
    #[arg(long, env = "POSEIDON_STATE_DIR", global = true)]
    pub state_dir: Option<PathBuf>,
    /// state.sync: sync runner records to the disk before a claim is answered (survives a
    /// crash of the machine, costs a disk flush per claim) [default: false].
    #[arg(long, env = "POSEIDON_STATE_SYNC")]
    pub state_sync: Option<bool>,
    /// metrics.listen: address serving GET /metrics WITHOUT the token, for scrapers on a
    /// trusted network (e.g. 127.0.0.1:9200) [default: none; the API's /api/v1/metrics needs
    /// the token].
    #[arg(long, env = "POSEIDON_METRICS_LISTEN")]
    pub metrics_listen: Option<std::net::SocketAddr>,

    /// Destroy every runner of the state directory, claimed ones included (their files are
    /// lost), then exit. Claimed runners otherwise outlive the server for the next one to take
    /// back. Run it only while no server runs on the state directory.
    #[arg(long)]
    pub destroy_runners: bool,
    /// server.tls.active: serve HTTPS and WSS (TLS 1.3) on both listeners [default: false].
    #[arg(long = "tls", env = "POSEIDON_SERVER_TLS_ACTIVE")]
    pub tls_active: Option<bool>,
    /// server.tls.certfile: PEM certificate chain, re-read on SIGHUP.
    #[arg(long = "tls-certfile", env = "POSEIDON_SERVER_TLS_CERTFILE")]
    pub tls_certfile: Option<PathBuf>,
    /// server.tls.keyfile: PEM private key, re-read on SIGHUP.
    #[arg(long = "tls-keyfile", env = "POSEIDON_SERVER_TLS_KEYFILE")]
    pub tls_keyfile: Option<PathBuf>,

    /// influxdb.url: InfluxDB v2 to push Poseidon's measurements to, e.g. http://influxdb:8086
    /// [default: none, off].
    #[arg(long, env = "POSEIDON_INFLUXDB_URL")]
    pub influxdb_url: Option<String>,
    /// influxdb.token: InfluxDB API token.
    #[arg(long, env = "POSEIDON_INFLUXDB_TOKEN", hide_env_values = true)]
    pub influxdb_token: Option<String>,
    /// influxdb.organization: InfluxDB organization.
    #[arg(long, env = "POSEIDON_INFLUXDB_ORGANIZATION")]
    pub influxdb_organization: Option<String>,
    /// influxdb.bucket: InfluxDB bucket.
    #[arg(long, env = "POSEIDON_INFLUXDB_BUCKET")]
    pub influxdb_bucket: Option<String>,
    /// influxdb.stage: tag `stage` of every point.
    #[arg(long, env = "POSEIDON_INFLUXDB_STAGE")]
    pub influxdb_stage: Option<String>,

    /// logger.level: error, warn, info, debug (one line per request) or trace [default: info].
    #[arg(long, env = "POSEIDON_LOGGER_LEVEL", global = true)]
    pub log_level: Option<String>,
}

/// Commands besides serving.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Environment definitions: export them from a server, import them into another (a
    /// Poseidon on a Nomad cluster, or another poseidon-lite).
    #[command(subcommand)]
    Environments(EnvironmentsCommand),
    /// The image store in the state directory (safe while the server runs).
    #[command(subcommand)]
    Image(ImageArgs),
}

/// `environments …`.
#[derive(Debug, Subcommand)]
pub enum EnvironmentsCommand {
    /// Prints the environments of a running server as JSON that a Poseidon or poseidon-lite
    /// accepts through its PUT route ({"executionEnvironments":[…]}).
    Export {
        /// API of the server [default: this configuration's server]; its token is
        /// server.token (--token).
        #[arg(long, value_name = "URL")]
        from: Option<String>,
    },
    /// Puts the environments of an export (standard input, or --file) into the server at URL
    /// (e.g. `https://poseidon.example.org/api/v1`), one PUT each.
    Import {
        /// API of the receiving server.
        url: String,
        /// The receiving server's Poseidon-Token.
        #[arg(
            long = "to-token",
            env = "POSEIDON_IMPORT_TOKEN",
            hide_env_values = true
        )]
        token: Option<String>,
        /// Read the export from this file instead of standard input.
        #[arg(long, value_name = "FILE")]
        file: Option<PathBuf>,
    },
}

/// `poseidon-lite image …`
#[derive(Debug, Subcommand)]
pub enum ImageArgs {
    /// Import an image: an OCI image layout (directory or tar) or a `docker save` archive,
    /// optionally .gz or .zst compressed; `-` reads stdin.
    Import {
        /// The archive or layout directory.
        file: PathBuf,
        /// Store it under this name [default: the names the archive gives].
        #[arg(long)]
        name: Option<String>,
    },
    /// Pull an image from its registry (or a mirror).
    Pull {
        /// The image name as Docker writes it, e.g. openhpi/co_execenv_python:3.8.
        name: String,
    },
    /// List the stored images.
    Ls,
    /// Remove an image name (refused while an environment uses the image).
    Rm {
        /// The image name.
        name: String,
    },
}

impl From<ImageArgs> for ImageCommand {
    fn from(args: ImageArgs) -> ImageCommand {
        match args {
            ImageArgs::Import { file, name } => ImageCommand::Import { file, name },
            ImageArgs::Pull { name } => ImageCommand::Pull { name },
            ImageArgs::Ls => ImageCommand::Ls,
            ImageArgs::Rm { name } => ImageCommand::Rm { name },
        }
    }
}

fn parse_alias(text: &str) -> Result<(String, String), String> {
    let (name, target) = text.split_once('=').ok_or("expected NAME=TARGET")?;
    Ok((name.to_owned(), target.to_owned()))
}

impl Cli {
    /// The configuration: defaults, then the file, then variables and flags.
    pub fn into_config(self) -> Result<Config, String> {
        let mut config = match &self.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        let server = &mut config.server;
        set(&mut server.address, self.address);
        set(&mut server.port, self.port);
        if self.websocket_port.is_some() {
            server.websocket_port = self.websocket_port;
        }
        set_some(
            &mut server.token,
            self.token.filter(|token| !token.is_empty()),
        );
        set_some(&mut server.websocket_url, self.websocket_url);
        set(&mut server.workers, self.workers);
        set(&mut server.max_connections, self.max_connections);
        set(&mut server.max_body_bytes, self.max_body_bytes);
        set(&mut server.max_message_bytes, self.max_message_bytes);
        set(
            &mut server.prewarming_pool_threshold,
            self.prewarming_pool_threshold,
        );
        set(
            &mut server.websocket_timeout_secs,
            self.websocket_timeout_secs,
        );
        set(&mut server.http_timeout_secs, self.http_timeout_secs);
        set_some(&mut server.release, self.release);
        set(
            &mut server.systemd_socket_activation,
            self.systemd_socket_activation,
        );
        let runner = &mut config.runner;
        set(&mut runner.executor, self.executor);
        set(&mut runner.capacity, self.capacity);
        set(&mut runner.prewarm_threads, self.prewarm_threads);
        set(&mut runner.max_output_bytes, self.max_output_bytes);
        let sandbox = &mut config.sandbox;
        set_some(&mut sandbox.images_dir, self.images_dir);
        sandbox.images.extend(self.images);
        set_some(&mut sandbox.agent, self.agent);
        set(&mut sandbox.pids_limit, self.pids_limit);
        set(&mut sandbox.total_pids_limit, self.total_pids_limit);
        set(&mut sandbox.disk_limit_mb, self.disk_limit_mb);
        set(
            &mut sandbox.default_memory_limit_mb,
            self.default_memory_limit_mb,
        );
        set(&mut sandbox.cpu_hard_limit, self.cpu_hard_limit);
        set(&mut sandbox.cpu_mhz, self.cpu_mhz);
        set(&mut sandbox.uid_base, self.uid_base);
        set(&mut sandbox.cgroup_name, self.cgroup_name);
        let network = &mut config.network;
        set(&mut network.enabled, self.network_enabled);
        set(&mut network.ipv4_range, self.network_ipv4_range);
        set(&mut network.ipv6_range, self.network_ipv6_range);
        if !self.network_allowed_ranges.is_empty() {
            network.allowed_ranges = self.network_allowed_ranges;
        }
        if !self.network_dns.is_empty() {
            network.dns = self.network_dns;
        }
        set(&mut network.publish_address, self.network_publish_address);
        set_some(&mut network.advertise_host, self.network_advertise_host);
        set(&mut network.connection_limit, self.network_connection_limit);
        set(
            &mut network.forward_connections,
            self.network_forward_connections,
        );
        set(&mut network.mtu, self.network_mtu);
        let images = &mut config.images;
        if !self.registry_mirrors.is_empty() {
            images.registry_mirrors = self.registry_mirrors;
        }
        if !self.insecure_registries.is_empty() {
            images.insecure_registries = self.insecure_registries;
        }
        set_some(&mut images.ca_file, self.images_ca_file);
        set_some(&mut images.auth_file, self.images_auth_file);
        set(&mut images.offline, self.images_offline);
        set(
            &mut images.max_unpacked_bytes,
            self.images_max_unpacked_bytes,
        );
        set(&mut images.max_entries, self.images_max_entries);
        set(&mut images.max_path_bytes, self.images_max_path_bytes);
        set(&mut images.max_header_bytes, self.images_max_header_bytes);
        set(&mut config.state.dir, self.state_dir);
        set(&mut config.state.sync, self.state_sync);
        set(&mut config.logger.level, self.log_level);
        set_some(&mut config.metrics.listen, self.metrics_listen);
        let tls = &mut config.server.tls;
        set(&mut tls.active, self.tls_active);
        set_some(&mut tls.certfile, self.tls_certfile);
        set_some(&mut tls.keyfile, self.tls_keyfile);
        let influxdb = &mut config.influxdb;
        set(&mut influxdb.url, self.influxdb_url);
        set(&mut influxdb.token, self.influxdb_token);
        set(&mut influxdb.organization, self.influxdb_organization);
        set(&mut influxdb.bucket, self.influxdb_bucket);
        set(&mut influxdb.stage, self.influxdb_stage);
        Ok(config)
    }
}

fn set<T>(target: &mut T, value: Option<T>) {
    if let Some(value) = value {
        *target = value;
    }
}

fn set_some<T>(target: &mut Option<T>, value: Option<T>) {
    if value.is_some() {
        *target = value;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_the_defaults() {
        let cli = Cli::try_parse_from([
            "poseidon-lite",
            "--port",
            "0",
            "--executor",
            "process",
            "--image",
            "openhpi/co_execenv_python:3.8=host",
            "--http-timeout-secs",
            "9",
            "--network-allowed-ranges",
            "203.0.113.0/24,2001:db8::/32",
            "--network-dns",
            "203.0.113.53",
            "--registry-mirror",
            "http://127.0.0.1:5000",
            "--registry-mirror",
            "https://mirror.example",
            "--insecure-registry",
            "registry.lan:5000",
        ])
        .unwrap();
        let config = cli.into_config().unwrap();
        assert_eq!(config.server.port, 0);
        assert_eq!(config.server.http_timeout_secs, 9);
        assert_eq!(
            config.network.allowed_ranges,
            ["203.0.113.0/24", "2001:db8::/32"]
        );
        assert_eq!(
            config.network.dns,
            ["203.0.113.53".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(
            config.sandbox.images["openhpi/co_execenv_python:3.8"],
            "host"
        );
        assert_eq!(
            config.images.registry_mirrors,
            ["http://127.0.0.1:5000", "https://mirror.example"]
        );
        assert_eq!(config.images.insecure_registries, ["registry.lan:5000"]);
    }

    #[test]
    fn image_commands_take_the_global_settings() {
        let mut cli = Cli::try_parse_from([
            "poseidon-lite",
            "image",
            "import",
            "x.tar.zst",
            "--name",
            "a/b:1",
            "--state-dir",
            "/srv/state",
        ])
        .unwrap();
        let command = cli.command.take();
        assert_eq!(
            cli.into_config().unwrap().state.dir,
            PathBuf::from("/srv/state")
        );
        let Some(Command::Image(args)) = command else {
            panic!("no image command");
        };
        assert_eq!(
            ImageCommand::from(args),
            ImageCommand::Import {
                file: "x.tar.zst".into(),
                name: Some("a/b:1".into())
            }
        );
        let cli = Cli::try_parse_from(["poseidon-lite", "--port", "0"]).unwrap();
        assert!(cli.command.is_none(), "no command: the server");
    }

    #[test]
    fn bad_values_are_refused() {
        assert!(Cli::try_parse_from(["poseidon-lite", "--executor", "docker"]).is_err());
        assert!(Cli::try_parse_from(["poseidon-lite", "--image", "nothing"]).is_err());
    }
}
