//! A client connection between requests: the stream, bytes read ahead of what was parsed, a
//! deadline for reads, and its place in the count of open connections. Request bodies are read
//! through [`Body`]; answers are written by [`write_head`] and [`write_body`].

use std::{
    io::{self, Read, Write},
    net::TcpStream,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use super::head::{Framing, MAX_LINE};

/// Bytes read from the socket at once.
const READ_CHUNK: usize = 16 << 10;

/// Holds one place in the count of open connections until dropped.
#[derive(Debug)]
pub struct Slot(Arc<AtomicUsize>);

impl Slot {
    /// Takes a place if fewer than `max` are taken.
    pub fn take(open: &Arc<AtomicUsize>, max: usize) -> Option<Slot> {
        let taken = open.fetch_add(1, Ordering::SeqCst);
        if taken >= max {
            open.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        Some(Slot(Arc::clone(open)))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Which listener a connection came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Port {
    /// The HTTP API (which also serves WebSocket upgrades).
    Api,
    /// The WebSocket listener.
    WebSocket,
}

/// A connection with the bytes read but not yet consumed.
#[derive(Debug)]
pub struct Conn {
    /// The socket.
    pub stream: TcpStream,
    /// Read but not consumed: `buf[pos..]`.
    pub buf: Vec<u8>,
    /// Start of the unconsumed bytes.
    pub pos: usize,
    /// Reads fail with `TimedOut` from then on.
    pub deadline: Option<Instant>,
    /// The listener.
    pub port: Port,
    /// Its place in the count of open connections.
    pub slot: Slot,
}

impl Conn {
    /// Drops `count` bytes from the unconsumed ones.
    pub fn consume(&mut self, count: usize) {
        self.pos = (self.pos + count).min(self.buf.len());
        if self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        }
    }

    /// The unconsumed bytes.
    pub fn pending(&self) -> &[u8] {
        &self.buf[self.pos..]
    }

    /// Makes the socket blocking with `timeout` for each read and write.
    pub fn block(&self, timeout: Duration) -> io::Result<()> {
        self.stream.set_nonblocking(false)?;
        self.stream.set_read_timeout(Some(timeout))?;
        self.stream.set_write_timeout(Some(timeout))
    }

    fn fill(&mut self) -> io::Result<usize> {
        if let Some(deadline) = self.deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::ErrorKind::TimedOut.into());
            }
            let current = self.stream.read_timeout()?;
            if current.is_none_or(|current| current > left) {
                self.stream.set_read_timeout(Some(left))?;
            }
        }
        self.buf.clear();
        self.pos = 0;
        self.buf.resize(READ_CHUNK, 0);
        let read = self.stream.read(&mut self.buf);
        self.buf.truncate(*read.as_ref().unwrap_or(&0));
        read
    }

    fn byte(&mut self) -> io::Result<u8> {
        if self.pending().is_empty() && self.fill()? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let byte = self.buf[self.pos];
        self.consume(1);
        Ok(byte)
    }
}

impl Read for Conn {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.pending().is_empty() && self.fill()? == 0 {
            return Ok(0);
        }
        let count = out.len().min(self.pending().len());
        out[..count].copy_from_slice(&self.pending()[..count]);
        self.consume(count);
        Ok(count)
    }
}

/// The body of the request being served.
#[derive(Debug)]
pub struct Body {
    framing: Framing,
    /// Bytes handed out so far.
    consumed: u64,
    /// Bytes left of a length-delimited body or of the current chunk.
    left: u64,
    /// A chunked body's end was read.
    done: bool,
}

impl Body {
    /// The body that `framing` announces.
    pub fn new(framing: Framing) -> Body {
        let left = match framing {
            Framing::Length(length) => length,
            Framing::Chunked => 0,
        };
        Body {
            framing,
            consumed: 0,
            left,
            done: matches!(framing, Framing::Length(_)) && left == 0,
        }
    }

    /// Whether the whole body has been read (so the connection can serve another request).
    pub fn finished(&self) -> bool {
        match self.framing {
            Framing::Length(_) => self.left == 0,
            Framing::Chunked => self.done,
        }
    }

    /// Bytes read from the body so far.
    pub fn consumed(&self) -> u64 {
        self.consumed
    }

