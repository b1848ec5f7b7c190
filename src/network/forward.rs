//! Exposed ports: for each, a listener on port 0 of the publish address (the kernel picks a
//! free port, so mappings never collide), whose connections are copied to the runner's port
//! from the host. No NAT rule, no `route_localnet`, nothing left behind by a crash: the
//! listeners die with the server.
//!
//! Threads are bounded: one thread per runner serves all its listeners and connections with
//! non-blocking sockets and `poll`, and at most `network.forward_connections` connections per
//! runner are forwarded at once; further clients wait in the listen backlog. Hostile clients
//! therefore cost at most that many connections (two 128 KiB buffers each: 8 MiB per runner
//! with the default 32) and never a thread.

use std::{
    io::{self, Read, Write},
    net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::{AsFd, OwnedFd},
    thread::JoinHandle,
    time::Duration,
};

use rustix::event::{PollFd, PollFlags};

/// Buffer per direction of a connection.
const BUFFER: usize = 128 << 10;
/// How long connecting to the runner may take (it is one hop away; a full backlog in the
/// runner drops connection attempts).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// One forwarded port, as `mappedPorts` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MappedPort {
    /// The port inside the runner.
    pub exposed_port: u16,
    /// `<host>:<port>` clients connect to.
    pub host_address: String,
}

/// The forwarder of one runner; dropping it closes its listeners and connections.
#[derive(Debug)]
pub struct Forwarder {
    ports: Vec<MappedPort>,
    stop: Option<OwnedFd>,
    thread: Option<JoinHandle<()>>,
}

impl Forwarder {
    /// Binds one listener per port on `publish` and forwards to `target`; `advertise` is the
    /// host written into the mapped addresses (default: the publish address).
    pub fn start(
        publish: IpAddr,
        advertise: Option<&str>,
        target: IpAddr,
        ports: &[u16],
        max_connections: usize,
    ) -> io::Result<Forwarder> {
        let mut listeners = Vec::with_capacity(ports.len());
        let mut mapped = Vec::with_capacity(ports.len());
        for &port in ports {
            let listener = TcpListener::bind((publish, 0))?;
            listener.set_nonblocking(true)?;
            let local = listener.local_addr()?;
            let host_address = match advertise {
                Some(host) => format!("{host}:{}", local.port()),
                None => local.to_string(),
            };
            mapped.push(MappedPort {
                exposed_port: port,
                host_address,
            });
            listeners.push((listener, SocketAddr::new(target, port)));
        }
        let (stop_read, stop_write) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
        let thread = std::thread::Builder::new()
            .name("forward".into())
            .spawn(move || serve(listeners, stop_read, max_connections.max(1)))?;
        Ok(Forwarder {
            ports: mapped,
            stop: Some(stop_write),
            thread: Some(thread),
        })
    }

