//! What runner networking needs from and changes on the host (its network namespace): the
//! start-up check, forwarding, the uplink's MTU, whether IPv6 leads anywhere, and the resolvers
//! runners get by default.

use std::{
    fs, io,
    net::IpAddr,
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use super::{firewall, netlink::Netlink};

/// Forwarding sysctls of the server's network namespace.
const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";
const IPV6_FORWARD: &str = "/proc/sys/net/ipv6/conf/all/forwarding";
const IPV6_CONF: &str = "/proc/sys/net/ipv6/conf";

/// Resolvers used when neither the configuration nor the host names a usable one (the ones
/// Poseidon's runners use).
pub const FALLBACK_DNS: &[&str] = &["8.8.8.8", "8.8.4.4", "2001:4860:4860::8888"];

/// Checks that runners can get network access here; the error names what is missing. The
/// kernel parts are tried for real in a throwaway network namespace (modules are often built
/// in, with no trace under `/sys/module`): a veth pair is created and `script` (the server's
/// table) loaded there; both vanish with the namespace.
pub fn check(script: &str) -> Result<(), String> {
    let euid = rustix::process::geteuid().as_raw();
    if euid != 0 {
        return Err(format!(
            "runner networking needs root (running as uid {euid})"
        ));
    }
    firewall::available()?;
    if !Path::new(IP_FORWARD).exists() {
        return Err(format!("{IP_FORWARD} is missing"));
    }
    let script = script.to_owned();
    std::thread::spawn(move || {
        crate::sys::sandbox::unshare_namespaces(libc::CLONE_NEWNET)
            .map_err(|err| format!("cannot create a network namespace: {err}"))?;
        let here = rustix::fs::open(
            "/proc/thread-self/ns/net",
            rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .map_err(|err| format!("cannot open a network namespace: {err}"))?;
        Netlink::open()
            .and_then(|mut netlink| netlink.create_veth("check0", "check1", here.as_fd(), 1500))
            .map_err(|err| format!("the kernel cannot create veth interfaces: {err}"))?;
        firewall::load(&script, false)
            .map_err(|err| format!("nf_tables cannot load the server's table: {err}"))
    })
    .join()
    .unwrap_or_else(|_| Err("the check panicked".into()))
}

/// Forwarding as it was before the server turned it on, kept in a file so that a server
/// restarted after a crash still knows (and restores it at its clean exit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Forwarding {
    /// `net.ipv4.ip_forward` before.
    pub ipv4: bool,
    /// `net.ipv6.conf.all.forwarding` before.
    pub ipv6: bool,
}

impl Forwarding {
    /// The values recorded in `marker`, or the current ones (then recorded there).
    pub fn remember(marker: &Path) -> io::Result<Forwarding> {
        if let Ok(text) = fs::read_to_string(marker) {
            let value = |key: &str| text.lines().any(|line| line == format!("{key}=1"));
            return Ok(Forwarding {
                ipv4: value("ipv4"),
                ipv6: value("ipv6"),
            });
        }
        let before = Forwarding {
            ipv4: read_flag(IP_FORWARD),
            ipv6: read_flag(IPV6_FORWARD),
        };
        let text = format!("ipv4={}\nipv6={}\n", before.ipv4 as u8, before.ipv6 as u8);
        if let Some(dir) = marker.parent() {
            fs::create_dir_all(dir)?;
        }
        fs::write(marker, text)?;
        Ok(before)
    }

    /// Turns forwarding on. IPv6 forwarding stops a host from accepting router
    /// advertisements, which would cost a SLAAC host its default route: interfaces that accept
    /// them are switched to accepting them while forwarding first.
    pub fn enable() -> io::Result<()> {
        if !read_flag(IPV6_FORWARD) {
            for entry in fs::read_dir(IPV6_CONF).into_iter().flatten().flatten() {
                let name = entry.file_name();
                if name == "all" || name == "default" {
                    continue;
                }
                let path = entry.path().join("accept_ra");
                if fs::read_to_string(&path).is_ok_and(|value| value.trim() == "1") {
                    let _ = fs::write(&path, "2");
                }
            }
        }
        fs::write(IP_FORWARD, "1")?;
        if Path::new(IPV6_FORWARD).exists() {
            fs::write(IPV6_FORWARD, "1")?;
        }
        Ok(())
    }

    /// Puts forwarding back as it was.
    pub fn restore(&self) {
        if !self.ipv4 {
            let _ = fs::write(IP_FORWARD, "0");
        }
        if !self.ipv6 && Path::new(IPV6_FORWARD).exists() {
            let _ = fs::write(IPV6_FORWARD, "0");
        }
    }
}

fn read_flag(path: &str) -> bool {
    fs::read_to_string(path).is_ok_and(|value| value.trim() != "0")
}

/// Whether the host has an IPv6 default route (otherwise runners get no IPv6 address, so that
/// clients fail over to IPv4 at once).
pub fn has_ipv6_default_route() -> bool {
    let table = fs::read_to_string("/proc/thread-self/net/ipv6_route").unwrap_or_default();
    table.lines().any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.len() >= 10
            && fields[0].bytes().all(|b| b == b'0')
            && fields[1] == "00"
            && fields[9] != "lo"
    })
}