    /// Reads from the body.
    pub fn read(&mut self, conn: &mut Conn, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        if self.framing == Framing::Chunked && self.left == 0 {
            if self.done {
                return Ok(0);
            }
            self.left = chunk_size(conn)?;
            if self.left == 0 {
                trailers(conn)?;
                self.done = true;
                return Ok(0);
            }
        }
        if self.left == 0 {
            return Ok(0);
        }
        let limit = out
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let read = conn.read(&mut out[..limit])?;
        if read == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        self.left -= read as u64;
        self.consumed += read as u64;
        if self.framing == Framing::Chunked && self.left == 0 {
            expect_crlf(conn)?;
        }
        Ok(read)
    }
}

/// One line (without CRLF), at most [`MAX_LINE`] bytes.
fn line(conn: &mut Conn) -> io::Result<Vec<u8>> {
    let mut line = Vec::new();
    loop {
        match conn.byte()? {
            b'\n' => {
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return Ok(line);
            }
            byte if line.len() < MAX_LINE => line.push(byte),
            _ => return Err(invalid("a chunk line is too long")),
        }
    }
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_owned())
}

fn chunk_size(conn: &mut Conn) -> io::Result<u64> {
    let line = line(conn)?;
    let size = line.split(|&byte| byte == b';').next().unwrap_or_default();
    let size = std::str::from_utf8(size).map_err(|_| invalid("invalid chunk size"))?;
    let size = size.trim();
    if size.is_empty() || size.len() > 15 || !size.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(invalid("invalid chunk size"));
    }
    u64::from_str_radix(size, 16).map_err(|_| invalid("invalid chunk size"))
}

fn expect_crlf(conn: &mut Conn) -> io::Result<()> {
    if line(conn)?.is_empty() {
        Ok(())
    } else {
        Err(invalid("a chunk does not end with CRLF"))
    }
}

/// Skips the trailer fields (at most as many bytes as a head).
fn trailers(conn: &mut Conn) -> io::Result<()> {
    let mut total = 0;
    loop {
        let line = line(conn)?;
        if line.is_empty() {
            return Ok(());
        }
        total += line.len();
        if total > super::head::MAX_HEAD {
            return Err(invalid("too many trailer fields"));
        }
    }
}

/// The reason phrase of a status.
pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        101 => "Switching Protocols",
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        410 => "Gone",
        413 => "Content Too Large",
        414 => "URI Too Long",
        424 => "Failed Dependency",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "",
    }
}

/// How an answer's body is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Length {
    /// Exactly this many bytes, with `Content-Length`.
    Known(u64),
    /// Chunked.
    Chunked,
}

/// The status line and header fields of an answer.
pub fn write_head(
    out: &mut impl Write,
    status: u16,
    headers: &[(&str, &str)],
    length: Length,
    keep_alive: bool,
) -> io::Result<()> {
    let mut head = format!("HTTP/1.1 {status} {}\r\n", reason(status));
    for (name, value) in headers {
        // Values come from handlers; a line break would start a header of its own.
        if !value.contains(['\r', '\n']) {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
    }
    match length {
        Length::Known(length) if status != 204 => {
            head.push_str(&format!("Content-Length: {length}\r\n"));
        }
        Length::Known(_) => {}
        Length::Chunked => head.push_str("Transfer-Encoding: chunked\r\n"),
    }
    if !keep_alive {
        head.push_str("Connection: close\r\n");
    }
    head.push_str("\r\n");
    out.write_all(head.as_bytes())
}

/// Copies a body of `length` from `body`; a chunked one in chunks of what each read returns.
pub fn write_body(out: &mut impl Write, body: &mut dyn Read, length: Length) -> io::Result<()> {
    let mut buffer = vec![0; 64 << 10];
    let mut left = match length {
        Length::Known(length) => length,
        Length::Chunked => u64::MAX,
    };
    while left > 0 {
        let want = buffer
            .len()
            .min(usize::try_from(left).unwrap_or(usize::MAX));
        let read = match body.read(&mut buffer[..want]) {
            Ok(read) => read,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => return Err(err),
        };
        if read == 0 {
            break;
        }
        match length {
            Length::Known(_) => {
                out.write_all(&buffer[..read])?;
                left -= read as u64;
            }
            Length::Chunked => {
                out.write_all(format!("{read:x}\r\n").as_bytes())?;
                out.write_all(&buffer[..read])?;
                out.write_all(b"\r\n")?;
            }
        }
    }
    match length {
        Length::Known(_) if left > 0 => Err(io::ErrorKind::UnexpectedEof.into()),
        Length::Known(_) => out.flush(),
        Length::Chunked => {
            out.write_all(b"0\r\n\r\n")?;
            out.flush()
        }
    }
}
