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
    io::Write,
    net::{IpAddr, TcpListener, UdpSocket},
    os::fd::{AsFd, OwnedFd},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

use poseidon_lite::network::netlink::Netlink;

mod server;

pub use server::*;

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
