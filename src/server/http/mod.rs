//! HTTP/1.1 as the server speaks it, without tiny_http: bounded request heads ([`head`]),
//! connections with read-ahead and bodies ([`conn`]), and [`Exchange`], one request and its
//! answer as the API's handlers see it. The server's front reads heads; workers serve
//! exchanges.

pub mod conn;
pub mod head;

use std::{
    io::{self, BufWriter, Read, Write},
    time::{Duration, Instant},
};

use self::conn::Body;
pub use self::{
    conn::{Conn, Length, Port},
    head::{Head, Method},
};

/// One request being served: its head, its connection and its body.
#[derive(Debug)]
pub struct Exchange {
    conn: Conn,
    head: Head,
    body: Body,
    continued: bool,
    keep_alive: bool,
}

impl Exchange {
    /// The exchange of a parsed head whose bytes were consumed from `conn`.
    pub fn new(conn: Conn, head: Head) -> Exchange {
        let body = Body::new(head.framing);
        let keep_alive = head.keep_alive;
        Exchange {
            conn,
            head,
            body,
            continued: false,
            keep_alive,
        }
    }

    /// The connection.
    pub fn conn(&self) -> &Conn {
        &self.conn
    }

    /// The connection, to change its deadline.
    pub fn conn_mut(&mut self) -> &mut Conn {
        &mut self.conn
    }

    /// The request head and the connection (for a WebSocket handshake).
    pub fn into_parts(self) -> (Head, Conn) {
        (self.head, self.conn)
    }

    /// The request head.
    pub fn head(&self) -> &Head {
        &self.head
    }

    /// The method.
    pub fn method(&self) -> &Method {
        &self.head.method
    }

    /// The request target (path and query).
    pub fn target(&self) -> &str {
        &self.head.target
    }

    /// The first value of a header field (`name` in lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.header(name)
    }

    /// The announced body length (`None` for a chunked body).
    pub fn body_length(&self) -> Option<u64> {
        match self.head.framing {
            head::Framing::Length(length) => Some(length),
            head::Framing::Chunked => None,
        }
    }

    /// The body; a client waiting for `100 Continue` is told to send it first.
    pub fn body(&mut self) -> impl Read + '_ {
        BodyReader { exchange: self }
    }

    /// Writes the answer. Unless the request body was read completely (or is in the buffer
    /// already), the answer says `Connection: close`: what follows is never read as a request.
    pub fn respond(
        &mut self,
        status: u16,
        headers: &[(&str, &str)],
        length: Length,
        body: &mut dyn Read,
    ) -> io::Result<()> {
        self.skip_buffered_body();
        if !self.body.finished() {
            self.keep_alive = false;
        }
        let timeout = self.conn.stream.write_timeout().ok().flatten();
        let paced = Paced {
            stream: &self.conn.stream,
            timeout: timeout.unwrap_or(Duration::from_secs(60)),
            current: timeout,
            started: Instant::now(),
            written: 0,
        };
        let mut out = BufWriter::with_capacity(64 << 10, paced);
        conn::write_head(&mut out, status, headers, length, self.keep_alive)?;
        let result = conn::write_body(&mut out, body, length);
        if result.is_err() {
            self.keep_alive = false;
        }
        result
    }

    /// Whether the connection can serve another request.
    pub fn keep_alive(&self) -> bool {
        self.keep_alive
    }

    /// The connection, after the answer.
    pub fn into_conn(self) -> Conn {
        self.conn
    }

    /// A length-delimited body that arrived with the head counts as read.
    fn skip_buffered_body(&mut self) {
        let buffered = self.conn.pending().len() as u64;
        if let Some(left) = self
            .body_left()
            .filter(|&left| left > 0 && left <= buffered)
        {
            let mut sink = vec![0; left as usize];
            let _ = self.read_body(&mut sink);
        }
    }

    fn body_left(&self) -> Option<u64> {
        match self.head.framing {
            head::Framing::Length(_) if !self.body.finished() => {
                // What the body reader has not handed out yet.
                Some(self.body_length().unwrap_or(0) - self.read_so_far())
            }
            _ => None,
        }
    }

    fn read_so_far(&self) -> u64 {
        self.body.consumed()
    }

    fn read_body(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if !self.continued && self.head.expect_continue && !self.body.finished() {
            self.continued = true;
            if self.conn.pending().is_empty() {
                self.conn
                    .stream
                    .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
            }
        }
        let mut total = 0;
        while total < out.len() {
            let read = self.body.read(&mut self.conn, &mut out[total..])?;
            if read == 0 {
                break;
            }
            total += read;
            if self.conn.pending().is_empty() {
                break;
            }
        }
        Ok(total)
    }
}

/// Bytes per second a client must take on average once the first timeout has passed: a client
/// that reads a download a little at a time cannot hold a worker for long (CodeOcean fetches
/// files over a local network, far faster).
const MIN_RATE: u64 = 1 << 20;

/// The socket, for an answer: each write waits at most the timeout, and no longer than the
/// answer may take at [`MIN_RATE`].
struct Paced<'a> {
    stream: &'a std::net::TcpStream,
    timeout: Duration,
    current: Option<Duration>,
    started: Instant,
    written: u64,
}

impl Write for Paced<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let allowed = self.timeout + Duration::from_secs(self.written / MIN_RATE);
        let left = allowed.saturating_sub(self.started.elapsed());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client takes the answer too slowly",
            ));
        }
        let wanted = left.min(self.timeout);
        if self.current != Some(wanted) {
            self.stream.set_write_timeout(Some(wanted))?;
            self.current = Some(wanted);
        }
        let written = self.stream.write(buf)?;
        self.written += written as u64;
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for Paced<'_> {
    fn drop(&mut self) {
        // The next request's answer starts with the usual timeout.
        let _ = self.stream.set_write_timeout(Some(self.timeout));
    }
}

struct BodyReader<'a> {
    exchange: &'a mut Exchange,
}

impl Read for BodyReader<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        self.exchange.read_body(out)
    }
}
