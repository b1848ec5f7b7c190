//! A world of network namespaces for the network tests; nothing leaves this machine and the
//! test process's own namespace is never changed.
//!
//! - "host": the server under test runs here (started from a thread that entered it). Uplink
//!   `up0` 198.51.100.2/24 and 2001:db8:1::2/64 towards "world", a LAN interface 192.168.50.2/24
//!   and fd50::2/64, and host services on 127.0.0.1:7001, 0.0.0.0:7002, [::1]:7003, [::]:7004
//!   and UDP 127.0.0.1:7005, 198.51.100.2:7006.
//! - "world": fake public hosts (203.0.113.10, 203.0.113.53, 2001:db8:99::10) and fake private
//!   ones (10.1.2.3, 172.20.0.5, 192.168.1.5, 100.64.0.5, 169.254.169.254, fd12:3456::5), each
//!   with a TCP and UDP service on port 7000 answering `<its address> <the peer's address>`;
//!   203.0.113.10:7007 keeps connections open; 10.1.2.3 also answers on port 53.
//!
//! Namespaces are held by descriptors only (never named under /run/netns): they vanish with the
//! test process, also when it fails. Tests skip (with a message) without root, `ip` or `nft`.

#![allow(dead_code)]

use std::{
    io::{BufRead, BufReader, Write},
    net::{IpAddr, TcpListener, UdpSocket},
    os::fd::{AsFd, OwnedFd},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicU32, Ordering},
        mpsc,
    },
    time::Duration,
};

use poseidon_lite::network::netlink::Netlink;

/// Public hosts of the world.
pub const PUBLIC: &[&str] = &["203.0.113.10", "203.0.113.53", "2001:db8:99::10"];
/// Private and special-purpose hosts of the world.
pub const PRIVATE: &[&str] = &[
    "10.1.2.3",
    "172.20.0.5",
    "192.168.1.5",
    "100.64.0.5",
    "169.254.169.254",
    "fd12:3456::5",
];
/// The host's uplink addresses, as the world sees masqueraded runners.
pub const UPLINK_V4: &str = "198.51.100.2";
/// See [`UPLINK_V4`].
pub const UPLINK_V6: &str = "2001:db8:1::2";
/// Port of the world's services.
pub const SERVICE_PORT: u16 = 7000;
/// Port of a service on the first public host that keeps connections open.
pub const HOLD_PORT: u16 = 7007;

/// A bash function per probe kind; each prints `<kind> <target> <port> => <answer or error>`.
pub const PROBES: &str = r#"
t() { r=$(timeout 5 bash -c "exec 3<>/dev/tcp/$1/$2 && head -n1 <&3" 2>&1); echo "T $1 $2 => ${r:-EMPTY}"; }
u() { r=$(timeout 3 bash -c "exec 3<>/dev/udp/$1/$2 && printf x >&3 && dd bs=512 count=1 status=none <&3" 2>&1); echo "U $1 $2 => ${r:-EMPTY}"; }
"#;

/// The answers of a probe script: (kind, target, port) → answer.
pub fn answers(output: &str) -> Vec<(String, String)> {
    output
        .lines()
        .filter_map(|line| line.split_once(" => "))
        .map(|(probe, answer)| (probe.trim().to_owned(), answer.trim().to_owned()))
        .collect()
}

