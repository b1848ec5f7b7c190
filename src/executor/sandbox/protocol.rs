//! The wire protocol between the server and a sandbox's agent: records on `SOCK_SEQPACKET`
//! unix sockets, each at most [`MAX_RECORD`] bytes, optionally carrying descriptors.
//!
//! Requests travel server → agent as a byte stream of records: a little-endian `u32` length,
//! the JSON [`AgentRequest`], then raw payload bytes (file contents). Replies are one JSON [`AgentReply`]
//! record, followed for listings and downloads by raw data records until end of file.
//! Everything the server receives from an agent is untrusted: records are bounded (a longer
//! one is an error), unexpected descriptors are closed.

use std::{
    io::{self, IoSlice, IoSliceMut, Read, Write},
    mem::MaybeUninit,
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    path::PathBuf,
};

use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketFlags, SocketType,
};
use serde::{Deserialize, Serialize};

/// Largest record in bytes.
pub const MAX_RECORD: usize = 64 << 10;
/// Most descriptors one record may carry.
const MAX_FDS: usize = 2;
/// Largest request header (the JSON part of a request) the agent accepts.
const MAX_REQUEST_HEADER: usize = 64 << 20;

/// Everything the agent needs to build a runner, sent once right after it starts.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Setup {
    /// The runner's host name.
    pub hostname: String,
    /// First host uid (and gid) of the runner's range; it is root inside.
    pub uid_base: u32,
    /// `cgroup.procs` files the agent joins before anything else.
    pub cgroup_procs: Vec<PathBuf>,
    /// Where the root file system comes from.
    pub image: ImageSource,
    /// An empty host directory on which the agent mounts the runner's writable layer.
    pub runner_dir: PathBuf,
    /// Size of the writable layer in MiB.
    pub disk_limit_mb: u64,
    /// Content of the runner's `/etc/resolv.conf` (networked runners only).
    #[serde(default)]
    pub resolv_conf: Option<String>,
    /// The image's `Env` (`NAME=value`), in every command's environment.
    #[serde(default)]
    pub env: Vec<String>,
    /// Shared with the server, to take the runner back after a restart (see `reattach`).
    pub secret: String,
}

/// The lower layer of a runner's root file system.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ImageSource {
    /// A read-only view of the host's `/usr`, `/etc` and the `/bin`-style directories.
    Host,
    /// A root file system directory on the host.
    Directory(PathBuf),
}

/// One operation, sent by the server on a fresh operation socket.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum AgentRequest {
    /// Run a command under a new pseudo-terminal.
    Execute {
        /// The command line for `bash -c`.
        command: String,
        /// Extra environment variables.
        environment: Vec<(String, String)>,
        /// Run as root inside instead of the unprivileged user.
        privileged: bool,
    },
    /// List a path.
    List {
        /// Path as requested.
        path: String,
        /// Descend into directories.
        recursive: bool,
        /// List as root inside.
        privileged: bool,
    },
    /// Read a regular file.
    Read {
        /// Path as requested.
        path: String,
        /// Read as root inside.
        privileged: bool,
    },
    /// Delete, then copy; the contents of `copy` follow the header in order.
    Update {
        /// Paths to delete.
        delete: Vec<String>,
        /// Entries to create with the length of their content.
        copy: Vec<(String, u64)>,
    },
}

/// The agent's answer to the setup or to an operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentReply {
    /// The runner is ready.
    Ready,
    /// The command started; the record carries the pty master and the stderr read end.
    Started,
    /// The command exited with a code.
    Exited(i32),
    /// The command was killed by a signal.
    Signaled(i32),
    /// The operation succeeded; for downloads, the number of bytes that follow.
    Done(Option<u64>),
    /// The path is missing or unreadable.
    NotFound,
    /// Copying failed partly or wholly.
    FileCopy(String),
    /// Anything else went wrong.
    Failed(String),
}

/// A connected pair of close-on-exec `SOCK_SEQPACKET` unix sockets.
pub fn socketpair() -> io::Result<(OwnedFd, OwnedFd)> {
    let kind = SocketType::SEQPACKET;
    Ok(rustix::net::socketpair(
        AddressFamily::UNIX,
        kind,
        SocketFlags::CLOEXEC,
        None,
    )?)
}

