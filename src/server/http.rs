//! The HTTP listener: tiny_http over a listening socket that the server keeps.
//!
//! tiny_http has no connection timeouts, so the listening socket carries `SO_RCVTIMEO` and
//! `SO_SNDTIMEO`, which accepted connections inherit: a client that stalls while sending a
//! request or taking a response is cut off. The same receive timeout also bounds `accept()`,
//! and tiny_http's accept thread stops for good on any accept error (or dies silently when it
//! cannot start a connection thread). Two things keep the listener alive: a heartbeat request
//! well within the timeout, and, when an accept thread stops or the heartbeat goes unanswered,
//! a new tiny_http instance on the same socket, while the old one keeps serving the
//! connections it has.

use std::{
    io::{self, Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::Duration,
};

use crossbeam_channel::{Receiver, Sender, after, select};
use rustix::net::sockopt::{self, Timeout};

/// Requests of every tiny_http instance, forwarded into one channel.
pub struct HttpListener {
    listener: TcpListener,
    addr: SocketAddr,
    timeout: Duration,
    /// Taken at stop, so that the workers see the channel close.
    requests: Mutex<Option<Sender<tiny_http::Request>>>,
    instances: Mutex<Vec<Arc<tiny_http::Server>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    stopping: AtomicBool,
}

impl std::fmt::Debug for HttpListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpListener")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl HttpListener {
    /// Binds the socket; connections time out after `timeout` of silence.
    pub fn bind(
        address: IpAddr,
        port: u16,
        timeout: Duration,
        requests: Sender<tiny_http::Request>,
    ) -> io::Result<HttpListener> {
        let listener = TcpListener::bind((address, port))?;
        sockopt::set_socket_timeout(&listener, Timeout::Recv, Some(timeout))?;
        sockopt::set_socket_timeout(&listener, Timeout::Send, Some(timeout))?;
        let addr = listener.local_addr()?;
        Ok(HttpListener {
            listener,
            addr,
            timeout,
            requests: Mutex::new(Some(requests)),
            instances: Mutex::new(Vec::new()),
            threads: Mutex::new(Vec::new()),
            stopping: AtomicBool::new(false),
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Starts serving: a tiny_http instance and the heartbeat, which ends with `stop`.
    pub fn start(self: &Arc<Self>, stop: Receiver<()>) -> io::Result<()> {
        self.start_instance()?;
        let this = Arc::clone(self);
        let heartbeat = thread::Builder::new()
            .name("http-heartbeat".into())
            .spawn(move || this.heartbeat(&stop))?;
        self.threads
            .lock()
            .expect("threads poisoned")
            .push(heartbeat);
        Ok(())
    }

    fn start_instance(self: &Arc<Self>) -> io::Result<()> {
        let requests = self.requests.lock().expect("requests poisoned").clone();
        let Some(requests) = requests else {
            return Ok(());
        };
        let instance = tiny_http::Server::from_listener(self.listener.try_clone()?, None)
            .map(Arc::new)
            .map_err(io::Error::other)?;
        self.instances
            .lock()
            .expect("instances poisoned")
            .push(Arc::clone(&instance));
        let this = Arc::clone(self);
        let forwarder = thread::Builder::new()
            .name("http-accept".into())
            .spawn(move || this.forward(&instance, &requests))?;
        self.threads
            .lock()
            .expect("threads poisoned")
            .push(forwarder);
        Ok(())
    }

    /// Forwards an instance's requests until the server stops.
    fn forward(
        self: &Arc<Self>,
        instance: &tiny_http::Server,
        requests: &Sender<tiny_http::Request>,
    ) {
        let mut replaced = false;
        loop {
            match instance.recv() {
                Ok(request) => {
                    if requests.send(request).is_err() {
                        return;
                    }
                }
                Err(_) if self.stopping.load(Ordering::SeqCst) => return,
                Err(err) => {
                    // The instance stopped accepting; its connections may still send requests.
                    if !std::mem::replace(&mut replaced, true) {
                        log::error!("the HTTP listener stopped accepting ({err}); restarting it");
                        if let Err(err) = self.start_instance() {
                            log::error!("cannot restart the HTTP listener: {err}");
                        }
                    }
                }
            }
        }
    }

    /// Connects to the listener well within its timeout, so that `accept()` never times out.
    fn heartbeat(self: &Arc<Self>, stop: &Receiver<()>) {
        let target = loopback(self.addr);
        loop {
            select! {
                recv(stop) -> _ => return,
                recv(after(self.timeout / 3)) -> _ => {
                    if let Err(err) = self.ask(target) {
                        if self.stopping.load(Ordering::SeqCst) {
                            return;
                        }
                        log::error!("the HTTP listener does not answer ({err}); restarting it");
                        if let Err(err) = self.start_instance() {
                            log::error!("cannot restart the HTTP listener: {err}");
                        }
                    }
                }
            }
        }
    }

    /// Sends `GET /api/v1/version` and waits for the status line of the answer.
    fn ask(&self, target: SocketAddr) -> io::Result<()> {
        let mut stream = TcpStream::connect_timeout(&target, self.timeout)?;
        stream.set_read_timeout(Some(self.timeout))?;
        stream.set_write_timeout(Some(self.timeout))?;
        stream.write_all(
            b"GET /api/v1/version HTTP/1.1\r\nHost: heartbeat\r\nConnection: close\r\n\r\n",
        )?;
        let mut answer = [0; 9];
        stream.read_exact(&mut answer)?;
        match &answer {
            b"HTTP/1.1 " => Ok(()),
            _ => Err(io::Error::other("not an HTTP answer")),
        }
    }

    /// Stops forwarding and joins the threads (the heartbeat must have been told to stop).
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.requests.lock().expect("requests poisoned").take();
        for instance in self.instances.lock().expect("instances poisoned").iter() {
            instance.unblock();
        }
        let threads = std::mem::take(&mut *self.threads.lock().expect("threads poisoned"));
        for thread in threads {
            let _ = thread.join();
        }
        self.instances.lock().expect("instances poisoned").clear();
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
