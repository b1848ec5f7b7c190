//! Encoding and decoding of the rtnetlink messages [`super::Netlink`] sends and receives:
//! headers, attributes (nested ones for the veth peer), acknowledgements and link listings.

use std::{io, net::IpAddr};

use super::Link;

pub(super) const NLMSG_ERROR: u16 = 2;
pub(super) const NLMSG_DONE: u16 = 3;
pub(super) const RTM_NEWLINK: u16 = 16;
pub(super) const RTM_DELLINK: u16 = 17;
pub(super) const RTM_GETLINK: u16 = 18;
pub(super) const RTM_NEWADDR: u16 = 20;
pub(super) const RTM_NEWROUTE: u16 = 24;

pub(super) const NLM_F_REQUEST: u16 = 0x1;
pub(super) const NLM_F_ACK: u16 = 0x4;
pub(super) const NLM_F_DUMP: u16 = 0x300;
pub(super) const NLM_F_EXCL: u16 = 0x200;
pub(super) const NLM_F_CREATE: u16 = 0x400;

pub(super) const IFLA_IFNAME: u16 = 3;
pub(super) const IFLA_MTU: u16 = 4;
pub(super) const IFLA_LINKINFO: u16 = 18;
pub(super) const IFLA_NET_NS_FD: u16 = 28;
pub(super) const IFLA_INFO_KIND: u16 = 1;
pub(super) const IFLA_INFO_DATA: u16 = 2;
pub(super) const VETH_INFO_PEER: u16 = 1;
pub(super) const NLA_F_NESTED: u16 = 0x8000;

pub(super) const IFA_ADDRESS: u16 = 1;
pub(super) const IFA_LOCAL: u16 = 2;
pub(super) const IFA_F_NODAD: u8 = 0x02;

pub(super) const RTA_OIF: u16 = 4;
pub(super) const RTA_GATEWAY: u16 = 5;
pub(super) const RT_TABLE_MAIN: u8 = 254;
pub(super) const RTPROT_STATIC: u8 = 4;
pub(super) const RTN_UNICAST: u8 = 1;

pub(super) const IFF_UP: u32 = 1;
pub(super) const AF_INET: u8 = libc::AF_INET as u8;
pub(super) const AF_INET6: u8 = libc::AF_INET6 as u8;

/// An NLMSG_ERROR payload: 0 is an acknowledgement, otherwise a negative errno.
pub(super) fn ack_result(payload: &[u8]) -> io::Result<()> {
    let code = payload
        .get(0..4)
        .map(|bytes| i32::from_ne_bytes(bytes.try_into().unwrap()))
        .ok_or_else(|| io::Error::other("short netlink error"))?;
    match code {
        0 => Ok(()),
        code => Err(io::Error::from_raw_os_error(-code)),
    }
}

/// Index, name and MTU from an RTM_NEWLINK payload.
pub(super) fn parse_link(payload: &[u8]) -> Option<Link> {
    let index = u32::from_ne_bytes(payload.get(4..8)?.try_into().ok()?);
    let mut link = Link {
        index,
        name: String::new(),
        mtu: 0,
    };
    let mut rest = payload.get(16..)?;
    while rest.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes(rest[0..2].try_into().ok()?));
        let kind = u16::from_ne_bytes(rest[2..4].try_into().ok()?) & !NLA_F_NESTED;
        if len < 4 || len > rest.len() {
            break;
        }
        let value = &rest[4..len];
        match kind {
            IFLA_IFNAME => {
                let name = value.split(|byte| *byte == 0).next().unwrap_or_default();
                link.name = String::from_utf8_lossy(name).into_owned();
            }
            IFLA_MTU if value.len() >= 4 => {
                link.mtu = u32::from_ne_bytes(value[0..4].try_into().ok()?);
            }
            _ => {}
        }
        rest = &rest[align(len).min(rest.len())..];
    }
    Some(link)
}

pub(super) fn align(len: usize) -> usize {
    (len + 3) & !3
}

pub(super) fn c_string(text: &str) -> Vec<u8> {
    let mut bytes = text.as_bytes().to_vec();
    bytes.push(0);
    bytes
}

/// `struct ifinfomsg` with family AF_UNSPEC.
pub(super) fn ifinfomsg(index: u32, flags: u32, change: u32) -> [u8; 16] {
    let mut bytes = [0u8; 16];
    bytes[4..8].copy_from_slice(&index.to_ne_bytes());
    bytes[8..12].copy_from_slice(&flags.to_ne_bytes());
    bytes[12..16].copy_from_slice(&change.to_ne_bytes());
    bytes
}

