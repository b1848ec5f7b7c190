//! The server's one nftables table (`inet poseidon_lite`): rendered from the configuration,
//! loaded with a single `nft -f -` (one transaction that replaces any earlier copy, e.g. the one
//! a crashed server left), removed at a clean exit. It selects runner traffic by interface name
//! (`plh-*`), so it holds no per-runner rule and never changes while runners come and go.
//!
//! Runners' own namespaces are not involved: whatever root inside a runner does to its own
//! routes and rules, every packet still crosses this table on the host.

use std::{
    io::{self, Write},
    net::IpAddr,
    process::{Command, Stdio},
};

use super::addr::{BLOCKED_V4, BLOCKED_V6, Cidr, INTERFACE_PREFIX};

/// Name of the table (family `inet`).
pub const TABLE: &str = "poseidon_lite";

/// What the ruleset is rendered from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rules {
    /// Runner IPv4 range (masqueraded).
    pub v4: Cidr,
    /// Runner IPv6 range (masqueraded).
    pub v6: Cidr,
    /// Ranges exempted from the block list.
    pub allowed: Vec<Cidr>,
    /// Resolvers runners may reach on port 53 even inside blocked ranges.
    pub dns: Vec<IpAddr>,
    /// New connections one runner address may have open at once.
    pub connection_limit: u32,
    /// Drop IPv4 forwarding that involves no runner: set when the host did not forward IPv4
    /// before the server turned forwarding on, so it does not become a router for anything else.
    pub guard_v4: bool,
    /// The same for IPv6.
    pub guard_v6: bool,
}

/// Renders the script for `nft -f -`: create-if-missing, delete, create, all one transaction.
pub fn render(rules: &Rules) -> String {
    let ifname = format!("\"{INTERFACE_PREFIX}*\"");
    let set = |name: &str, kind: &str, elements: Vec<String>| {
        let elements = if elements.is_empty() {
            String::new()
        } else {
            format!(" elements = {{ {} }};", elements.join(", "))
        };
        format!("  set {name} {{ type {kind}; flags interval; auto-merge;{elements} }}\n")
    };
    let of = |v4: bool, list: &[Cidr]| -> Vec<String> {
        list.iter()
            .filter(|range| range.addr.is_ipv4() == v4)
            .map(Cidr::to_string)
            .collect()
    };
    let dns = |v4: bool| -> Vec<String> {
        rules
            .dns
            .iter()
            .filter(|addr| addr.is_ipv4() == v4)
            .map(IpAddr::to_string)
            .collect()
    };
    let strings = |list: &[&str]| list.iter().map(|s| s.to_string()).collect();
    let limit = rules.connection_limit;
    let reject = "reject with icmpx type admin-prohibited";
    let mut out = format!("table inet {TABLE}\ndelete table inet {TABLE}\ntable inet {TABLE} {{\n");
    out += &set("blocked4", "ipv4_addr", strings(BLOCKED_V4));
    out += &set("blocked6", "ipv6_addr", strings(BLOCKED_V6));
    out += &set("allowed4", "ipv4_addr", of(true, &rules.allowed));
    out += &set("allowed6", "ipv6_addr", of(false, &rules.allowed));
    out += &set("dns4", "ipv4_addr", dns(true));
    out += &set("dns6", "ipv6_addr", dns(false));
    out += "  set connlimit4 { type ipv4_addr; size 65535; flags dynamic; }\n";
    out += "  set connlimit6 { type ipv6_addr; size 65535; flags dynamic; }\n";
    // Before routing: loopback destinations and spoofed sources never get further.
    out += &format!(
        "  chain pre {{
    type filter hook prerouting priority raw; policy accept;
    iifname {ifname} ip daddr 127.0.0.0/8 counter drop
    iifname {ifname} ip6 daddr ::1 counter drop
    iifname {ifname} icmpv6 type {{ nd-neighbor-solicit, nd-neighbor-advert }} return
    iifname {ifname} fib saddr . iif oif missing counter drop
  }}
"
    );
    // To the host itself, on any of its addresses: only answers to connections the host
    // opened (the port forwarder) and neighbour discovery.
    out += &format!(
        "  chain input {{
    type filter hook input priority filter - 5; policy accept;
    iifname {ifname} ct state established,related accept
    iifname {ifname} icmpv6 type {{ nd-neighbor-solicit, nd-neighbor-advert }} accept
    iifname {ifname} counter {reject}
  }}
"
    );
    let mut guard = String::new();
    for (on, family) in [(rules.guard_v4, "ipv4"), (rules.guard_v6, "ipv6")] {
        if on {
            guard += &format!(
                "    meta nfproto {family} iifname != {ifname} oifname != {ifname} counter drop\n"
            );
        }
    }
    out += &format!(
        "  chain forward {{
    type filter hook forward priority filter - 5; policy accept;
{guard}    iifname {ifname} oifname {ifname} counter {reject}
    iifname {ifname} ct state invalid counter drop
    oifname {ifname} ct state established,related accept
    oifname {ifname} counter drop
    iifname {ifname} ct state established,related accept
    iifname {ifname} ct state new add @connlimit4 {{ ip saddr ct count over {limit} }} counter {reject}
    iifname {ifname} ct state new add @connlimit6 {{ ip6 saddr ct count over {limit} }} counter {reject}
    iifname {ifname} ip daddr @dns4 meta l4proto {{ tcp, udp }} th dport 53 accept
    iifname {ifname} ip6 daddr @dns6 meta l4proto {{ tcp, udp }} th dport 53 accept
    iifname {ifname} ip daddr @allowed4 accept
    iifname {ifname} ip6 daddr @allowed6 accept
    iifname {ifname} ip daddr @blocked4 counter {reject}
    iifname {ifname} ip6 daddr @blocked6 counter {reject}
    iifname {ifname} accept
  }}
