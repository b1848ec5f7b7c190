//! Runner networking: `networkAccess` and `exposedPorts` for sandbox runners.
//!
//! Each networked runner gets one routed veth pair — `plh-<slot>` on the host, `eth0` in the
//! runner — with an IPv4 /31 and an IPv6 /64 from configured ranges, set up in-process over
//! rtnetlink ([`netlink`]). One static nftables table ([`firewall`]) filters every runner alike
//! by interface name: no new connections to the host itself, to other runners, into runners,
//! to private and special-purpose ranges; no spoofed sources, no loopback destinations; a
//! connection limit per runner; egress masqueraded. Exposed ports are forwarded by listeners in
//! the server ([`forward`]), without NAT rules.
//!
//! Nothing on the host changes until the first networked runner is built (or the server
//! restarts after a crash with its table loaded): servers without networked environments
//! never touch forwarding or nftables.

pub mod addr;
pub mod firewall;
pub mod forward;
pub mod host;
pub mod netlink;

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::BorrowedFd,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, OnceLock},
};

use self::{
    addr::{Cidr, INTERFACE_PREFIX, Plan},
    firewall::Rules,
    host::Forwarding,
    netlink::Netlink,
};
use crate::{
    config::{Config, NetworkConfig},
    error::{Error, Result},
};

/// Name of the runner end of the veth pair.
const RUNNER_INTERFACE: &str = "eth0";

/// Runner networking of one server.
#[derive(Debug)]
pub struct Network {
    config: NetworkConfig,
    plan: Plan,
    rules: Rules,
    resolvers: Vec<IpAddr>,
    marker: PathBuf,
    /// Whether this host can do it: checked on first use.
    available: OnceLock<Result<(), String>>,
    active: Mutex<Option<Active>>,
    slots: Mutex<Slots>,
}

/// Facts of the host found when the table was loaded.
#[derive(Debug, Clone, Copy)]
struct Active {
    forwarding: Forwarding,
    ipv6: bool,
    mtu: u32,
}

#[derive(Debug, Default)]
struct Slots {
    free: Vec<u32>,
    next: u32,
}

impl Network {
    /// Reads the configuration (errors name the bad setting). When the table of an earlier
    /// server of this state directory is still loaded (it crashed), it is reloaded at once and
    /// the interfaces of its runners removed.
    pub fn new(config: &Config) -> Result<Arc<Network>> {
        let network = &config.network;
        let bad = |err: String| Error::Internal(format!("network configuration: {err}"));
        let v4: Cidr = network.ipv4_range.parse().map_err(bad)?;
        let v6: Cidr = network.ipv6_range.parse().map_err(bad)?;
        let plan = Plan::new(v4, v6).map_err(bad)?;
        let allowed = addr::parse_ranges(&network.allowed_ranges).map_err(bad)?;
        if network.connection_limit == 0 {
            return Err(bad("connection_limit must be at least 1".into()));
        }
        let resolvers = host::resolvers(&network.dns, Path::new("/etc/resolv.conf"));
        let rules = Rules {
            v4,
            v6,
            allowed,
            dns: resolvers.clone(),
            connection_limit: network.connection_limit,
            guard_v4: false,
            guard_v6: false,
        };
        let network = Arc::new(Network {
            config: network.clone(),
            plan,
            rules,
            resolvers,
            marker: host::marker(&config.state.dir),
            available: OnceLock::new(),
            active: Mutex::new(None),
            slots: Mutex::new(Slots::default()),
        });
        if network.marker.exists() {
            log::info!("network: the table of an earlier run is loaded; reloading it");
            if let Err(err) = network.activate() {
                log::error!("network: cannot recover: {err}");
            }
        }
        Ok(network)
    }

    /// Whether runners can get network access: a 400 naming what is missing otherwise.
    pub fn check(&self) -> Result<()> {
        if !self.config.enabled {
            return Err(Error::bad_request(
                "networkAccess is disabled on this server (network.enabled = false)",
            ));
        }
        let available = self.available.get_or_init(|| {
            let result = host::check(&firewall::render(&self.rules));
            if let Err(reason) = &result {
                log::warn!("network: runners cannot get network access: {reason}");
            }
            result
        });
        available
            .clone()
            .map_err(|reason| Error::bad_request(format!("networkAccess is unavailable: {reason}")))
    }

    /// The configuration.
    pub fn config(&self) -> &NetworkConfig {
        &self.config
    }

    /// The runners' `/etc/resolv.conf`.
    pub fn resolv_conf(&self) -> String {
        host::resolv_conf(&self.resolvers)
    }

    /// Loads the table and turns forwarding on, once; removes interfaces of dead runners.
    fn activate(&self) -> Result<Active> {
        let mut active = self.active.lock().unwrap();
        if let Some(active) = *active {
            return Ok(active);
        }
        self.check()?;
        let failed = |err: std::io::Error| Error::internal("network: cannot set up the host", err);
        let forwarding = Forwarding::remember(&self.marker).map_err(failed)?;
        let rules = Rules {
            guard_v4: !forwarding.ipv4,
            guard_v6: !forwarding.ipv6,
            ..self.rules.clone()
        };
        // The table before forwarding: there is no moment without the filter.
        firewall::load(&firewall::render(&rules), false).map_err(failed)?;
        Forwarding::enable().map_err(failed)?;
        let mut netlink = Netlink::open().map_err(failed)?;
        remove_leftovers(&mut netlink);
        let mtu = match self.config.mtu {
            0 => host::uplink_mtu(&mut netlink),
            mtu => mtu,
        };
        let ipv6 = host::has_ipv6_default_route();
        log::info!(
            "network: table inet {} loaded; runners in {} and {}, mtu {mtu}, ipv6 {}",
            firewall::TABLE,
            self.plan.v4(),
            self.plan.v6(),
            if ipv6 { "on" } else { "off (no default route)" }
        );
        let facts = Active {
            forwarding,
            ipv6,
            mtu,
        };
        *active = Some(facts);
        Ok(facts)
    }