/// The service's answer `<its address> <peer>`, if the probe reached one.
pub fn reached(answer: &str) -> Option<(String, String)> {
    let mut words = answer.split_whitespace();
    let (local, peer) = (words.next()?, words.next()?);
    local.parse::<std::net::IpAddr>().ok()?;
    peer.parse::<std::net::IpAddr>().ok()?;
    Some((local.to_owned(), peer.to_owned()))
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A network namespace, held by a descriptor.
#[derive(Debug)]
pub struct Ns {
    fd: OwnedFd,
}

impl Ns {
    /// A new, empty network namespace (loopback up).
    pub fn new() -> Ns {
        let fd = std::thread::spawn(|| {
            // SAFETY: only this thread's network namespace changes; it ends right after.
            let result = unsafe { libc::unshare(libc::CLONE_NEWNET) };
            assert_eq!(result, 0, "unshare: {}", std::io::Error::last_os_error());
            rustix::fs::open(
                "/proc/thread-self/ns/net",
                rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
                rustix::fs::Mode::empty(),
            )
            .expect("open the namespace")
        })
        .join()
        .expect("namespace thread");
        let ns = Ns { fd };
        ns.ip("link set lo up");
        ns
    }

    /// Runs `f` on a thread inside the namespace; threads it spawns stay there.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let fd = self.fd.try_clone().expect("dup");
        std::thread::spawn(move || {
            let kind = Some(rustix::thread::LinkNameSpaceType::Network);
            rustix::thread::move_into_link_name_space(fd.as_fd(), kind).expect("setns");
            f()
        })
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    }

    /// Runs `ip <args>` inside; panics on failure.
    pub fn ip(&self, args: &str) {
        self.sh(&format!("ip {args}"));
    }

    /// Runs a shell command inside; panics on failure; returns its stdout.
    pub fn sh(&self, command: &str) -> String {
        let command = command.to_owned();
        self.run(move || {
            let output = Command::new("sh")
                .args(["-c", &command])
                .output()
                .expect("sh runs");
            assert!(
                output.status.success(),
                "{command}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
            String::from_utf8_lossy(&output.stdout).into_owned()
        })
    }

    /// Runs a bash script inside; returns its stdout whatever its exit status.
    pub fn bash(&self, script: &str) -> String {
        let script = script.to_owned();
        self.run(move || {
            let output = Command::new("bash")
                .args(["-c", &script])
                .output()
                .expect("bash runs");
            String::from_utf8_lossy(&output.stdout).into_owned()
        })
    }

    /// Like [`Ns::sh`], but failure is returned.
    pub fn try_sh(&self, command: &str) -> Result<String, String> {
        let command = command.to_owned();
        self.run(move || {
            let output = Command::new("sh")
                .args(["-c", &command])
                .output()
                .map_err(|err| err.to_string())?;
            if output.status.success() {
                Ok(String::from_utf8_lossy(&output.stdout).into_owned())
            } else {
                Err(String::from_utf8_lossy(&output.stderr).into_owned())
            }
        })
    }

    /// Links `name` here to `peer` in `other` with a veth pair.
    pub fn veth(&self, name: &str, other: &Ns, peer: &str) {
        let other_fd = other.fd.try_clone().expect("dup");
        let name = name.to_owned();
        let peer_name = peer.to_owned();
        self.run(move || {
            let mut netlink = Netlink::open().expect("netlink");
            netlink
                .create_veth(&name, &peer_name, other_fd.as_fd(), 1500)
                .expect("veth");
        });
        other.ip(&format!("link set {peer} up"));
    }
}

/// The host and world namespaces with their services.
#[derive(Debug)]
pub struct World {
    /// Where the server runs.
    pub host: Ns,
    /// The outside.
    pub world: Ns,
    /// Behind the host's LAN interface (kept: the interface lives as long as it does).
    _lan: Ns,
    /// Unique name part for cgroups and state.
    pub name: String,
}

/// Root, `ip` and `nft`; `None` (with a message) when something is missing.
pub fn world() -> Option<World> {
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: the network tests need root");
        return None;
    }
    for tool in ["ip -V", "nft --version"] {
        let ok = Command::new("sh")
            .args(["-c", &format!("{tool} >/dev/null 2>&1")])
            .status()
            .is_ok_and(|status| status.success());
        if !ok {
            eprintln!("skipped: the network tests need `{tool}` (iproute2, nftables)");
            return None;
        }
    }
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let name = format!("poseidon-lite-net-{}-{n}", std::process::id());
    let host = Ns::new();
    let world = Ns::new();
    host.veth("up0", &world, "wl0");
    // The LAN leads to a namespace of its own (no dummy interfaces needed).
    let lan = Ns::new();
    host.veth("lan0", &lan, "lan1");
    for (cmd, ns) in [
        ("addr add 198.51.100.2/24 dev up0", &host),
        ("addr add 2001:db8:1::2/64 dev up0 nodad", &host),
        ("link set up0 up", &host),
        ("route add default via 198.51.100.1", &host),
        ("route add default via 2001:db8:1::1", &host),
        ("addr add 192.168.50.2/24 dev lan0", &host),
        ("addr add fd50::2/64 dev lan0 nodad", &host),
        ("link set lan0 up", &host),
        ("addr add 198.51.100.1/24 dev wl0", &world),
        ("addr add 2001:db8:1::1/64 dev wl0 nodad", &world),
        ("link set wl0 up", &world),
    ] {
        ns.ip(cmd);
    }
    for addr in PUBLIC.iter().chain(PRIVATE) {
        let options = if addr.contains(':') {
            "/128 nodad"
        } else {
            "/32"
        };
        world.ip(&format!("addr add {addr}{options} dev lo"));
        serve(&world, addr.parse().unwrap(), SERVICE_PORT);
    }
    for (addr, port) in [
        ("127.0.0.1", 7001),
        ("0.0.0.0", 7002),
        ("::1", 7003),
        ("::", 7004),
    ] {
        serve_tcp(&host, addr.parse().unwrap(), port);
    }
    serve_hold(&world, PUBLIC[0].parse().unwrap(), HOLD_PORT);
    // A private resolver's port (see `network.dns`).
    serve(&world, PRIVATE[0].parse().unwrap(), 53);
    serve_udp(&host, "127.0.0.1".parse().unwrap(), 7005);
    serve_udp(&host, UPLINK_V4.parse().unwrap(), 7006);
    Some(World {
        host,
        world,
        _lan: lan,
        name,
    })
}