/// Sends one record, with descriptors if any; never raises `SIGPIPE`.
pub fn send_record(sock: BorrowedFd<'_>, data: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(io::Error::other("too many descriptors for one record"));
    }
    loop {
        match rustix::net::sendmsg(
            sock,
            &[IoSlice::new(data)],
            &mut control,
            SendFlags::NOSIGNAL,
        ) {
            Err(rustix::io::Errno::INTR) => continue,
            Err(err) => return Err(err.into()),
            Ok(sent) if sent == data.len() => return Ok(()),
            Ok(_) => return Err(io::Error::other("record sent partly")),
        }
    }
}

/// Receives one record into `buf`: its length (0 at end of file) and the descriptors it
/// carried. A record longer than `buf` or with more than `max_fds` descriptors is an error
/// (the descriptors that did arrive are closed).
pub fn recv_record(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    max_fds: usize,
    nonblocking: bool,
) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let mut flags = RecvFlags::CMSG_CLOEXEC;
    if nonblocking {
        flags |= RecvFlags::DONTWAIT;
    }
    let msg = loop {
        match rustix::net::recvmsg(sock, &mut [IoSliceMut::new(buf)], &mut control, flags) {
            Err(rustix::io::Errno::INTR) => continue,
            other => break other?,
        }
    };
    let mut fds = Vec::new();
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = message {
            fds.extend(received);
        }
    }
    if msg
        .flags
        .intersects(ReturnFlags::TRUNC | ReturnFlags::CTRUNC)
        || fds.len() > max_fds
    {
        return Err(io::Error::other("oversized record from the sandbox agent"));
    }
    Ok((msg.bytes, fds))
}

/// Sends a reply record.
pub fn send_reply(
    sock: BorrowedFd<'_>,
    reply: &AgentReply,
    fds: &[BorrowedFd<'_>],
) -> io::Result<()> {
    let mut text = serde_json::to_vec(reply).map_err(io::Error::other)?;
    text.truncate(MAX_RECORD);
    send_record(sock, &text, fds)
}

/// Receives a reply record; `None` at end of file. When `nonblocking` and nothing is queued,
/// the error is of kind `WouldBlock`.
pub fn recv_reply(
    sock: BorrowedFd<'_>,
    max_fds: usize,
    nonblocking: bool,
) -> io::Result<Option<(AgentReply, Vec<OwnedFd>)>> {
    let mut buf = vec![0; MAX_RECORD];
    let (len, fds) = recv_record(sock, &mut buf, max_fds, nonblocking)?;
    if len == 0 {
        return Ok(None);
    }
    let reply = serde_json::from_slice(&buf[..len]).map_err(io::Error::other)?;
    Ok(Some((reply, fds)))
}

/// Writes a request: length, JSON header; the caller writes any payload to the same writer.
pub fn write_request(out: &mut impl Write, request: &AgentRequest) -> io::Result<()> {
    let header = serde_json::to_vec(request).map_err(io::Error::other)?;
    let len = u32::try_from(header.len()).map_err(|_| io::Error::other("request too large"))?;
    out.write_all(&len.to_le_bytes())?;
    out.write_all(&header)
}

/// Reads a request header written by [`write_request`].
pub fn read_request(input: &mut impl Read) -> io::Result<AgentRequest> {
    let mut len = [0; 4];
    input.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_REQUEST_HEADER {
        return Err(io::Error::other("request header too large"));
    }
    let mut header = vec![0; len];
    input.read_exact(&mut header)?;
    serde_json::from_slice(&header).map_err(io::Error::other)
}

/// Writes a byte stream as records of at most [`MAX_RECORD`] bytes.
#[derive(Debug)]
pub struct SocketWriter<F: AsFd> {
    sock: F,
    buf: Vec<u8>,
}

impl<F: AsFd> SocketWriter<F> {
    /// A writer on `sock`; nothing is sent before the buffer fills or is flushed.
    pub fn new(sock: F) -> Self {
        SocketWriter {
            sock,
            buf: Vec::with_capacity(MAX_RECORD),
        }
    }
}

impl<F: AsFd> Write for SocketWriter<F> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.buf.len() == MAX_RECORD {
            self.flush()?;
        }
        let take = data.len().min(MAX_RECORD - self.buf.len());
        self.buf.extend_from_slice(&data[..take]);
        Ok(take)
    }

    fn flush(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            send_record(self.sock.as_fd(), &self.buf, &[])?;
            self.buf.clear();
        }
        Ok(())
    }
}

