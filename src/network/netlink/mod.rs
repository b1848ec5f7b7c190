//! The few rtnetlink requests runner networking needs, encoded by hand over a rustix netlink
//! socket: create a veth pair with its peer directly in a runner's network namespace, add
//! addresses, default routes, set links up, list and delete links. Synchronous: one request,
//! one acknowledgement; no async runtime, no `ip` binary.

mod message;

use std::{
    io,
    net::IpAddr,
    os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
    time::Duration,
};

use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketFlags, SocketType, sockopt};

use self::message::*;

/// How long the kernel may take to answer one request.
const TIMEOUT: Duration = Duration::from_secs(5);

/// A link as listed by [`Netlink::links`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    /// Interface index.
    pub index: u32,
    /// Interface name.
    pub name: String,
    /// MTU in bytes.
    pub mtu: u32,
}

/// A NETLINK_ROUTE socket, bound to the network namespace it was opened in.
#[derive(Debug)]
pub struct Netlink {
    fd: OwnedFd,
    seq: u32,
}

impl Netlink {
    /// Opens a socket in the calling thread's network namespace.
    pub fn open() -> io::Result<Netlink> {
        let fd = rustix::net::socket_with(
            AddressFamily::NETLINK,
            SocketType::RAW,
            SocketFlags::CLOEXEC,
            None,
        )?;
        sockopt::set_socket_timeout(&fd, sockopt::Timeout::Recv, Some(TIMEOUT))?;
        sockopt::set_socket_timeout(&fd, sockopt::Timeout::Send, Some(TIMEOUT))?;
        Ok(Netlink { fd, seq: 0 })
    }

    /// Opens a socket in the network namespace `netns`: a netlink socket belongs to the
    /// namespace it was created in, so a short-lived thread enters `netns`, opens it and ends;
    /// no other thread ever changes its namespace.
    pub fn open_in(netns: BorrowedFd<'_>) -> io::Result<Netlink> {
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let kind = Some(rustix::thread::LinkNameSpaceType::Network);
                    rustix::thread::move_into_link_name_space(netns, kind)?;
                    Netlink::open()
                })
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("netlink thread panicked")))
        })
    }

    /// Creates veth pair `name` here, up, with its peer `peer` (down) in namespace
    /// `peer_netns`.
    pub fn create_veth(
        &mut self,
        name: &str,
        peer: &str,
        peer_netns: BorrowedFd<'_>,
        mtu: u32,
    ) -> io::Result<()> {
        let message = veth_message(name, peer, peer_netns.as_raw_fd() as u32, mtu);
        self.request(message)
    }

    /// Index of the link `name`.
    pub fn index(&mut self, name: &str) -> io::Result<u32> {
        let mut message = Message::new(RTM_GETLINK, NLM_F_REQUEST);
        message.put(&ifinfomsg(0, 0, 0));
        message.attr(IFLA_IFNAME, &c_string(name));
        let mut index = None;
        self.exchange(message, |kind, payload| {
            if kind == RTM_NEWLINK {
                index = parse_link(payload).map(|link| link.index);
            }
        })?;
        index.ok_or_else(|| io::Error::other(format!("no index for link {name}")))
    }

    /// Sets link `index` up.
    pub fn set_up(&mut self, index: u32) -> io::Result<()> {
        let mut message = Message::new(RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK);
        message.put(&ifinfomsg(index, IFF_UP, IFF_UP));
        self.request(message)
    }

    /// Adds `addr/prefix` to link `index` (IPv6 without duplicate address detection, so it is
    /// usable at once).
    pub fn add_address(&mut self, index: u32, addr: IpAddr, prefix: u8) -> io::Result<()> {
        self.request(address_message(index, addr, prefix))
    }

    /// Adds a default route via `gateway` on link `index`.
    pub fn add_default_route(&mut self, index: u32, gateway: IpAddr) -> io::Result<()> {
        self.request(route_message(index, gateway))
    }

    /// Deletes link `name` (for a veth, both ends).
    pub fn delete_link(&mut self, name: &str) -> io::Result<()> {
        let mut message = Message::new(RTM_DELLINK, NLM_F_REQUEST | NLM_F_ACK);
        message.put(&ifinfomsg(0, 0, 0));
        message.attr(IFLA_IFNAME, &c_string(name));
        self.request(message)
    }

    /// Every link of the namespace.
    pub fn links(&mut self) -> io::Result<Vec<Link>> {
        let mut message = Message::new(RTM_GETLINK, NLM_F_REQUEST | NLM_F_DUMP);
        message.put(&ifinfomsg(0, 0, 0));
        let mut links = Vec::new();
        self.exchange(message, |kind, payload| {
            if kind == RTM_NEWLINK {
                links.extend(parse_link(payload));
            }
        })?;
        Ok(links)
    }

    /// Sends a request that is answered by an acknowledgement only.
    fn request(&mut self, message: Message) -> io::Result<()> {
        self.exchange(message, |_, _| {})
    }

    /// Sends `message` and passes every answer to `each` until the acknowledgement, an error
    /// or the end of a dump.
    fn exchange(&mut self, message: Message, mut each: impl FnMut(u16, &[u8])) -> io::Result<()> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let dump = message.flags() & NLM_F_DUMP == NLM_F_DUMP;
        let bytes = message.finish(seq);
        let kernel = rustix::net::netlink::SocketAddrNetlink::new(0, 0);
        rustix::net::sendto(&self.fd, &bytes, SendFlags::empty(), &kernel)?;
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let (len, _) = rustix::net::recv(&self.fd, &mut buf[..], RecvFlags::empty())?;
            let mut rest = &buf[..len.min(buf.len())];
            while rest.len() >= 16 {
                let length = u32::from_ne_bytes(rest[0..4].try_into().unwrap()) as usize;
                let kind = u16::from_ne_bytes(rest[4..6].try_into().unwrap());
                let got = u32::from_ne_bytes(rest[8..12].try_into().unwrap());
                if length < 16 || length > rest.len() {
                    return Err(io::Error::other("malformed netlink answer"));
                }
                let payload = &rest[16..length];
                rest = &rest[align(length).min(rest.len())..];
                if got != seq {
                    continue;
                }
                match kind {
                    NLMSG_ERROR => return ack_result(payload),
                    NLMSG_DONE => return Ok(()),
                    kind => {
                        each(kind, payload);
                        if !dump {
                            // A plain request's answer is followed by no acknowledgement
                            // unless asked for; GETLINK is such a request.
                            return Ok(());
                        }
                    }
                }
            }
        }
    }
}

impl AsFd for Netlink {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}