/// A TCP and a UDP service on `addr:port` in `ns`.
fn serve(ns: &Ns, addr: IpAddr, port: u16) {
    serve_tcp(ns, addr, port);
    serve_udp(ns, addr, port);
}

/// Answers each connection with `<local> <peer>`.
fn serve_tcp(ns: &Ns, addr: IpAddr, port: u16) {
    let listener = ns.run(move || TcpListener::bind((addr, port)).expect("bind tcp"));
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let local = stream.local_addr().map(|a| a.ip().to_string());
            let peer = stream.peer_addr().map(|a| a.ip().to_string());
            if let (Ok(local), Ok(peer)) = (local, peer) {
                let _ = writeln!(stream, "{local} {peer}");
            }
        }
    });
}

/// Keeps each connection open until the client closes it.
fn serve_hold(ns: &Ns, addr: IpAddr, port: u16) {
    let listener = ns.run(move || TcpListener::bind((addr, port)).expect("bind tcp"));
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut &stream, &mut std::io::sink());
            });
        }
    });
}

/// Answers each datagram with `<local> <peer>`.
fn serve_udp(ns: &Ns, addr: IpAddr, port: u16) {
    let socket = ns.run(move || UdpSocket::bind((addr, port)).expect("bind udp"));
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        while let Ok((_, peer)) = socket.recv_from(&mut buf) {
            let _ = socket.send_to(format!("{addr} {}\n", peer.ip()).as_bytes(), peer);
        }
    });
}

/// The server binary, running in the host namespace; killed and its cgroups removed on drop.
#[derive(Debug)]
pub struct Server {
    child: Option<Child>,
    lines: mpsc::Receiver<String>,
    seen: std::sync::Mutex<Vec<String>>,
    pub state: PathBuf,
    cgroup: String,
    /// `http://127.0.0.1:7200`, valid inside the host namespace.
    pub base: String,
}