/// MTU of the interface of the IPv4 default route, 1500 when unknown. (`thread-self`: the
/// calling thread's namespace, which `/proc/net` of the process need not be.)
pub fn uplink_mtu(netlink: &mut Netlink) -> u32 {
    let table = fs::read_to_string("/proc/thread-self/net/route").unwrap_or_default();
    let uplink = table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        (fields.len() > 7 && fields[1] == "00000000" && fields[7] == "00000000")
            .then(|| fields[0].to_owned())
    });
    let links = netlink.links().unwrap_or_default();
    uplink
        .and_then(|name| links.into_iter().find(|link| link.name == name))
        .map_or(1500, |link| link.mtu.clamp(1280, 65535))
}

/// The runners' resolvers: the configured ones, else the host's (`/etc/resolv.conf`) except
/// loopback ones (a runner cannot reach the host), else [`FALLBACK_DNS`].
pub fn resolvers(configured: &[IpAddr], resolv_conf: &Path) -> Vec<IpAddr> {
    if !configured.is_empty() {
        return configured.to_vec();
    }
    let text = fs::read_to_string(resolv_conf).unwrap_or_default();
    let host: Vec<IpAddr> = text
        .lines()
        .filter_map(|line| line.trim().strip_prefix("nameserver"))
        .filter_map(|rest| rest.trim().split('%').next()?.parse().ok())
        .filter(|addr: &IpAddr| !addr.is_loopback() && !addr.is_unspecified())
        .collect();
    if !host.is_empty() {
        return host;
    }
    FALLBACK_DNS.iter().filter_map(|s| s.parse().ok()).collect()
}

/// The runner's `/etc/resolv.conf`.
pub fn resolv_conf(resolvers: &[IpAddr]) -> String {
    let mut text = String::from("# written by poseidon-lite (network.dns)\n");
    for resolver in resolvers {
        text += &format!("nameserver {resolver}\n");
    }
    text
}

/// Where the server remembers that its table is loaded: `<state dir>/network/active`.
pub fn marker(state_dir: &Path) -> PathBuf {
    state_dir.join("network").join("active")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolvers_come_from_the_configuration_the_host_or_the_fallback() {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("resolv.conf");
        let configured: Vec<IpAddr> = vec!["203.0.113.53".parse().unwrap()];
        assert_eq!(resolvers(&configured, &conf), configured);
        fs::write(
            &conf,
            "search x\nnameserver 127.0.0.53\nnameserver 10.1.2.3\n",
        )
        .unwrap();
        assert_eq!(
            resolvers(&[], &conf),
            vec!["10.1.2.3".parse::<IpAddr>().unwrap()]
        );
        fs::write(&conf, "nameserver 127.0.0.53\nnameserver ::1\n").unwrap();
        assert_eq!(resolvers(&[], &conf).len(), FALLBACK_DNS.len());
        assert_eq!(
            resolv_conf(&configured),
            "# written by poseidon-lite (network.dns)\nnameserver 203.0.113.53\n"
        );
    }

    #[test]
    fn the_marker_keeps_the_first_values() {
        let dir = tempfile::tempdir().unwrap();
        let marker = marker(dir.path());
        fs::create_dir_all(marker.parent().unwrap()).unwrap();
        fs::write(&marker, "ipv4=0\nipv6=1\n").unwrap();
        let before = Forwarding::remember(&marker).unwrap();
        assert_eq!(
            before,
            Forwarding {
                ipv4: false,
                ipv6: true
            }
        );
    }
}
