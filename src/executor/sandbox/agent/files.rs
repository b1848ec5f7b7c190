//! File operations inside a runner, each in its own child of the init: listings and downloads
//! as the image's user (root inside when privileged), updates as root inside, all resolved by
//! [`crate::executor::fsview`] within the runner's root, so planted symlinks cannot lead anywhere else.

use std::{
    io::{self, Read, Write},
    os::fd::{AsFd, OwnedFd},
    path::Path,
};

use rustix::fs::Mode;

use super::{Context, rootfs};
use crate::{
    error::{Error, Result},
    executor::{
        FileEntry, FileUpdate,
        fsview::{NameSource, Root},
        sandbox::protocol::{self, AgentReply, AgentRequest, SocketReader, SocketWriter},
    },
};

/// Serves a file operation; returns the child's exit code.
pub(super) fn serve(op: OwnedFd, context: &Context) -> i32 {
    rustix::process::umask(Mode::from_raw_mode(0o022));
    let mut input = SocketReader::new(&op, u64::MAX);
    let result = match protocol::read_request(&mut input) {
        Ok(AgentRequest::List {
            path,
            recursive,
            privileged,
        }) => list(&op, &path, recursive, privileged, context),
        Ok(AgentRequest::Read { path, privileged }) => read(&op, &path, privileged, context),
        Ok(AgentRequest::Update { delete, copy }) => update(&op, &mut input, delete, copy),
        Ok(AgentRequest::Execute { .. }) => Err(Error::Internal("not a file operation".into())),
        Err(err) => Err(Error::Io(err)),
    };
    match result {
        Ok(()) => 0,
        Err(err) => {
            let _ = protocol::send_reply(op.as_fd(), &reply_for(err), &[]);
            1
        }
    }
}

/// The reply that makes the server return the same error.
fn reply_for(err: Error) -> AgentReply {
    match err {
        Error::FileNotFound(_) => AgentReply::NotFound,
        Error::FileCopy(detail) => AgentReply::FileCopy(detail),
        other => AgentReply::Failed(other.to_string()),
    }
}

/// Drops to the image's user unless privileged, then opens the runner's view.
fn open_root(privileged: bool, context: &Context) -> Result<Root> {
    if !privileged {
        rootfs::become_user(context.user.uid, context.user.gid)?;
    }
    Ok(Root::open(
        Path::new("/"),
        "/workspace",
        NameSource::InRoot,
    )?)
}

fn list(
    op: &OwnedFd,
    path: &str,
    recursive: bool,
    privileged: bool,
    context: &Context,
) -> Result<()> {
    let listing = open_root(privileged, context)?.list(path, recursive)?;
    protocol::send_reply(op.as_fd(), &AgentReply::Done(None), &[])?;
    let mut out = SocketWriter::new(op);
    listing.write_json(&mut out)?;
    Ok(out.flush()?)
}

fn read(op: &OwnedFd, path: &str, privileged: bool, context: &Context) -> Result<()> {
    let content = open_root(privileged, context)?.open_file(path)?;
    protocol::send_reply(op.as_fd(), &AgentReply::Done(Some(content.length)), &[])?;
    let mut out = SocketWriter::new(op);
    io::copy(&mut content.reader.take(content.length), &mut out)?;
    Ok(out.flush()?)
}

/// Deletes, then copies entry by entry as their contents arrive (so only one file's content
/// is held in memory, which counts against the runner's memory limit).
fn update(
    op: &OwnedFd,
    input: &mut impl Read,
    delete: Vec<String>,
    copy: Vec<(String, u64)>,
) -> Result<()> {
    let root = Root::open(Path::new("/"), "/workspace", NameSource::InRoot)?;
    root.apply(&FileUpdate {
        delete,
        copy: Vec::new(),
    })?;
    let mut failures = Vec::new();
    for (path, length) in copy {
        let mut content = Vec::new();
        input.take(length).read_to_end(&mut content)?;
        if content.len() as u64 != length {
            return Err(Error::Io(io::ErrorKind::UnexpectedEof.into()));
        }
        let entry = FileEntry { path, content };
        if let Err(err) = root.apply(&FileUpdate {
            delete: Vec::new(),
            copy: vec![entry],
        }) {
            failures.push(match err {
                Error::FileCopy(detail) => detail,
                other => other.to_string(),
            });
        }
    }
    if !failures.is_empty() {
        return Err(Error::FileCopy(failures.join("; ")));
    }
    Ok(protocol::send_reply(
        op.as_fd(),
        &AgentReply::Done(None),
        &[],
    )?)
}
