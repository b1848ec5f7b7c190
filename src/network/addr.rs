//! Addresses: CIDR ranges, the special-purpose ranges runners may not reach, and the per-runner
//! address plan (one IPv4 /31 and one IPv6 /64 per slot, interface `plh-<slot>`).

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

/// Prefix of the host-side interface names; the firewall selects runner traffic by it.
pub const INTERFACE_PREFIX: &str = "plh-";

/// IPv4 ranges a runner may not reach (IANA IPv4 special-purpose registry, private ranges,
/// multicast and reserved), unless exempted by `network.allowed_ranges`.
pub const BLOCKED_V4: &[&str] = &[
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.0.2.0/24",
    "192.31.196.0/24",
    "192.52.193.0/24",
    "192.88.99.0/24",
    "192.168.0.0/16",
    "192.175.48.0/24",
    "198.18.0.0/15",
    "198.51.100.0/24",
    "203.0.113.0/24",
    "224.0.0.0/4",
    "240.0.0.0/4",
];

/// IPv6 ranges a runner may not reach (IANA IPv6 special-purpose registry, unique local,
/// link-local, site-local, multicast; NAT64 and 6to4 so that no relay leads to private IPv4).
pub const BLOCKED_V6: &[&str] = &[
    "::/127",
    "::ffff:0:0/96",
    "64:ff9b::/96",
    "64:ff9b:1::/48",
    "100::/64",
    "2001::/23",
    "2001:db8::/32",
    "2002::/16",
    "3fff::/20",
    "5f00::/16",
    "fc00::/7",
    "fe80::/10",
    "fec0::/10",
    "ff00::/8",
];

/// An address range, `address/prefix`, with no host bits set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    /// The first address of the range.
    pub addr: IpAddr,
    /// The prefix length.
    pub prefix: u8,
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(text: &str) -> Result<Cidr, String> {
        let text = text.trim();
        let (addr, prefix) = match text.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (text, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("invalid address range {text:?}"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(prefix) => prefix
                .parse::<u8>()
                .ok()
                .filter(|prefix| *prefix <= max)
                .ok_or_else(|| format!("invalid prefix length in {text:?}"))?,
        };
        let cidr = Cidr { addr, prefix };
        if cidr.network() != addr {
            return Err(format!("{text:?} has host bits set (did you mean {cidr}?)"));
        }
        Ok(cidr)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network(), self.prefix)
    }
}

impl Cidr {
    /// The range's first address (host bits cleared).
    pub fn network(&self) -> IpAddr {
        match self.addr {
            IpAddr::V4(addr) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(u32::from(addr) & mask))
            }
            IpAddr::V6(addr) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(addr) & mask))
            }
        }
    }

    /// Whether `addr` lies in the range.
    pub fn contains(&self, addr: IpAddr) -> bool {
        let other = Cidr {
            addr,
            prefix: self.prefix,
        };
        addr.is_ipv4() == self.addr.is_ipv4() && other.network() == self.network()
    }
}

/// Parses a list of ranges (e.g. `network.allowed_ranges`); the error names the bad one.
pub fn parse_ranges(ranges: &[String]) -> Result<Vec<Cidr>, String> {
    ranges
        .iter()
        .filter(|range| !range.trim().is_empty())
        .map(|range| range.parse())
        .collect()
}

/// Whether a runner could reach `addr` without an exemption: not in a blocked range.
pub fn is_blocked(addr: IpAddr) -> bool {
    let list = if addr.is_ipv4() {
        BLOCKED_V4
    } else {
        BLOCKED_V6
    };
    list.iter()
        .filter_map(|range| range.parse::<Cidr>().ok())
        .any(|range| range.contains(addr))
}

/// The addresses of one runner slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotAddresses {
    /// Host-side interface name, `plh-<slot>`.
    pub interface: String,
    /// Host end of the /31 (the runner's gateway).
    pub host_v4: Ipv4Addr,
    /// Runner end of the /31.
    pub runner_v4: Ipv4Addr,
    /// Host end of the /64 (`::1`, the runner's gateway).
    pub host_v6: Ipv6Addr,
    /// Runner end of the /64 (`::2`).
    pub runner_v6: Ipv6Addr,
}

/// The address plan: which slots exist and what addresses each has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    v4: Cidr,
    v6: Cidr,
}

impl Plan {
    /// A plan over an IPv4 range (at most /31) and an IPv6 range (at most /64).
    pub fn new(v4: Cidr, v6: Cidr) -> Result<Plan, String> {
        if !v4.addr.is_ipv4() || v4.prefix > 31 {
            return Err(format!(
                "network.ipv4_range {v4} must be an IPv4 range of /31 or more"
            ));
        }
        if !v6.addr.is_ipv6() || v6.prefix > 64 {
            return Err(format!(
                "network.ipv6_range {v6} must be an IPv6 range of /64 or more"
            ));
        }
        Ok(Plan { v4, v6 })
    }

    /// The IPv4 range.
    pub fn v4(&self) -> Cidr {
        self.v4
    }

    /// The IPv6 range.
    pub fn v6(&self) -> Cidr {
        self.v6
    }

