//! Configuration: every setting with its default, loaded from a TOML file and overridden by
//! `POSEIDON_<SECTION>_<KEY>` environment variables and command-line flags (see `cli`).

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

/// The whole configuration of a server.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Listeners, authentication and request limits.
    pub server: ServerConfig,
    /// Runner management.
    pub runner: RunnerConfig,
    /// The sandbox executor.
    pub sandbox: SandboxConfig,
    /// Network access and exposed ports of sandbox runners.
    pub network: NetworkConfig,
    /// Container images from registries and the image store.
    pub images: ImagesConfig,
    /// Persistent state.
    pub state: StateConfig,
    /// Logging.
    pub logger: LoggerConfig,
    /// Metrics.
    pub metrics: MetricsConfig,
    /// Poseidon's InfluxDB monitoring.
    pub influxdb: InfluxdbConfig,
}

/// `[influxdb]`: Poseidon's InfluxDB v2 monitoring (its keys and environment variables);
/// off while `url` is empty.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InfluxdbConfig {
    /// Base URL of InfluxDB, e.g. `http://influxdb:8086`; empty = off.
    pub url: String,
    /// API token.
    pub token: String,
    /// Organization.
    pub organization: String,
    /// Bucket.
    pub bucket: String,
    /// Tag `stage` of every point (e.g. `production`).
    pub stage: String,
    /// Pause before a failed write is tried again, in milliseconds (Poseidon: 5 s, 50 tries).
    pub retry_interval_ms: u64,
    /// Interval of the periodic pool and execution points, in seconds (Poseidon: 60).
    pub interval_secs: u64,
}

impl Default for InfluxdbConfig {
    fn default() -> Self {
        InfluxdbConfig {
            url: String::new(),
            token: String::new(),
            organization: String::new(),
            bucket: String::new(),
            stage: String::new(),
            retry_interval_ms: 5000,
            interval_secs: 60,
        }
    }
}

/// `[metrics]`: Prometheus metrics (always at `GET /api/v1/metrics` with the token).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// A separate address serving `GET /metrics` without the token, for scrapers on a trusted
    /// network; `None` = no such listener.
    pub listen: Option<std::net::SocketAddr>,
}

/// `[server]`: listeners, authentication and request limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address both listeners bind to.
    pub address: IpAddr,
    /// HTTP port; 0 picks a free one.
    pub port: u16,
    /// WebSocket port; `None` means `port + 1` (or ephemeral when `port` is 0); 0 picks a free
    /// one; the HTTP port means no second listener (the API port serves upgrades anyway).
    pub websocket_port: Option<u16>,
    /// Shared secret expected in the `Poseidon-Token` header; `None` disables authentication.
    pub token: Option<String>,
    /// Base of the WebSocket URLs handed to clients (e.g. `wss://runners.example.org`) when the
    /// server sits behind a proxy; by default it is built from the request's `Host` header.
    pub websocket_url: Option<String>,
    /// Number of HTTP worker threads, and again as many for downloads, listings and large
    /// bodies.
    pub workers: usize,
    /// Most open HTTP and WebSocket-handshake connections; more are answered 503 and closed.
    pub max_connections: usize,
    /// Largest accepted request body in bytes; larger ones get 413.
    pub max_body_bytes: u64,
    /// Largest accepted WebSocket message (stdin) in bytes.
    pub max_message_bytes: usize,
    /// `/health` answers 503 when an environment's idle runners fall below this fraction of its
    /// pool size (0 disables the check), like Poseidon's `prewarmingpoolthreshold`.
    pub prewarming_pool_threshold: f64,
    /// How long a WebSocket client may take for its handshake and may stall output, in seconds.
    pub websocket_timeout_secs: u64,
    /// How long an HTTP connection may stay silent (idle between requests, or stalled while
    /// sending a request or receiving a response) before it is closed, in seconds. Keep it
    /// above 5: CodeOcean's client reuses connections idle for up to 5 s.
    pub http_timeout_secs: u64,
    /// Version string served by `/version`.
    pub release: Option<String>,
    /// Listen on the sockets systemd passes (`LISTEN_FDS`) instead of binding
    /// `address`/`port`: the one named `http` (or the first) for the API, the one named
    /// `websocket` (or the second) for executions; without a second one the WebSocket
    /// listener binds `address` and `websocket_port` as usual. Poseidon's
    /// `systemdsocketactivation`.
    #[serde(alias = "systemdsocketactivation")]
    pub systemd_socket_activation: bool,
    /// TLS on both listeners (Poseidon's `server.tls`).
    pub tls: TlsConfig,
}