"
    );
    let (v4, v6) = (rules.v4, rules.v6);
    out += &format!(
        "  chain post {{
    type nat hook postrouting priority srcnat; policy accept;
    ip saddr {v4} ip daddr != {v4} masquerade
    ip6 saddr {v6} ip6 daddr != {v6} masquerade
  }}
}}
"
    );
    out
}

/// Loads `script` with `nft -f -` (or only checks it, with `check`).
pub fn load(script: &str, check: bool) -> io::Result<()> {
    let mut args = vec!["-f", "-"];
    if check {
        args.insert(0, "-c");
    }
    nft(&args, Some(script))
}

/// Removes the table; a missing table is no error.
pub fn remove() -> io::Result<()> {
    // `table x` then `delete table x` in one transaction: no error when it did not exist.
    nft(
        &["-f", "-"],
        Some(&format!("table inet {TABLE}\ndelete table inet {TABLE}\n")),
    )
}

/// Whether the `nft` binary runs.
pub fn available() -> Result<(), String> {
    nft(&["--version"], None)
        .map_err(|err| format!("the nft binary (Debian: nftables) cannot run: {err}"))
}

fn nft(args: &[&str], stdin: Option<&str>) -> io::Result<()> {
    let mut child = Command::new("nft")
        .args(args)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())?;
    }
    let output = child.wait_with_output()?;
    if output.status.success() {
        Ok(())
    } else {
        let message = String::from_utf8_lossy(&output.stderr);
        Err(io::Error::other(format!(
            "nft {} failed: {}",
            args.join(" "),
            message.trim()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> Rules {
        Rules {
            v4: "10.200.0.0/16".parse().unwrap(),
            v6: "fd00:200::/48".parse().unwrap(),
            allowed: vec![
                "203.0.113.0/24".parse().unwrap(),
                "2001:db8::/32".parse().unwrap(),
            ],
            dns: vec!["10.1.2.3".parse().unwrap()],
            connection_limit: 64,
            guard_v4: false,
            guard_v6: false,
        }
    }

    #[test]
    fn the_ruleset_blocks_the_private_ranges_spelt_right() {
        let text = render(&rules());
        for needle in [
            "172.16.0.0/12",
            "100.64.0.0/10",
            "169.254.0.0/16",
            "fc00::/7",
            "fe80::/10",
            "ct count over 64",
            "elements = { 203.0.113.0/24 }",
            "elements = { 2001:db8::/32 }",
            "set dns4 { type ipv4_addr; flags interval; auto-merge; elements = { 10.1.2.3 }; }",
            "ip saddr 10.200.0.0/16 ip daddr != 10.200.0.0/16 masquerade",
            "iifname \"plh-*\" oifname \"plh-*\" counter reject",
            "fib saddr . iif oif missing counter drop",
        ] {
            assert!(text.contains(needle), "{needle} missing from\n{text}");
        }
        assert!(!text.contains("171.16"));
        assert!(!text.contains("iifname != \"plh-*\""));
        assert!(text.starts_with(
            "table inet poseidon_lite\ndelete table inet poseidon_lite\ntable inet poseidon_lite {"
        ));
        // Nothing set by runners' sockets (no skuid, no uid matches): kernel-made packets
        // (neighbour discovery, resets) are judged like the rest.
        assert!(!text.contains("skuid"));
    }

    #[test]
    fn the_guard_appears_only_when_asked_for() {
        let mut rules = rules();
        rules.guard_v6 = true;
        rules.allowed.clear();
        let text = render(&rules);
        assert!(
            text.contains(
                "meta nfproto ipv6 iifname != \"plh-*\" oifname != \"plh-*\" counter drop"
            )
        );
        assert!(!text.contains("meta nfproto ipv4"));
        assert!(text.contains("set allowed4 { type ipv4_addr; flags interval; auto-merge; }"));
    }

    #[test]
    fn nft_loads_and_removes_the_ruleset_in_a_private_namespace() {
        if rustix::process::geteuid().as_raw() != 0 || available().is_err() {
            eprintln!("skipped: needs root and nft");
            return;
        }
        // A thread of its own in a new network namespace: `nft`, started from it, acts on
        // that namespace only, never on the host's firewall.
        std::thread::spawn(|| {
            crate::sys::sandbox::unshare_namespaces(libc::CLONE_NEWNET).unwrap();
            let script = render(&rules());
            load(&script, false).unwrap();
            // Loading again replaces the table atomically.
            load(&script, false).unwrap();
            remove().unwrap();
            remove().unwrap();
        })
        .join()
        .unwrap();
    }
}