    /// Number of slots: /31 pairs in the IPv4 range and /64s in the IPv6 range, whichever is
    /// fewer, at most 2^20 (interface names stay short).
    pub fn slots(&self) -> u32 {
        let pairs = 1u64 << (31 - self.v4.prefix).min(20);
        let nets = 1u64 << (64 - self.v6.prefix).min(20);
        pairs.min(nets) as u32
    }

    /// The addresses of `slot` (which must be below [`Plan::slots`]).
    pub fn addresses(&self, slot: u32) -> SlotAddresses {
        let IpAddr::V4(v4) = self.v4.network() else {
            unreachable!("checked in Plan::new")
        };
        let IpAddr::V6(v6) = self.v6.network() else {
            unreachable!("checked in Plan::new")
        };
        let host_v4 = u32::from(v4) + 2 * slot;
        let net_v6 = u128::from(v6) | (u128::from(slot) << 64);
        SlotAddresses {
            interface: format!("{INTERFACE_PREFIX}{slot}"),
            host_v4: Ipv4Addr::from(host_v4),
            runner_v4: Ipv4Addr::from(host_v4 + 1),
            host_v6: Ipv6Addr::from(net_v6 | 1),
            runner_v6: Ipv6Addr::from(net_v6 | 2),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(v4: &str, v6: &str) -> Plan {
        Plan::new(v4.parse().unwrap(), v6.parse().unwrap()).unwrap()
    }

    #[test]
    fn ranges_parse_and_refuse_host_bits() {
        let cidr: Cidr = "172.16.0.0/12".parse().unwrap();
        assert!(cidr.contains("172.20.0.5".parse().unwrap()));
        assert!(!cidr.contains("171.16.0.1".parse().unwrap()));
        assert!(!cidr.contains("::1".parse().unwrap()));
        assert_eq!("10.0.0.1".parse::<Cidr>().unwrap().prefix, 32);
        assert_eq!(
            "10.0.0.1/8".parse::<Cidr>().unwrap_err(),
            "\"10.0.0.1/8\" has host bits set (did you mean 10.0.0.0/8?)"
        );
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("nonsense".parse::<Cidr>().is_err());
        assert!("::/0".parse::<Cidr>().is_ok());
    }

    #[test]
    fn every_block_list_entry_parses() {
        for range in BLOCKED_V4.iter().chain(BLOCKED_V6) {
            range.parse::<Cidr>().unwrap();
        }
    }

    #[test]
    fn private_special_and_metadata_addresses_are_blocked() {
        for addr in [
            "10.1.2.3",
            "172.20.0.5",
            "172.31.255.255",
            "192.168.1.5",
            "100.64.0.5",
            "169.254.169.254",
            "127.0.0.1",
            "224.0.0.1",
            "255.255.255.255",
            "203.0.113.10",
            "fd12:3456::5",
            "fe80::1",
            "::1",
            "ff02::1",
            "2001:db8::1",
            "::ffff:10.0.0.1",
            "64:ff9b::a01:203",
        ] {
            assert!(is_blocked(addr.parse().unwrap()), "{addr}");
        }
        for addr in [
            "171.16.0.1",
            "8.8.8.8",
            "1.1.1.1",
            "2a00:1450::1",
            "172.32.0.1",
        ] {
            assert!(!is_blocked(addr.parse().unwrap()), "{addr}");
        }
    }

    #[test]
    fn slots_are_31s_and_64s() {
        let plan = plan("10.200.0.0/16", "fd00:200::/48");
        assert_eq!(plan.slots(), 32768);
        let first = plan.addresses(0);
        assert_eq!(first.interface, "plh-0");
        assert_eq!(first.host_v4, Ipv4Addr::new(10, 200, 0, 0));
        assert_eq!(first.runner_v4, Ipv4Addr::new(10, 200, 0, 1));
        let slot = plan.addresses(300);
        assert_eq!(slot.host_v4, Ipv4Addr::new(10, 200, 2, 88));
        assert_eq!(slot.runner_v4, Ipv4Addr::new(10, 200, 2, 89));
        assert_eq!(
            slot.host_v6,
            "fd00:200:0:12c::1".parse::<Ipv6Addr>().unwrap()
        );
        assert_eq!(
            slot.runner_v6,
            "fd00:200:0:12c::2".parse::<Ipv6Addr>().unwrap()
        );
        let last = plan.addresses(plan.slots() - 1);
        assert_eq!(last.runner_v4, Ipv4Addr::new(10, 200, 255, 255));
        assert!(last.interface.len() <= 15);
    }

    #[test]
    fn the_smaller_range_bounds_the_slots() {
        assert_eq!(plan("10.200.0.0/24", "fd00:200::/48").slots(), 128);
        assert_eq!(plan("10.0.0.0/8", "fd00:200::/60").slots(), 16);
        assert_eq!(plan("10.0.0.0/8", "fd00::/8").slots(), 1 << 20);
        assert!(Plan::new("10.0.0.0/32".parse().unwrap(), "fd00::/64".parse().unwrap()).is_err());
        assert!(Plan::new("fd00::/64".parse().unwrap(), "fd00::/64".parse().unwrap()).is_err());
    }
}