impl Server {
    /// Starts the server with `--state-dir state`, network settings for this world, and
    /// `extra` environment variables.
    pub fn start(world: &World, state: PathBuf, extra: &[(&str, &str)]) -> Server {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let cgroup = format!("{}-{n}", world.name);
        let slot = (std::process::id().wrapping_mul(7) + n) % 256;
        // A region of its own: the sandbox tests take 64-runner blocks from 2^24, the server
        // tests from 2^31 (each up to 2^30 further); parallel tests never share ids, nor see
        // each other's processes.
        let uid_base = ((3u32 << 30) + (slot % 128) * 64 * 65536).to_string();
        let mut vars: Vec<(String, String)> = [
            ("POSEIDON_SERVER_PORT", "7200"),
            ("POSEIDON_SERVER_WEBSOCKET_PORT", "7201"),
            ("POSEIDON_RUNNER_EXECUTOR", "sandbox"),
            ("POSEIDON_SANDBOX_CGROUP_NAME", cgroup.as_str()),
            ("POSEIDON_SANDBOX_UID_BASE", uid_base.as_str()),
            ("POSEIDON_SANDBOX_PIDS_LIMIT", "256"),
            (
                "POSEIDON_NETWORK_ALLOWED_RANGES",
                "203.0.113.0/24,2001:db8::/32",
            ),
            ("POSEIDON_NETWORK_DNS", "203.0.113.53"),
            ("POSEIDON_NETWORK_PUBLISH_ADDRESS", UPLINK_V4),
            ("POSEIDON_LOGGER_LEVEL", "info"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        vars.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let state_dir = state.clone();
        let mut child = world.host.run(move || {
            Command::new(env!("CARGO_BIN_EXE_poseidon-lite"))
                .arg("--image")
                .arg("openhpi/co_execenv_python:3.8=host")
                .arg("--state-dir")
                .arg(&state_dir)
                .env_remove("RUST_LOG")
                .envs(vars)
                .stderr(Stdio::piped())
                .spawn()
                .expect("server starts")
        });
        let stderr = child.stderr.take().expect("stderr");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("server: {line}");
                let _ = tx.send(line);
            }
        });
        let server = Server {
            child: Some(child),
            lines,
            seen: std::sync::Mutex::new(Vec::new()),
            state,
            cgroup,
            base: "http://127.0.0.1:7200".to_owned(),
        };
        server.wait_for("HTTP API listening on ");
        server
    }

    /// Waits for a log line containing `needle` (also one logged before).
    pub fn wait_for(&self, needle: &str) -> String {
        let mut seen = self.seen.lock().unwrap();
        if let Some(line) = seen.iter().find(|line| line.contains(needle)) {
            return line.clone();
        }
        loop {
            let line = self
                .lines
                .recv_timeout(Duration::from_secs(30))
                .unwrap_or_else(|_| panic!("no log line with {needle:?}"));
            seen.push(line.clone());
            if line.contains(needle) {
                return line;
            }
        }
    }

    /// SIGKILL, as a crash.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait: a clean exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = rustix::process::Pid::from_child(&child);
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            let _ = child.wait();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
        // Runners end with their server; their groups and the server's go (retried while the
        // last processes exit).
        for _ in 0..50 {
            let mut left = false;
            for controller in std::fs::read_dir("/sys/fs/cgroup")
                .into_iter()
                .flatten()
                .flatten()
            {
                let group = controller.path().join(&self.cgroup);
                for runner in std::fs::read_dir(&group).into_iter().flatten().flatten() {
                    if runner.path().is_dir() {
                        let _ = std::fs::remove_dir(runner.path());
                    }
                }
                if std::fs::remove_dir(&group).is_err() && group.exists() {
                    left = true;
                }
            }
            if !left {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// An HTTP client for the server; call it on a thread inside the host namespace.
pub fn api(method: &str, path: &str, body: Option<&serde_json::Value>) -> (u16, serde_json::Value) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into();
    let url = format!("http://127.0.0.1:7200/api/v1{path}");
    let response = match (method, body) {
        ("PUT", Some(body)) => agent.put(&url).send_json(body),
        ("POST", Some(body)) => agent.post(&url).send_json(body),
        ("GET", _) => agent.get(&url).call(),
        ("DELETE", _) => agent.delete(&url).call(),
        ("PATCH", Some(body)) => agent.patch(&url).send_json(body),
        other => panic!("unsupported request {other:?}"),
    };
    let mut response = response.unwrap_or_else(|err| panic!("{method} {path}: {err}"));
    let status = response.status().as_u16();
    let text = response.body_mut().read_to_string().unwrap_or_default();
    (
        status,
        serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
    )
}

/// An environment of the host image; call it inside the host namespace.
pub fn environment(id: u64, pool: u32, network: bool, ports: &[u16]) -> u16 {
    let body = serde_json::json!({"id": id, "image": "openhpi/co_execenv_python:3.8",
        "prewarmingPoolSize": pool, "cpuLimit": 0, "memoryLimit": 0,
        "networkAccess": network, "exposedPorts": ports});
    api("PUT", &format!("/execution-environments/{id}"), Some(&body)).0
}

/// Waits until environment `id` has `idle` idle runners; inside the host namespace.
pub fn wait_idle(id: u64, idle: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (_, stats) = api("GET", "/statistics/execution-environments", None);
        if stats[id.to_string()]["idleRunners"].as_u64() == Some(idle) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no {idle} idle runners: {stats}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Claims a runner; returns its id and mapped ports; inside the host namespace.
pub fn claim(env: u64) -> (String, serde_json::Value) {
    let body = serde_json::json!({"executionEnvironmentId": env, "inactivityTimeout": 300});
    let (status, answer) = api("POST", "/runners", Some(&body));
    assert_eq!(status, 200, "claim: {answer}");
    (
        answer["runnerId"].as_str().expect("runnerId").to_owned(),
        answer["mappedPorts"].clone(),
    )
}

/// Runs `script` (bash, uploaded as a file: commands may not hold quotes) in a runner, root
/// inside when `privileged`; returns stdout.
pub fn run(runner: &str, script: &str, privileged: bool) -> String {
    let files = serde_json::json!({"copy": [{"path": "script.sh",
        "content": crate::support::base64(script.as_bytes())}]});
    let (status, answer) = api("PATCH", &format!("/runners/{runner}/files"), Some(&files));
    assert_eq!(status, 204, "copy: {answer}");
    let body = serde_json::json!({"command": "bash script.sh", "timeLimit": 120,
        "privilegedExecution": privileged});
    let (status, answer) = api("POST", &format!("/runners/{runner}/execute"), Some(&body));
    assert_eq!(status, 200, "execute: {answer}");
    let url = answer["websocketUrl"].as_str().expect("websocketUrl");
    let transcript = crate::support::Ws::connect(url, None)
        .unwrap_or_else(|err| panic!("connect {url}: {err}"))
        .transcript();
    transcript.stdout.replace("\r\n", "\n")
}
