//! What the front and the workers hand each other: requests ([`Job`]), connections back
//! ([`Returned`]) and the wake-up ([`Waker`]); and the front's [`Settings`].

use std::{
    os::fd::OwnedFd,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use crossbeam_channel::Sender;

use crate::server::http::{Exchange, conn::Conn};

/// A request ready for a worker.
#[derive(Debug)]
pub struct Job {
    /// The request, its head consumed from the connection.
    pub exchange: Exchange,
}

/// A connection a worker is done with.
#[derive(Debug)]
pub enum Returned {
    /// Wait for its next request.
    KeepAlive(Conn),
    /// Close it (after discarding what the client still sends, for a moment).
    Close(Conn),
}

/// Where the front sends requests and how long clients may take.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Requests of the API.
    pub api: Sender<Job>,
    /// Downloads, listings, large or chunked bodies.
    pub bulk: Sender<Job>,
    /// Time for a head (and small body) on the API listener, and for idling between requests.
    pub http_timeout: Duration,
    /// Time for a WebSocket handshake request.
    pub websocket_timeout: Duration,
    /// Most open connections (waiting here, being served, or idle between requests).
    pub max_connections: usize,
}

/// Wakes the front: connections come back, or it should stop.
#[derive(Debug, Clone)]
pub struct Waker {
    pub(super) fd: Arc<OwnedFd>,
    pub(super) returned: Sender<Returned>,
    pub(super) stop: Arc<AtomicBool>,
}

impl Waker {
    /// Hands a connection back.
    pub fn give_back(&self, returned: Returned) {
        if self.returned.send(returned).is_ok() {
            self.wake();
        }
    }

    /// Makes the front stop.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.wake();
    }

    fn wake(&self) {
        let _ = rustix::io::write(&*self.fd, &1u64.to_ne_bytes());
    }
}