    /// Gives the runner whose network namespace is `netns` its interface, addresses and
    /// routes. Undone when the returned [`Attachment`] is dropped.
    pub fn attach(self: &Arc<Self>, netns: BorrowedFd<'_>) -> Result<Attachment> {
        let active = self.activate()?;
        let slot = self.take_slot()?;
        let addresses = self.plan.addresses(slot);
        let attachment = Attachment {
            network: self.clone(),
            slot,
            interface: addresses.interface.clone(),
            runner_v4: addresses.runner_v4,
            runner_v6: active.ipv6.then_some(addresses.runner_v6),
        };
        // On error, dropping `attachment` removes whatever part exists.
        let started = std::time::Instant::now();
        wire(&addresses, netns, &active)
            .map_err(|err| Error::internal("network: cannot wire the runner", err))?;
        log::debug!(
            "network: {} wired in {:.3} ms",
            addresses.interface,
            started.elapsed().as_secs_f64() * 1000.0
        );
        Ok(attachment)
    }

    fn take_slot(&self) -> Result<u32> {
        let mut slots = self.slots.lock().unwrap();
        if let Some(slot) = slots.free.pop() {
            return Ok(slot);
        }
        if slots.next < self.plan.slots() {
            slots.next += 1;
            return Ok(slots.next - 1);
        }
        Err(Error::Internal("network: no free address slot".into()))
    }

    /// Removes the table and puts forwarding back (clean exit, after every runner ended).
    pub fn shutdown(&self) {
        let Some(active) = self.active.lock().unwrap().take() else {
            return;
        };
        if let Err(err) = firewall::remove() {
            log::error!(
                "network: cannot remove table inet {}: {err}",
                firewall::TABLE
            );
            return;
        }
        active.forwarding.restore();
        let _ = std::fs::remove_file(&self.marker);
        log::info!("network: table removed");
    }
}

/// Creates the veth pair and configures both ends.
fn wire(
    addresses: &addr::SlotAddresses,
    netns: BorrowedFd<'_>,
    active: &Active,
) -> std::io::Result<()> {
    let name = &addresses.interface;
    let mut host = Netlink::open()?;
    match host.create_veth(name, RUNNER_INTERFACE, netns, active.mtu) {
        // A leftover of a runner whose namespace the kernel has not cleaned up yet.
        Err(err) if err.raw_os_error() == Some(libc::EEXIST) => {
            host.delete_link(name)?;
            host.create_veth(name, RUNNER_INTERFACE, netns, active.mtu)?;
        }
        other => other?,
    }
    let index = host.index(name)?;
    host.add_address(index, IpAddr::V4(addresses.host_v4), 31)?;
    if active.ipv6 {
        host.add_address(index, IpAddr::V6(addresses.host_v6), 64)?;
    }
    let mut inner = Netlink::open_in(netns)?;
    let eth0 = inner.index(RUNNER_INTERFACE)?;
    inner.set_up(eth0)?;
    inner.add_address(eth0, IpAddr::V4(addresses.runner_v4), 31)?;
    inner.add_default_route(eth0, IpAddr::V4(addresses.host_v4))?;
    if active.ipv6 {
        inner.add_address(eth0, IpAddr::V6(addresses.runner_v6), 64)?;
        inner.add_default_route(eth0, IpAddr::V6(addresses.host_v6))?;
    }
    Ok(())
}

/// Deletes every `plh-*` interface: their runners are gone (runners do not survive their
/// server), and a new one would collide with them.
fn remove_leftovers(netlink: &mut Netlink) {
    let Ok(links) = netlink.links() else { return };
    for link in links {
        if link.name.starts_with(INTERFACE_PREFIX) {
            match netlink.delete_link(&link.name) {
                Ok(()) => log::info!("network: removed leftover interface {}", link.name),
                // The peer of one removed before.
                Err(err) if err.raw_os_error() == Some(libc::ENODEV) => {}
                Err(err) => log::warn!("network: cannot remove {}: {err}", link.name),
            }
        }
    }
}

/// A runner's network: its interface and address slot. Dropping it deletes the interface
/// (with the runner's end) and frees the slot.
#[derive(Debug)]
pub struct Attachment {
    network: Arc<Network>,
    slot: u32,
    interface: String,
    runner_v4: Ipv4Addr,
    runner_v6: Option<Ipv6Addr>,
}

impl Attachment {
    /// The runner's IPv4 address.
    pub fn runner_v4(&self) -> Ipv4Addr {
        self.runner_v4
    }

    /// The runner's IPv6 address, when the host has IPv6.
    pub fn runner_v6(&self) -> Option<Ipv6Addr> {
        self.runner_v6
    }

    /// The host-side interface.
    pub fn interface(&self) -> &str {
        &self.interface
    }
}

impl Drop for Attachment {
    fn drop(&mut self) {
        let deleted = Netlink::open().and_then(|mut netlink| netlink.delete_link(&self.interface));
        match deleted {
            // Gone with the runner's namespace already.
            Err(err) if err.raw_os_error() == Some(libc::ENODEV) => {}
            Err(err) => log::warn!("network: cannot delete {}: {err}", self.interface),
            Ok(()) => {}
        }
        self.network.slots.lock().unwrap().free.push(self.slot);
    }
}