pub(super) fn veth_message(name: &str, peer: &str, peer_netns_fd: u32, mtu: u32) -> Message {
    let flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL;
    let mut message = Message::new(RTM_NEWLINK, flags);
    message.put(&ifinfomsg(0, IFF_UP, IFF_UP));
    message.attr(IFLA_IFNAME, &c_string(name));
    message.attr(IFLA_MTU, &mtu.to_ne_bytes());
    let info = message.begin(IFLA_LINKINFO);
    message.attr(IFLA_INFO_KIND, b"veth");
    let data = message.begin(IFLA_INFO_DATA);
    let peer_info = message.begin(VETH_INFO_PEER);
    // Not up yet: the kernel configures the peer before linking the pair (ENOTCONN).
    message.put(&ifinfomsg(0, 0, 0));
    message.attr(IFLA_IFNAME, &c_string(peer));
    message.attr(IFLA_MTU, &mtu.to_ne_bytes());
    message.attr(IFLA_NET_NS_FD, &peer_netns_fd.to_ne_bytes());
    message.end(peer_info);
    message.end(data);
    message.end(info);
    message
}

pub(super) fn address_message(index: u32, addr: IpAddr, prefix: u8) -> Message {
    let flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL;
    let mut message = Message::new(RTM_NEWADDR, flags);
    let (family, bytes, ifa_flags) = match addr {
        IpAddr::V4(addr) => (AF_INET, addr.octets().to_vec(), 0),
        IpAddr::V6(addr) => (AF_INET6, addr.octets().to_vec(), IFA_F_NODAD),
    };
    let mut header = [0u8; 8];
    header[0] = family;
    header[1] = prefix;
    header[2] = ifa_flags;
    header[4..8].copy_from_slice(&index.to_ne_bytes());
    message.put(&header);
    message.attr(IFA_LOCAL, &bytes);
    message.attr(IFA_ADDRESS, &bytes);
    message
}

pub(super) fn route_message(index: u32, gateway: IpAddr) -> Message {
    let flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL;
    let mut message = Message::new(RTM_NEWROUTE, flags);
    let (family, bytes) = match gateway {
        IpAddr::V4(addr) => (AF_INET, addr.octets().to_vec()),
        IpAddr::V6(addr) => (AF_INET6, addr.octets().to_vec()),
    };
    // struct rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags.
    let header = [
        family,
        0,
        0,
        0,
        RT_TABLE_MAIN,
        RTPROT_STATIC,
        0,
        RTN_UNICAST,
        0,
        0,
        0,
        0,
    ];
    message.put(&header);
    message.attr(RTA_GATEWAY, &bytes);
    message.attr(RTA_OIF, &index.to_ne_bytes());
    message
}

/// A netlink message under construction: header, fixed part, attributes.
#[derive(Debug)]
pub(super) struct Message {
    buf: Vec<u8>,
}

impl Message {
    pub(super) fn new(kind: u16, flags: u16) -> Message {
        let mut buf = vec![0u8; 16];
        buf[4..6].copy_from_slice(&kind.to_ne_bytes());
        buf[6..8].copy_from_slice(&flags.to_ne_bytes());
        Message { buf }
    }

    pub(super) fn flags(&self) -> u16 {
        u16::from_ne_bytes([self.buf[6], self.buf[7]])
    }

    pub(super) fn pad(&mut self) {
        self.buf.resize(align(self.buf.len()), 0);
    }

    pub(super) fn put(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
        self.pad();
    }

    pub(super) fn attr(&mut self, kind: u16, value: &[u8]) {
        let len = (4 + value.len()) as u16;
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.put(value);
    }

    /// Starts a nested attribute; returns where it starts, for [`Message::end`].
    pub(super) fn begin(&mut self, kind: u16) -> usize {
        let start = self.buf.len();
        self.buf.extend_from_slice(&[0, 0]);
        self.buf
            .extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
        start
    }

    pub(super) fn end(&mut self, start: usize) {
        let len = (self.buf.len() - start) as u16;
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
    }

