//! TLS on both listeners (`server.tls`): each public listener accepts TLS connections (TLS 1.3
//! only, as Poseidon) and relays their plaintext to the server's own front on a loopback
//! listener, so that everything behind it (request heads, bodies, WebSocket sessions with
//! their reader and writer) works unchanged. One thread per TLS connection relays both
//! directions with `poll`; the certificate is read again on [`Tls::reload`] (SIGHUP).

use std::{
    io::{self, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use rustix::event::{PollFd, PollFlags, poll};
use rustls::{
    ServerConfig, ServerConnection,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};

use crate::server::http::conn::Slot;

/// Bytes relayed at once.
const CHUNK: usize = 16 << 10;

/// The certificate in use, replaced by a reload.
#[derive(Debug)]
struct Current(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for Current {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.0.read().expect("certificate poisoned")))
    }
}

/// The TLS settings of a server.
#[derive(Debug)]
pub struct Tls {
    config: Arc<ServerConfig>,
    current: Arc<Current>,
    certfile: PathBuf,
    keyfile: PathBuf,
}

/// Reads a PEM certificate chain and private key.
fn load(certfile: &PathBuf, keyfile: &PathBuf) -> io::Result<Arc<CertifiedKey>> {
    let invalid = |what: &PathBuf, err: &dyn std::fmt::Display| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: {err}", what.display()),
        )
    };
    let chain = CertificateDer::pem_file_iter(certfile)
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .map_err(|err| invalid(certfile, &err))?;
    if chain.is_empty() {
        return Err(invalid(certfile, &"no certificate in it"));
    }
    let key = PrivateKeyDer::from_pem_file(keyfile).map_err(|err| invalid(keyfile, &err))?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|err| invalid(keyfile, &err))?;
    Ok(Arc::new(CertifiedKey::new(chain, signer)))
}

impl Tls {
    /// Reads the certificate and key and prepares TLS 1.3.
    pub fn new(certfile: PathBuf, keyfile: PathBuf) -> io::Result<Tls> {
        let current = Arc::new(Current(RwLock::new(load(&certfile, &keyfile)?)));
        // ring, which the registry client (ureq) already brings; its provider is deprecated
        // only for lacking post-quantum key exchange, which aws-lc-rs (a C build) would add.
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(io::Error::other)?
            .with_no_client_auth()
            .with_cert_resolver(Arc::clone(&current) as Arc<dyn ResolvesServerCert>);
        Ok(Tls {
            config: Arc::new(config),
            current,
            certfile,
            keyfile,
        })
    }

    /// Reads the certificate and key again; new connections use them. On error the old ones
    /// stay in use.
    pub fn reload(&self) -> io::Result<()> {
        let loaded = load(&self.certfile, &self.keyfile)?;
        *self.current.0.write().expect("certificate poisoned") = loaded;
        Ok(())
    }
}

/// How a terminator works.
#[derive(Debug, Clone)]
pub struct Relay {
    /// The plaintext listener behind it.
    pub backend: SocketAddr,
    /// Time for a client's handshake, and for taking output it is sent.
    pub timeout: Duration,
    /// Open connections (shared with the front), and their most.
    pub open: Arc<AtomicUsize>,
    /// Most connections at once.
    pub max_connections: usize,
}

/// Accepts TLS connections until `stop` is set (and the listener woken by a connection).
pub fn serve(listener: TcpListener, tls: Arc<Tls>, relay: Relay, stop: Arc<AtomicBool>) {
    for client in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let client = match client {
            Ok(client) => client,
            Err(err) => {
                log::warn!("cannot accept a TLS connection: {err}");
                thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        let Some(slot) = Slot::take(&relay.open, relay.max_connections) else {
            continue;
        };
        let (config, relay) = (Arc::clone(&tls.config), relay.clone());
        let spawned = thread::Builder::new().name("tls".into()).spawn(move || {
            if let Err(err) = connection(client, config, &relay) {
                log::debug!("TLS connection ended: {err}");
            }
            drop(slot);
        });
        if let Err(err) = spawned {
            log::error!("cannot start a TLS thread: {err}");
        }
    }
}

/// Waits until `stream` is ready for `flags`, at most until `deadline`.
fn wait(stream: &TcpStream, flags: PollFlags, deadline: Instant) -> io::Result<()> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(io::ErrorKind::TimedOut.into());
    }
    let timeout = rustix::event::Timespec::try_from(left).map_err(io::Error::other)?;
    let mut fds = [PollFd::new(stream, flags)];
    match poll(&mut fds, Some(&timeout))? {
        0 => Err(io::ErrorKind::TimedOut.into()),
        _ => Ok(()),
    }
}

fn would_block(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}

/// The handshake (bounded by the timeout), then the relay.
fn connection(mut client: TcpStream, config: Arc<ServerConfig>, relay: &Relay) -> io::Result<()> {
    client.set_nonblocking(true)?;
    let _ = client.set_nodelay(true);
    let mut tls = ServerConnection::new(config).map_err(io::Error::other)?;
    let deadline = Instant::now() + relay.timeout;
    while tls.is_handshaking() {
        if tls.wants_write() {
            match tls.write_tls(&mut client) {
                Ok(_) => {}
                Err(err) if would_block(&err) => wait(&client, PollFlags::OUT, deadline)?,
                Err(err) => return Err(err),
            }
            continue;
        }
        wait(&client, PollFlags::IN, deadline)?;
        match tls.read_tls(&mut client) {
            Ok(0) => return Ok(()),
            Ok(_) => {
                if let Err(err) = tls.process_new_packets() {
                    let _ = tls.write_tls(&mut client);
                    return Err(io::Error::other(err));
                }
            }
            Err(err) if would_block(&err) => {}
            Err(err) => return Err(err),
        }
    }
    let backend = TcpStream::connect(relay.backend)?;
    backend.set_nonblocking(true)?;
    let _ = backend.set_nodelay(true);
    Pump::new(&mut tls, client, backend).run(relay.timeout)
}