    /// The mapped ports.
    pub fn ports(&self) -> &[MappedPort] {
        &self.ports
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        // Closing the pipe's write end wakes the thread, which then closes everything.
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One direction's bytes on their way.
#[derive(Debug)]
struct Pending {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    /// The source ended: once the buffer is empty, the destination's write side is shut.
    eof: bool,
    /// The destination's write side has been shut.
    closed: bool,
}

impl Pending {
    fn new() -> Pending {
        Pending {
            buf: vec![0; BUFFER].into_boxed_slice(),
            start: 0,
            end: 0,
            eof: false,
            closed: false,
        }
    }

    fn empty(&self) -> bool {
        self.start == self.end
    }

    /// Moves what is possible from `from` to `to` without blocking; `Err` ends the connection.
    fn pump(&mut self, from: &mut TcpStream, to: &mut TcpStream) -> io::Result<()> {
        loop {
            if self.empty() && !self.eof {
                match from.read(&mut self.buf) {
                    Ok(0) => self.eof = true,
                    Ok(n) => (self.start, self.end) = (0, n),
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                    Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                    Err(err) => return Err(err),
                }
            }
            if !self.empty() {
                match to.write(&self.buf[self.start..self.end]) {
                    Ok(n) => self.start += n,
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                    Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                    Err(err) => return Err(err),
                }
                if self.empty() {
                    continue;
                }
                return Ok(());
            }
            if self.eof && !self.closed {
                self.closed = true;
                let _ = to.shutdown(Shutdown::Write);
            }
            return Ok(());
        }
    }

    fn done(&self) -> bool {
        self.closed
    }
}

/// A client connection and its connection to the runner.
#[derive(Debug)]
struct Connection {
    client: TcpStream,
    runner: TcpStream,
    up: Pending,
    down: Pending,
}

impl Connection {
    fn open(client: TcpStream, target: SocketAddr) -> io::Result<Connection> {
        let runner = TcpStream::connect_timeout(&target, CONNECT_TIMEOUT)?;
        for stream in [&client, &runner] {
            stream.set_nonblocking(true)?;
            stream.set_nodelay(true)?;
        }
        Ok(Connection {
            client,
            runner,
            up: Pending::new(),
            down: Pending::new(),
        })
    }

    /// Copies in both directions; `false` when the connection is over.
    fn pump(&mut self) -> bool {
        let ok = self.up.pump(&mut self.client, &mut self.runner).is_ok()
            && self.down.pump(&mut self.runner, &mut self.client).is_ok();
        ok && !(self.up.done() && self.down.done())
    }

    fn interest(pending: &Pending, other: &Pending) -> PollFlags {
        // Read when our buffer can take data, write when the other direction has some.
        let mut flags = PollFlags::empty();
        if pending.empty() && !pending.eof {
            flags |= PollFlags::IN;
        }
        if !other.empty() {
            flags |= PollFlags::OUT;
        }
        flags
    }
}

fn serve(listeners: Vec<(TcpListener, SocketAddr)>, stop: OwnedFd, max: usize) {
    let mut connections: Vec<Connection> = Vec::new();
    loop {
        let accepting = connections.len() < max;
        let mut fds = Vec::with_capacity(1 + listeners.len() + 2 * connections.len());
        fds.push(PollFd::new(&stop, PollFlags::IN));
        for (listener, _) in &listeners {
            let flags = if accepting {
                PollFlags::IN
            } else {
                PollFlags::empty()
            };
            fds.push(PollFd::from_borrowed_fd(listener.as_fd(), flags));
        }
        for connection in &connections {
            let up = Connection::interest(&connection.up, &connection.down);
            let down = Connection::interest(&connection.down, &connection.up);
            fds.push(PollFd::from_borrowed_fd(connection.client.as_fd(), up));
            fds.push(PollFd::from_borrowed_fd(connection.runner.as_fd(), down));
        }
        match rustix::event::poll(&mut fds, None) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(err) => {
                log::error!("forward: poll failed: {err}");
                return;
            }
        }
        if !fds[0].revents().is_empty() {
            return;
        }
        let ready: Vec<bool> = fds[1..=listeners.len()]
            .iter()
            .map(|fd| !fd.revents().is_empty())
            .collect();
        let active: Vec<bool> = fds[1 + listeners.len()..]
            .chunks(2)
            .map(|pair| pair.iter().any(|fd| !fd.revents().is_empty()))
            .collect();
        drop(fds);
        let mut index = 0;
        connections.retain_mut(|connection| {
            let keep = !active[index] || connection.pump();
            index += 1;
            keep
        });
        for ((listener, target), ready) in listeners.iter().zip(ready) {
            while ready && connections.len() < max {
                match listener.accept() {
                    Ok((client, _)) => match Connection::open(client, *target) {
                        Ok(connection) => connections.push(connection),
                        Err(err) => log::debug!("forward: cannot reach {target}: {err}"),
                    },
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => break,
                    Err(err) => {
                        log::warn!("forward: accept failed: {err}");
                        break;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo service on loopback, standing in for a runner's service.
    fn echo() -> u16 {
        let listener = TcpListener::bind(("127.0.0.1", 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut reader = stream.try_clone().unwrap();
                    let mut writer = stream;
                    let _ = io::copy(&mut reader, &mut writer);
                });
            }
        });
        port
    }

    fn connect(address: &str) -> TcpStream {
        let stream = TcpStream::connect(address).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream
    }

    #[test]
    fn bytes_go_both_ways_and_end_with_the_forwarder() {
        let port = echo();
        let local = IpAddr::from([127, 0, 0, 1]);
        let forwarder = Forwarder::start(local, None, local, &[port], 4).unwrap();
        let mapped = forwarder.ports()[0].clone();
        assert_eq!(mapped.exposed_port, port);
        assert!(mapped.host_address.starts_with("127.0.0.1:"));
        let mut stream = connect(&mapped.host_address);
        let data: Vec<u8> = (0..1_000_000u32).map(|i| i as u8).collect();
        let writer = {
            let mut stream = stream.try_clone().unwrap();
            let data = data.clone();
            std::thread::spawn(move || {
                stream.write_all(&data).unwrap();
                stream.shutdown(Shutdown::Write).unwrap();
            })
        };
        let mut back = Vec::new();
        stream.read_to_end(&mut back).unwrap();
        writer.join().unwrap();
        assert!(back == data, "echoed bytes differ");
        drop(forwarder);
        assert!(TcpStream::connect(&mapped.host_address).is_err());
    }

    #[test]
    fn connections_beyond_the_bound_wait_for_a_free_one() {
        let port = echo();
        let local = IpAddr::from([127, 0, 0, 1]);
        let forwarder =
            Forwarder::start(local, Some("runners.example.org"), local, &[port], 1).unwrap();
        let address = forwarder.ports()[0].host_address.clone();
        assert!(address.starts_with("runners.example.org:"));
        let actual = address.replace("runners.example.org", "127.0.0.1");
        let mut first = connect(&actual);
        first.write_all(b"one").unwrap();
        let mut buf = [0; 3];
        first.read_exact(&mut buf).unwrap();
        // The second connection is accepted by the kernel but not forwarded until the first
        // one ends.
        let mut second = connect(&actual);
        second.write_all(b"two").unwrap();
        second
            .set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        assert!(second.read_exact(&mut buf).is_err());
        drop(first);
        second
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        second.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"two");
    }

    #[test]
    fn an_unreachable_target_closes_the_client() {
        let local = IpAddr::from([127, 0, 0, 1]);
        let unused = TcpListener::bind(("127.0.0.1", 0)).unwrap();
        let port = unused.local_addr().unwrap().port();
        drop(unused);
        let forwarder = Forwarder::start(local, None, local, &[port], 2).unwrap();
        let mut stream = connect(&forwarder.ports()[0].host_address);
        let mut buf = Vec::new();
        assert!(matches!(stream.read_to_end(&mut buf), Ok(0) | Err(_)));
    }
}