/// `[server.tls]`: HTTPS and WSS on both listeners, TLS 1.3 only (as Poseidon).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// Serve TLS.
    pub active: bool,
    /// PEM certificate chain (re-read on SIGHUP).
    pub certfile: Option<PathBuf>,
    /// PEM private key (re-read on SIGHUP).
    pub keyfile: Option<PathBuf>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            address: IpAddr::from([127, 0, 0, 1]),
            port: 7200,
            websocket_port: None,
            token: None,
            websocket_url: None,
            workers: 8,
            max_connections: 1024,
            max_body_bytes: 64 << 20,
            max_message_bytes: 1 << 20,
            prewarming_pool_threshold: 0.0,
            websocket_timeout_secs: 30,
            http_timeout_secs: 60,
            release: None,
            systemd_socket_activation: false,
            tls: TlsConfig::default(),
        }
    }
}

impl ServerConfig {
    /// The WebSocket port to bind.
    pub fn websocket_port(&self) -> u16 {
        match (self.websocket_port, self.port) {
            (Some(port), _) => port,
            (None, 0) => 0,
            (None, port) => port.saturating_add(1),
        }
    }

    /// The token clients must send; an empty one means no authentication, as in Poseidon.
    pub fn required_token(&self) -> Option<&str> {
        self.token.as_deref().filter(|token| !token.is_empty())
    }

    /// [`ServerConfig::websocket_timeout_secs`] as a duration.
    pub fn websocket_timeout(&self) -> Duration {
        Duration::from_secs(self.websocket_timeout_secs.max(1))
    }
}

/// Which executor builds runners.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExecutorKind {
    /// A private directory per runner, commands run as the server's user: no isolation.
    Process,
    /// A Linux sandbox per runner (namespaces, cgroups, own root file system).
    Sandbox,
}

impl std::str::FromStr for ExecutorKind {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "process" => Ok(ExecutorKind::Process),
            "sandbox" => Ok(ExecutorKind::Sandbox),
            other => Err(format!(
                "unknown executor {other:?} (expected process or sandbox)"
            )),
        }
    }
}

/// `[runner]`: runner management.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunnerConfig {
    /// The executor.
    pub executor: ExecutorKind,
    /// Most runners (idle, claimed and being created) that may exist at once.
    pub capacity: usize,
    /// Threads that create runners for the prewarming pools.
    pub prewarm_threads: usize,
    /// Largest output of one execution in bytes before it is stopped (0 = unlimited).
    pub max_output_bytes: u64,
}

impl Default for RunnerConfig {
    fn default() -> Self {
        RunnerConfig {
            executor: ExecutorKind::Sandbox,
            capacity: 1000,
            prewarm_threads: 2,
            max_output_bytes: 0,
        }
    }
}

/// Memory limit of runners whose environment sets `memoryLimit: 0`, in MiB: twice what
/// CodeOcean gives a new environment (256 MB), so that anything meant to run under CodeOcean's
/// defaults fits, including a JVM's default heap on small hosts; and small enough that a
/// handful of runaway runners cannot take a 4–8 GiB host down before the OOM killer picks them
/// (learner processes are its first choice).
pub const DEFAULT_MEMORY_LIMIT_MB: u64 = 512;

/// `[sandbox]`: the sandbox executor.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SandboxConfig {
    /// Directory holding one root file system directory per image.
    pub images_dir: Option<PathBuf>,
    /// Image names mapped to an image directory name or `host`.
    pub images: BTreeMap<String, String>,
    /// The poseidon-lite binary run as each sandbox's agent; default: the running executable
    /// (`/proc/self/exe`).
    pub agent: Option<PathBuf>,
    /// Most processes per runner.
    pub pids_limit: u32,
    /// Most processes of all runners together (0 = half the kernel's `pid_max`).
    pub total_pids_limit: u64,
    /// Size of a runner's writable layer in MiB.
    pub disk_limit_mb: u64,
    /// Memory limit in MiB for environments that set none (0 = unlimited). The default,
    /// [`DEFAULT_MEMORY_LIMIT_MB`], keeps one runner from taking the host's memory.
    pub default_memory_limit_mb: u64,
    /// Enforce `cpuLimit` as a hard quota (MHz / `cpu_mhz` of a core) besides the weight.
    pub cpu_hard_limit: bool,
    /// MHz of one core, to convert `cpuLimit` into a share of a core.
    pub cpu_mhz: u32,
    /// First host uid of the ranges mapped into runners (65536 uids each).
    pub uid_base: u32,
    /// Name of the cgroup created under each controller's root.
    pub cgroup_name: String,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig {
            images_dir: None,
            images: BTreeMap::new(),
            agent: None,
            pids_limit: 512,
            total_pids_limit: 0,
            disk_limit_mb: 256,
            default_memory_limit_mb: DEFAULT_MEMORY_LIMIT_MB,
            cpu_hard_limit: false,
            cpu_mhz: 2000,
            uid_base: 1 << 20,
            cgroup_name: "poseidon-lite".to_owned(),
        }
    }
}

