//! The front: one thread that accepts on both listeners and reads every waiting connection's
//! request head with `poll(2)`, bounded in size ([`super::http::head`]), in time (the whole head, and
//! a small body, within the listener's timeout) and in number (`server.max_connections`).
//! Complete requests go to a worker pool over a channel, as before: the API's handlers stay
//! plain blocking code. Downloads, listings and large or chunked bodies go to a pool of their
//! own, so that clients that read or send slowly never hold up health checks, claims and
//! executions. Workers hand connections back for their next request (keep-alive) or for a
//! lingering close; no thread ever waits on a connection between requests.
//!
//! Why not tiny_http: it reads a header line without bound, keeps a thread per connection and
//! drains unread bodies in threads of their own, and it parses a second request out of a body
//! with an invalid `Content-Length`.

use std::{
    io::{self, Read, Write},
    net::{Shutdown, TcpListener},
    os::fd::OwnedFd,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use crossbeam_channel::Receiver;
use rustix::event::{EventfdFlags, PollFd, PollFlags};

use super::http::{
    Exchange, Method, Port,
    conn::{Conn, Slot},
    head::{self, Framing, Refusal},
};

mod handoff;

pub use self::handoff::{Job, Returned, Settings, Waker};

/// Bodies up to this size are read here, with the head, so that a client that sends its body
/// slowly never holds a worker.
pub const SMALL_BODY: u64 = 64 << 10;
/// How long a closed connection's unread input is read and discarded, so that the answer is
/// not lost to a reset.
const LINGER: Duration = Duration::from_secs(2);
/// Pause after a failed `accept()` (out of descriptors, say).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
/// How much of a closed connection's unread input is discarded at most.
const LINGER_BYTES: usize = 1 << 20;
/// Bytes read at once.
const CHUNK: usize = 16 << 10;

#[derive(Debug)]
enum State {
    /// Waiting for the head (or the small body after it).
    Reading { continued: bool },
    /// Answered and shut down for writing; input is discarded until the deadline, up to
    /// this many more bytes.
    Lingering(usize),
}

#[derive(Debug)]
struct Waiting {
    conn: Conn,
    deadline: Instant,
    state: State,
}

/// The front's state.
#[derive(Debug)]
pub struct Front {
    listeners: Vec<(TcpListener, Port)>,
    paused_until: Vec<Option<Instant>>,
    wake: Arc<OwnedFd>,
    returned: Receiver<Returned>,
    waker: Waker,
    settings: Settings,
    open: Arc<AtomicUsize>,
    waiting: Vec<Waiting>,
}

impl Front {
    /// A front for `listeners` (made non-blocking here).
    pub fn new(listeners: Vec<(TcpListener, Port)>, settings: Settings) -> io::Result<Front> {
        for (listener, _) in &listeners {
            listener.set_nonblocking(true)?;
        }
        let fd = rustix::event::eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?;
        let wake = Arc::new(fd);
        let (returned_tx, returned) = crossbeam_channel::unbounded();
        let waker = Waker {
            fd: Arc::clone(&wake),
            returned: returned_tx,
            stop: Arc::new(AtomicBool::new(false)),
        };
        Ok(Front {
            paused_until: vec![None; listeners.len()],
            listeners,
            wake,
            returned,
            waker,
            settings,
            open: Arc::new(AtomicUsize::new(0)),
            waiting: Vec::new(),
        })
    }

    /// What workers use to hand connections back and the server to stop the front.
    pub fn waker(&self) -> Waker {
        self.waker.clone()
    }

    /// Serves until stopped.
    pub fn run(mut self) {
        while !self.waker.stop.load(Ordering::SeqCst) {
            let now = Instant::now();
            let ready = match self.poll(now) {
                Ok(ready) => ready,
                Err(err) => {
                    log::error!("the HTTP front cannot poll: {err}");
                    std::thread::sleep(ACCEPT_BACKOFF);
                    continue;
                }
            };
            let now = Instant::now();
            let (listeners, rest) = ready.split_at(self.listeners.len());
            // The connections polled, in the order polled; `progress` puts back those that
            // still wait.
            let polled = std::mem::take(&mut self.waiting);
            for (waiting, ready) in polled.into_iter().zip(&rest[1..]) {
                if *ready {
                    self.progress(waiting, true);
                } else {
                    self.waiting.push(waiting);
                }
            }
            for (index, ready) in listeners.iter().enumerate() {
                if *ready {
                    self.accept(index, now);
                }
            }
            if rest[0] {
                let mut count = [0; 8];
                let _ = rustix::io::read(&*self.wake, &mut count);
            }
            while let Ok(returned) = self.returned.try_recv() {
                self.take_back(returned);
            }
            self.expire(Instant::now());
        }
    }

    /// Polls listeners, the wake-up and waiting connections until something is ready or the
    /// next deadline; which are ready, in that order.
    fn poll(&mut self, now: Instant) -> io::Result<Vec<bool>> {
        for paused in &mut self.paused_until {
            if paused.is_some_and(|until| until <= now) {
                *paused = None;
            }
        }
        let mut fds: Vec<PollFd<'_>> =
            Vec::with_capacity(self.listeners.len() + 1 + self.waiting.len());
        for ((listener, _), paused) in self.listeners.iter().zip(&self.paused_until) {
            let flags = if paused.is_some() {
                PollFlags::empty()
            } else {
                PollFlags::IN
            };
            fds.push(PollFd::new(listener, flags));
        }
        fds.push(PollFd::new(&*self.wake, PollFlags::IN));
        for waiting in &self.waiting {
            fds.push(PollFd::new(&waiting.conn.stream, PollFlags::IN));
        }
        let next = self
            .waiting
            .iter()
            .map(|waiting| waiting.deadline)
            .chain(self.paused_until.iter().flatten().copied())
            .min();
        let timeout =
            next.map(|next| next.saturating_duration_since(now) + Duration::from_millis(1));
        let timeout = timeout.and_then(|timeout| rustix::event::Timespec::try_from(timeout).ok());
        match rustix::event::poll(&mut fds, timeout.as_ref()) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(err) => return Err(err.into()),
        }
        Ok(fds.iter().map(|fd| !fd.revents().is_empty()).collect())
    }

    fn accept(&mut self, index: usize, now: Instant) {
        loop {
            let (stream, port) = match self.listeners[index].0.accept() {
                Ok((stream, _)) => (stream, self.listeners[index].1),
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => return,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) => {
                    log::warn!("cannot accept a connection: {err}");
                    self.paused_until[index] = Some(now + ACCEPT_BACKOFF);
                    return;
                }
            };
            let Some(slot) = Slot::take(&self.open, self.settings.max_connections) else {
                log::warn!("too many open connections; refusing a new one");
                let mut stream = stream;
                let _ = stream.set_nonblocking(true);
                let _ = stream.write_all(
                    b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                );
                continue;
            };
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let _ = stream.set_nodelay(true);
            let conn = Conn {
                stream,
                buf: Vec::new(),
                pos: 0,
                deadline: None,
                port,
                slot,
            };
            let deadline = now + self.timeout(port);
            let waiting = Waiting {
                conn,
                deadline,
                state: State::Reading { continued: false },
            };
            // Most clients send their request right after connecting.
            self.progress(waiting, true);
        }
    }

    fn timeout(&self, port: Port) -> Duration {
        match port {
            Port::Api => self.settings.http_timeout,
            Port::WebSocket => self.settings.websocket_timeout,
        }
    }

    fn take_back(&mut self, returned: Returned) {
        let (conn, state) = match returned {
            Returned::KeepAlive(conn) => (conn, State::Reading { continued: false }),
            Returned::Close(conn) => {
                let _ = conn.stream.shutdown(Shutdown::Write);
                (conn, State::Lingering(LINGER_BYTES))
            }
        };
        if conn.stream.set_nonblocking(true).is_err() {
            return;
        }
        let deadline = Instant::now()
            + match state {
                State::Lingering(_) => LINGER,
                State::Reading { .. } => self.timeout(conn.port),
            };
        let mut conn = conn;
        conn.deadline = None;
        // A pipelined request may be complete already.
        self.progress(
            Waiting {
                conn,
                deadline,
                state,
            },
            false,
        );
    }

    /// Reads what arrived (if `read`) and acts on it: the connection waits on, goes to a
    /// worker, or is answered and closed.
    fn progress(&mut self, mut waiting: Waiting, read: bool) {
        let mut open = true;
        if read {
            match read_available(&mut waiting) {
                Ok(true) => {}
                // End of input: a complete request before it is still answered.
                Ok(false) if matches!(waiting.state, State::Reading { .. }) => open = false,
                Ok(false) | Err(_) => return,
            }
        }
        let State::Reading { continued } = &mut waiting.state else {
            if !waiting.conn.buf.is_empty() {
                waiting.conn.buf.clear();
                waiting.conn.pos = 0;
            }
            return self.waiting.push(waiting);
        };
        let mut head = match head::parse(waiting.conn.pending()) {
            Ok(Some(head)) => head,
            Ok(None) if open => return self.waiting.push(waiting),
            Ok(None) => return,
            Err(refusal) => return self.refuse(waiting, &refusal),
        };
        head.keep_alive &= open;
        let small = match head.framing {
            Framing::Length(length) if length <= SMALL_BODY => Some(length),
            _ => None,
        };
        if let Some(length) = small.filter(|_| !head.websocket) {
            let have = waiting.conn.pending().len() - head.length;
            if (have as u64) < length {
                if !open {
                    return;
                }
                if head.expect_continue && !*continued {
                    *continued = true;
                    let _ = (&waiting.conn.stream).write_all(b"HTTP/1.1 100 Continue\r\n\r\n");
                }
                return self.waiting.push(waiting);
            }
        }
        let bulk = small.is_none() || is_bulk(&head.method, head.path());
        let mut conn = waiting.conn;
        conn.consume(head.length);
        let job = Job {
            exchange: Exchange::new(conn, head),
        };
        let pool = if bulk {
            &self.settings.bulk
        } else {
            &self.settings.api
        };
        // The pools' queues hold as many jobs as there can be connections: never full.
        if let Err(err) = pool.try_send(job) {
            log::error!("a request was dropped: {err}");
        }
    }

    /// Answers `refusal` without waiting on the client, then lingers.
    fn refuse(&mut self, mut waiting: Waiting, refusal: &Refusal) {
        log::debug!("refused a request: {} {}", refusal.status, refusal.reason);
        let body = format!("{{\"message\":\"{}\"}}", refusal.reason);
        let answer = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n{body}",
            refusal.status,
            super::http::conn::reason(refusal.status),
            body.len()
        );
        let _ = (&waiting.conn.stream).write_all(answer.as_bytes());
        let _ = waiting.conn.stream.shutdown(Shutdown::Write);
        waiting.state = State::Lingering(LINGER_BYTES);
        waiting.deadline = Instant::now() + LINGER;
        waiting.conn.buf.clear();
        waiting.conn.pos = 0;
        self.waiting.push(waiting);
    }

    fn expire(&mut self, now: Instant) {
        let mut index = 0;
        while index < self.waiting.len() {
            if self.waiting[index].deadline > now {
                index += 1;
                continue;
            }
            let waiting = self.waiting.swap_remove(index);
            let started = !waiting.conn.pending().is_empty();
            if matches!(waiting.state, State::Reading { .. }) && started {
                let refusal = Refusal {
                    status: 408,
                    reason: "the request took too long",
                };
                let mut waiting = waiting;
                waiting.deadline = now + LINGER;
                self.refuse(waiting, &refusal);
            }
        }
    }
}

/// Whether a request is served by the bulk pool: downloads and listings, whose answers a slow
/// client takes long to read.
fn is_bulk(method: &Method, path: &str) -> bool {
    *method == Method::Get && (path.ends_with("/files") || path.ends_with("/files/raw"))
}

/// Reads what is available without blocking; false at end of input or on an error. Reading
/// stops at what a head and a small body can take (the rest stays in the socket); a lingering
/// connection's input is discarded.
fn read_available(waiting: &mut Waiting) -> io::Result<bool> {
    let limit = head::MAX_HEAD + SMALL_BODY as usize + CHUNK;
    let mut chunk = [0; CHUNK];
    loop {
        if matches!(waiting.state, State::Reading { .. }) && waiting.conn.buf.len() >= limit {
            return Ok(true);
        }
        match waiting.conn.stream.read(&mut chunk) {
            Ok(0) => return Ok(false),
            Ok(read) => match &mut waiting.state {
                State::Reading { .. } => waiting.conn.buf.extend_from_slice(&chunk[..read]),
                State::Lingering(left) if *left > read => *left -= read,
                State::Lingering(_) => return Ok(false),
            },
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => return Ok(true),
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
}
