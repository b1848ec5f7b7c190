//! systemd integration: readiness and watchdog notifications over `$NOTIFY_SOCKET`, and
//! listening sockets passed by socket activation (`$LISTEN_FDS`).
//!
//! The watchdog is fed only while the server really answers: every half interval it sends a
//! request to its own HTTP listener (`GET /api/v1/health`) and sends `WATCHDOG=1` on any HTTP
//! answer, 503 included, as Poseidon does. A server that stops answering is restarted by
//! systemd.

use std::{
    env,
    io::{self, Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    os::{linux::net::SocketAddrExt, unix::net::UnixDatagram},
    thread::{self, JoinHandle},
    time::Duration,
};

use crossbeam_channel::{Receiver, after, select};

use crate::sys::inherited::inherited_listener;

/// Sends a notification (`READY=1`, `WATCHDOG=1`, `STOPPING=1`, …) to the service manager;
/// `Ok(false)` when not started by one.
pub fn notify(state: &str) -> io::Result<bool> {
    let Some(path) = env::var_os("NOTIFY_SOCKET") else {
        return Ok(false);
    };
    let socket = UnixDatagram::unbound()?;
    // `@name` is a socket in the abstract namespace.
    let address = match path.as_encoded_bytes().strip_prefix(b"@") {
        Some(name) => std::os::unix::net::SocketAddr::from_abstract_name(name)?,
        None => std::os::unix::net::SocketAddr::from_pathname(std::path::Path::new(&path))?,
    };
    socket.send_to_addr(state.as_bytes(), &address)?;
    Ok(true)
}

/// The watchdog interval systemd expects (`$WATCHDOG_USEC`), if it is meant for this process.
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = env::var("WATCHDOG_PID")
        && pid.parse::<u32>().ok() != Some(std::process::id())
    {
        return None;
    }
    (usec > 0).then(|| Duration::from_micros(usec))
}

/// Feeds the watchdog every half interval while `target` (the HTTP listener) answers, until
/// `stop` is disconnected.
pub fn spawn_watchdog(
    target: SocketAddr,
    interval: Duration,
    stop: Receiver<()>,
) -> io::Result<JoinHandle<()>> {
    let target = loopback(target);
    let period = interval / 2;
    thread::Builder::new()
        .name("watchdog".into())
        .spawn(move || {
            loop {
                match self_check(target, period) {
                    Ok(()) => {
                        if let Err(err) = notify("WATCHDOG=1") {
                            log::warn!("cannot notify the service manager: {err}");
                        }
                    }
                    Err(err) => {
                        log::error!("the self-check failed ({err}); not feeding the watchdog")
                    }
                }
                select! {
                    recv(stop) -> _ => return,
                    recv(after(period)) -> _ => {}
                }
            }
        })
}

/// A real request to our own listener: any HTTP answer counts.
fn self_check(target: SocketAddr, timeout: Duration) -> io::Result<()> {
    let mut stream = TcpStream::connect_timeout(&target, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream
        .write_all(b"GET /api/v1/health HTTP/1.1\r\nHost: watchdog\r\nConnection: close\r\n\r\n")?;
    let mut answer = [0; 9];
    stream.read_exact(&mut answer)?;
    match &answer {
        b"HTTP/1.1 " | b"HTTP/1.0 " => Ok(()),
        _ => Err(io::Error::other("not an HTTP answer")),
    }
}

/// Where to connect to reach a listener bound to `addr` (a wildcard address means loopback).
fn loopback(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => (Ipv4Addr::LOCALHOST, addr.port()).into(),
        IpAddr::V6(ip) if ip.is_unspecified() => (Ipv6Addr::LOCALHOST, addr.port()).into(),
        _ => addr,
    }
}

/// Listening sockets passed by the service manager.
#[derive(Debug, Default)]
pub struct Activated {
    /// For the HTTP API: the socket named `http` (`FileDescriptorName=`), else the first.
    pub http: Option<TcpListener>,
    /// For WebSocket executions: the socket named `websocket`, else the second.
    pub websocket: Option<TcpListener>,
}

/// Takes the sockets of `$LISTEN_FDS` if they are meant for this process (`$LISTEN_PID`).
/// Must be called once.
pub fn activated() -> io::Result<Activated> {
    let for_us = env::var("LISTEN_PID")
        .ok()
        .and_then(|pid| pid.parse::<u32>().ok())
        == Some(std::process::id());
    let count: i32 = match env::var("LISTEN_FDS").ok().and_then(|n| n.parse().ok()) {
        Some(count) if for_us && count > 0 => count,
        _ => {
            return Err(io::Error::other(
                "no sockets were passed (LISTEN_FDS, LISTEN_PID)",
            ));
        }
    };
    let names = env::var("LISTEN_FDNAMES").unwrap_or_default();
    let names: Vec<&str> = names.split(':').collect();
    let mut activated = Activated::default();
    let mut unnamed = Vec::new();
    for index in 0..count.min(16) {
        let listener = inherited_listener(3 + index)?;
        match names.get(index as usize).copied() {
            Some("http" | "api") if activated.http.is_none() => activated.http = Some(listener),
            Some("websocket" | "ws") if activated.websocket.is_none() => {
                activated.websocket = Some(listener)
            }
            _ => unnamed.push(listener),
        }
    }
    let mut unnamed = unnamed.into_iter();
    if activated.http.is_none() {
        activated.http = unnamed.next();
    }
    if activated.websocket.is_none() {
        activated.websocket = unnamed.next();
    }
    Ok(activated)
}