/// `[network]`: network access (`networkAccess`) and exposed ports (`exposedPorts`) of sandbox
/// runners.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetworkConfig {
    /// Allow environments with `networkAccess: true` (refused with 400 when false).
    pub enabled: bool,
    /// Range runners' IPv4 /31s are taken from; masqueraded, must not be used on the site.
    pub ipv4_range: String,
    /// Range runners' IPv6 /64s are taken from; masqueraded, must not be used on the site.
    pub ipv6_range: String,
    /// Ranges runners may reach although they are private or special-purpose (e.g. a package
    /// mirror on the campus network), as CIDRs.
    pub allowed_ranges: Vec<String>,
    /// Resolvers written into runners' `/etc/resolv.conf`; reachable on port 53 even in a
    /// blocked range. Empty: the host's non-loopback resolvers, else 8.8.8.8 and 8.8.4.4.
    pub dns: Vec<IpAddr>,
    /// Address the listeners of exposed ports bind to (port 0: the kernel picks a free port).
    pub publish_address: IpAddr,
    /// Host written into `mappedPorts` (`<host>:<port>`); default: `publish_address`.
    pub advertise_host: Option<String>,
    /// New connections one runner may have open at once (per address family).
    pub connection_limit: u32,
    /// Connections the exposed ports of one runner forward at once; further ones wait in the
    /// listen backlog (one thread per runner serves them all).
    pub forward_connections: usize,
    /// MTU of runner interfaces; 0: that of the host's default route.
    pub mtu: u32,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        NetworkConfig {
            enabled: true,
            ipv4_range: "10.200.0.0/16".to_owned(),
            ipv6_range: "fd00:200::/48".to_owned(),
            allowed_ranges: Vec::new(),
            dns: Vec::new(),
            publish_address: IpAddr::from([127, 0, 0, 1]),
            advertise_host: None,
            connection_limit: 64,
            forward_connections: 32,
            mtu: 0,
        }
    }
}

/// `[images]`: container images pulled from registries (or imported) into the image store
/// under the state directory.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ImagesConfig {
    /// Base URLs tried first for Docker Hub names, like Docker's `registry-mirrors`.
    pub registry_mirrors: Vec<String>,
    /// Registries (`host[:port]`) reached over plain HTTP (loopback ones always are).
    pub insecure_registries: Vec<String>,
    /// PEM file of certificates trusted besides the system's roots.
    pub ca_file: Option<PathBuf>,
    /// Registry credentials in Docker's `config.json` format.
    pub auth_file: Option<PathBuf>,
    /// Never contact a registry: environments can use stored (imported) images only.
    pub offline: bool,
    /// Most uncompressed bytes of one image's layers.
    pub max_unpacked_bytes: u64,
    /// Most tar entries of one image's layers.
    pub max_entries: u64,
    /// Longest path or link target in a layer, in bytes.
    pub max_path_bytes: usize,
    /// Largest tar extension header (PAX, GNU long names) in a layer, in bytes.
    pub max_header_bytes: u64,
}

impl Default for ImagesConfig {
    fn default() -> Self {
        let limits = crate::image::Limits::default();
        ImagesConfig {
            registry_mirrors: Vec::new(),
            insecure_registries: Vec::new(),
            ca_file: None,
            auth_file: None,
            offline: false,
            max_unpacked_bytes: limits.max_unpacked_bytes,
            max_entries: limits.max_entries,
            max_path_bytes: limits.max_path,
            max_header_bytes: limits.max_header,
        }
    }
}