/// A buffer for one record, its pages already touched (so a reader prepared ahead of time
/// takes no page faults when a record arrives).
pub fn record_buffer() -> Box<[u8]> {
    vec![1; MAX_RECORD].into()
}

/// Reads the records of a socket as one byte stream, up to a limit; records carrying
/// descriptors are an error (their descriptors are closed).
#[derive(Debug)]
pub struct SocketReader<F: AsFd> {
    sock: F,
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    remaining: u64,
}

impl<F: AsFd> SocketReader<F> {
    /// A reader that fails once more than `limit` bytes arrive.
    pub fn new(sock: F, limit: u64) -> Self {
        Self::with_buffer(sock, limit, record_buffer())
    }

    /// Like [`SocketReader::new`], with a buffer from [`record_buffer`].
    pub fn with_buffer(sock: F, limit: u64, mut buf: Box<[u8]>) -> Self {
        if buf.len() != MAX_RECORD {
            buf = record_buffer();
        }
        SocketReader {
            sock,
            buf,
            start: 0,
            end: 0,
            remaining: limit,
        }
    }
}

impl<F: AsFd> Read for SocketReader<F> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.start == self.end {
            let (len, fds) = recv_record(self.sock.as_fd(), &mut self.buf, 0, false)?;
            if !fds.is_empty() {
                return Err(io::Error::other("unexpected descriptors"));
            }
            self.remaining = self
                .remaining
                .checked_sub(len as u64)
                .ok_or_else(|| io::Error::other("stream exceeds its limit"))?;
            (self.start, self.end) = (0, len);
        }
        let take = out.len().min(self.end - self.start);
        out[..take].copy_from_slice(&self.buf[self.start..self.start + take]);
        self.start += take;
        Ok(take)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_streams_round_trip_over_records() {
        let (a, b) = socketpair().unwrap();
        let writer_thread = std::thread::spawn(move || {
            let mut writer = SocketWriter::new(&a);
            let request = AgentRequest::Update {
                delete: vec!["./*".into()],
                copy: vec![("x".into(), 3)],
            };
            write_request(&mut writer, &request).unwrap();
            writer.write_all(&vec![7u8; 200_000]).unwrap();
            writer.flush().unwrap();
        });
        let mut reader = SocketReader::new(&b, 1 << 20);
        let request = read_request(&mut reader).unwrap();
        assert!(matches!(request, AgentRequest::Update { ref copy, .. } if copy[0].1 == 3));
        writer_thread.join().unwrap();
        let mut rest = Vec::new();
        reader.read_to_end(&mut rest).unwrap();
        assert_eq!(rest.len(), 200_000);
    }

    #[test]
    fn replies_carry_descriptors_and_bound_sizes() {
        let (a, b) = socketpair().unwrap();
        let (x, _y) = socketpair().unwrap();
        send_reply(a.as_fd(), &AgentReply::Started, &[x.as_fd()]).unwrap();
        let (reply, fds) = recv_reply(b.as_fd(), 2, false).unwrap().unwrap();
        assert_eq!((reply, fds.len()), (AgentReply::Started, 1));
        send_record(a.as_fd(), &vec![b'x'; MAX_RECORD + 1], &[]).unwrap();
        assert!(recv_reply(b.as_fd(), 2, false).is_err());
        let err = recv_reply(b.as_fd(), 0, true).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        drop(a);
        assert!(recv_reply(b.as_fd(), 0, true).unwrap().is_none());
    }
}