/// The two directions of one connection.
struct Pump<'a> {
    tls: &'a mut ServerConnection,
    client: TcpStream,
    backend: TcpStream,
    /// Plaintext from the client not yet taken by the backend.
    to_backend: Vec<u8>,
    client_open: bool,
    backend_open: bool,
    backend_shut: bool,
}

impl<'a> Pump<'a> {
    fn new(tls: &'a mut ServerConnection, client: TcpStream, backend: TcpStream) -> Self {
        Pump {
            tls,
            client,
            backend,
            to_backend: Vec::new(),
            client_open: true,
            backend_open: true,
            backend_shut: false,
        }
    }

    /// Relays until both sides are done; a client that takes no output for `timeout` is
    /// dropped (the WebSocket session's own rule for stalled clients).
    fn run(mut self, timeout: Duration) -> io::Result<()> {
        let mut chunk = vec![0; CHUNK];
        // The client may have sent its first request along with the end of the handshake.
        self.plaintext(&mut chunk)?;
        loop {
            self.flush()?;
            if !self.client_open && self.to_backend.is_empty() && !self.backend_shut {
                let _ = self.backend.shutdown(Shutdown::Write);
                self.backend_shut = true;
            }
            if !self.backend_open && !self.tls.wants_write() {
                let _ = self.client.shutdown(Shutdown::Both);
                return Ok(());
            }
            let mut client_flags = PollFlags::empty();
            if self.client_open && self.to_backend.is_empty() {
                client_flags |= PollFlags::IN;
            }
            if self.tls.wants_write() {
                client_flags |= PollFlags::OUT;
            }
            let mut backend_flags = PollFlags::empty();
            if self.backend_open && !self.tls.wants_write() {
                backend_flags |= PollFlags::IN;
            }
            if !self.to_backend.is_empty() {
                backend_flags |= PollFlags::OUT;
            }
            if client_flags.is_empty() && backend_flags.is_empty() {
                return Ok(());
            }
            // Only a client that holds up output has a deadline.
            let limit = match self.tls.wants_write() {
                true => Some(rustix::event::Timespec::try_from(timeout).map_err(io::Error::other)?),
                false => None,
            };
            let mut fds = [
                PollFd::new(&self.client, client_flags),
                PollFd::new(&self.backend, backend_flags),
            ];
            if poll(&mut fds, limit.as_ref())? == 0 {
                return Err(io::ErrorKind::TimedOut.into());
            }
            let (client_ready, backend_ready) = (fds[0].revents(), fds[1].revents());
            if !client_ready.is_empty() && client_flags.contains(PollFlags::IN) {
                self.read_client(&mut chunk)?;
            }
            if !backend_ready.is_empty() && backend_flags.contains(PollFlags::IN) {
                self.read_backend(&mut chunk)?;
            }
        }
    }

    /// Writes what can be written without waiting, both ways.
    fn flush(&mut self) -> io::Result<()> {
        while self.tls.wants_write() {
            match self.tls.write_tls(&mut self.client) {
                Ok(_) => {}
                Err(err) if would_block(&err) => break,
                Err(err) => return Err(err),
            }
        }
        while !self.to_backend.is_empty() {
            match self.backend.write(&self.to_backend) {
                Ok(written) => {
                    self.to_backend.drain(..written);
                }
                Err(err) if would_block(&err) => break,
                Err(err) => return Err(err),
            }
        }
        Ok(())
    }

    fn read_client(&mut self, chunk: &mut [u8]) -> io::Result<()> {
        match self.tls.read_tls(&mut self.client) {
            Ok(0) => self.client_open = false,
            Ok(_) => {
                if let Err(err) = self.tls.process_new_packets() {
                    let _ = self.tls.write_tls(&mut self.client);
                    return Err(io::Error::other(err));
                }
            }
            Err(err) if would_block(&err) => return Ok(()),
            Err(err) => return Err(err),
        }
        self.plaintext(chunk)
    }

    /// Takes the plaintext rustls has decrypted.
    fn plaintext(&mut self, chunk: &mut [u8]) -> io::Result<()> {
        loop {
            match self.tls.reader().read(chunk) {
                Ok(0) => {
                    self.client_open = false;
                    return Ok(());
                }
                Ok(read) => self.to_backend.extend_from_slice(&chunk[..read]),
                Err(err) if would_block(&err) => return Ok(()),
                Err(err) => return Err(err),
            }
        }
    }

    fn read_backend(&mut self, chunk: &mut [u8]) -> io::Result<()> {
        match self.backend.read(chunk) {
            Ok(0) => {
                self.backend_open = false;
                self.tls.send_close_notify();
            }
            Ok(read) => self.tls.writer().write_all(&chunk[..read])?,
            Err(err) if would_block(&err) => {}
            Err(err) => return Err(err),
        }
        Ok(())
    }
}