impl ImagesConfig {
    /// What the image store and registry client take.
    pub fn settings(&self) -> crate::image::service::ImagesSettings {
        crate::image::service::ImagesSettings {
            registry: crate::image::registry::RegistryConfig {
                mirrors: self.registry_mirrors.clone(),
                insecure: self.insecure_registries.clone(),
                ca_file: self.ca_file.clone(),
                auth_file: self.auth_file.clone(),
            },
            limits: crate::image::Limits {
                max_unpacked_bytes: self.max_unpacked_bytes,
                max_entries: self.max_entries,
                max_path: self.max_path_bytes,
                max_header: self.max_header_bytes,
            },
            offline: self.offline,
        }
    }
}

/// `[state]`: persistent state.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StateConfig {
    /// Directory for environments, runner workspaces and sandbox files.
    pub dir: PathBuf,
    /// Sync runner records to the disk before a claim is answered, so that answered claims
    /// survive a crash of the machine, not only of the server (costs a disk flush per claim,
    /// shared by concurrent claims).
    pub sync: bool,
}

impl Default for StateConfig {
    fn default() -> Self {
        StateConfig {
            dir: default_state_dir(),
            sync: false,
        }
    }
}

/// `[logger]`: logging.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoggerConfig {
    /// `error`, `warn`, `info`, `debug` or `trace`.
    pub level: String,
}

impl Default for LoggerConfig {
    fn default() -> Self {
        LoggerConfig {
            level: "info".to_owned(),
        }
    }
}

/// A directory the server can create without root: `$XDG_STATE_HOME/poseidon-lite`,
/// `~/.local/state/poseidon-lite`, or `poseidon-lite-state` in the temporary directory.
pub fn default_state_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_STATE_HOME").filter(|d| !d.is_empty()) {
        return Path::new(&dir).join("poseidon-lite");
    }
    if let Some(home) = std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        return Path::new(&home).join(".local/state/poseidon-lite");
    }
    std::env::temp_dir().join("poseidon-lite-state")
}

impl Config {
    /// Parses a TOML document.
    pub fn from_toml(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|err| err.to_string())
    }

    /// Reads and parses a TOML file.
    pub fn from_file(path: &Path) -> Result<Config, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|err| format!("cannot read {}: {err}", path.display()))?;
        Self::from_toml(&text).map_err(|err| format!("{}: {err}", path.display()))
    }

    /// A configuration for tests and embedding: ephemeral ports on loopback, the given state
    /// directory, the process executor, no registry access (`images.offline`).
    pub fn ephemeral(state_dir: impl Into<PathBuf>) -> Config {
        let mut config = Config::default();
        config.images.offline = true;
        config.server.port = 0;
        config.server.websocket_port = Some(0);
        config.state.dir = state_dir.into();
        config.runner.executor = ExecutorKind::Process;
        config
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_need_no_file() {
        let config = Config::from_toml("").unwrap();
        assert_eq!(config.server.port, 7200);
        assert_eq!(config.server.websocket_port(), 7201);
        assert_eq!(config.runner.executor, ExecutorKind::Sandbox);
    }

    #[test]
    fn sections_and_keys_are_read() {
        let config = Config::from_toml(
            "[server]\nport = 0\ntoken = \"s\"\n[runner]\nexecutor = \"sandbox\"\n\
             [sandbox.images]\n\"openhpi/co_execenv_python:3.8\" = \"host\"\n",
        )
        .unwrap();
        assert_eq!(config.server.websocket_port(), 0);
        assert_eq!(config.server.token.as_deref(), Some("s"));
        assert_eq!(config.runner.executor, ExecutorKind::Sandbox);
        assert_eq!(
            config.sandbox.images["openhpi/co_execenv_python:3.8"],
            "host"
        );
    }

    #[test]
    fn an_empty_token_means_no_authentication() {
        let config = Config::from_toml("[server]\ntoken = \"\"\n").unwrap();
        assert_eq!(config.server.required_token(), None);
    }

    #[test]
    fn the_shipped_configuration_is_valid() {
        let config = Config::from_toml(include_str!("../contrib/poseidon-lite.toml")).unwrap();
        assert_eq!(
            config.sandbox.images_dir.as_deref(),
            Some(Path::new("/var/lib/poseidon-lite/images"))
        );
    }

    #[test]
    fn unknown_keys_are_errors() {
        let err = Config::from_toml("[server]\nprot = 1\n").unwrap_err();
        assert!(err.contains("unknown field `prot`"), "{err}");
    }
}