    pub(super) fn finish(mut self, seq: u32) -> Vec<u8> {
        let len = self.buf.len() as u32;
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf[8..12].copy_from_slice(&seq.to_ne_bytes());
        self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(bytes: &[u8]) -> Vec<u32> {
        bytes
            .chunks(4)
            .map(|chunk| u32::from_ne_bytes(chunk.try_into().unwrap()))
            .collect()
    }

    #[test]
    fn veth_with_its_peer_in_another_namespace() {
        let bytes = veth_message("plh-7", "eth0", 9, 1400).finish(3);
        let expect: Vec<u8> = [
            &(bytes.len() as u32).to_ne_bytes()[..],
            &RTM_NEWLINK.to_ne_bytes(),
            &0x0605u16.to_ne_bytes(),
            &3u32.to_ne_bytes(),
            &0u32.to_ne_bytes(),
            &ifinfomsg(0, 1, 1),
            &10u16.to_ne_bytes(),
            &IFLA_IFNAME.to_ne_bytes(),
            b"plh-7\0\0\0",
            &8u16.to_ne_bytes(),
            &IFLA_MTU.to_ne_bytes(),
            &1400u32.to_ne_bytes(),
            &64u16.to_ne_bytes(),
            &(IFLA_LINKINFO | NLA_F_NESTED).to_ne_bytes(),
            &8u16.to_ne_bytes(),
            &IFLA_INFO_KIND.to_ne_bytes(),
            b"veth",
            &52u16.to_ne_bytes(),
            &(IFLA_INFO_DATA | NLA_F_NESTED).to_ne_bytes(),
            &48u16.to_ne_bytes(),
            &(VETH_INFO_PEER | NLA_F_NESTED).to_ne_bytes(),
            &ifinfomsg(0, 0, 0),
            &9u16.to_ne_bytes(),
            &IFLA_IFNAME.to_ne_bytes(),
            b"eth0\0\0\0\0",
            &8u16.to_ne_bytes(),
            &IFLA_MTU.to_ne_bytes(),
            &1400u32.to_ne_bytes(),
            &8u16.to_ne_bytes(),
            &IFLA_NET_NS_FD.to_ne_bytes(),
            &9u32.to_ne_bytes(),
        ]
        .concat();
        assert_eq!(words(&bytes), words(&expect));
        assert_eq!(bytes.len(), 116);
    }

    #[test]
    fn ipv6_addresses_skip_duplicate_detection() {
        let bytes = address_message(4, "fd00::2".parse().unwrap(), 64).finish(1);
        assert_eq!(
            &bytes[16..24],
            &[AF_INET6, 64, IFA_F_NODAD, 0, 4, 0, 0, 0][..]
        );
        assert_eq!(bytes.len(), 16 + 8 + 2 * 20);
        let bytes = address_message(4, "10.0.0.1".parse().unwrap(), 31).finish(1);
        assert_eq!(&bytes[16..24], &[AF_INET, 31, 0, 0, 4, 0, 0, 0][..]);
        assert_eq!(&bytes[28..32], &[10, 0, 0, 1][..]);
    }

    #[test]
    fn default_route_via_a_gateway() {
        let bytes = route_message(2, "10.0.0.0".parse().unwrap()).finish(1);
        assert_eq!(
            &bytes[16..28],
            &[AF_INET, 0, 0, 0, 254, 4, 0, 1, 0, 0, 0, 0][..]
        );
        assert_eq!(&bytes[28..36], &[8, 0, 5, 0, 10, 0, 0, 0][..]);
        assert_eq!(words(&bytes[36..44]), vec![0x0004_0008, 2]);
    }

    #[test]
    fn errors_and_links_are_parsed() {
        assert!(ack_result(&0i32.to_ne_bytes()).is_ok());
        let err = ack_result(&(-libc::EEXIST).to_ne_bytes()).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EEXIST));
        assert!(ack_result(&[1]).is_err());
        let mut message = Message::new(RTM_NEWLINK, 0);
        message.put(&ifinfomsg(12, 0, 0));
        message.attr(IFLA_IFNAME, b"plh-3\0");
        message.attr(IFLA_MTU, &1500u32.to_ne_bytes());
        let bytes = message.finish(0);
        let link = parse_link(&bytes[16..]).unwrap();
        assert_eq!(
            link,
            Link {
                index: 12,
                name: "plh-3".into(),
                mtu: 1500
            }
        );
        assert_eq!(parse_link(&[0; 3]), None);
    }
}
