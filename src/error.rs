//! The one error type of poseidon-lite and its mapping to HTTP.
//!
//! Every fallible operation returns [`Error`]; [`Error::status`] and [`Error::code`] are the only
//! place that decides which HTTP status and Poseidon `errorCode` a failure becomes.

use std::{fmt, io};

use crate::id::{EnvironmentId, RunnerId};

/// Everything that can go wrong while serving a request or managing runners.
#[derive(Debug)]
pub enum Error {
    /// The request is malformed: bad JSON, wrong types, invalid values (400).
    BadRequest(String),
    /// The `Poseidon-Token` header is missing or wrong (401).
    Unauthorized,
    /// The request is not allowed, e.g. a WebSocket from a foreign origin (403).
    Forbidden(String),
    /// No route matches the request (404, empty body).
    NotFound,
    /// The HTTP method is not allowed on this route (405, empty body).
    MethodNotAllowed,
    /// The execution environment a request body names does not exist (404).
    UnknownEnvironment(EnvironmentId),
    /// The execution environment a path names does not exist (404; an empty body, as for any
    /// path that names nothing).
    EnvironmentNotFound(EnvironmentId),
    /// The runner does not exist, expired or was destroyed (410).
    UnknownRunner(String),
    /// The execution id is unknown or was already used (404).
    UnknownExecution,
    /// The request body exceeds the configured limit (413).
    PayloadTooLarge(u64),
    /// A file or directory is missing or unreadable for the runner's user (424).
    FileNotFound(String),
    /// No idle runner and no capacity to create one (500, `NOMAD_OVERLOAD`).
    NoRunnerAvailable,
    /// Copying files into a runner failed partly or wholly (500, `UNKNOWN`).
    FileCopy(String),
    /// The environment's image cannot be resolved (400).
    UnknownImage(String),
    /// A container image is missing from its registry, malformed or refused (400).
    Image(String),
    /// A container registry cannot be reached or fails (502).
    Registry(String),
    /// The environment's image is still being pulled (500, `NOMAD_OVERLOAD`: try again).
    ImagePending(String),
    /// An I/O error of the server itself (500).
    Io(io::Error),
    /// Any other internal failure, with a description (500).
    Internal(String),
}

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Creates a [`Error::BadRequest`] from anything displayable.
    pub fn bad_request(message: impl fmt::Display) -> Self {
        Error::BadRequest(message.to_string())
    }

    /// Creates an [`Error::Internal`] from a context and an underlying error.
    pub fn internal(context: &str, err: impl fmt::Display) -> Self {
        Error::Internal(format!("{context}: {err}"))
    }

    /// Creates an [`Error::UnknownRunner`] for a runner id.
    pub fn unknown_runner(id: &RunnerId) -> Self {
        Error::UnknownRunner(id.to_string())
    }

    /// The HTTP status code Poseidon uses for this error.
    pub fn status(&self) -> u16 {
        match self {
            Error::BadRequest(_) | Error::UnknownImage(_) | Error::Image(_) => 400,
            Error::Unauthorized => 401,
            Error::Forbidden(_) => 403,
            Error::NotFound | Error::UnknownEnvironment(_) | Error::EnvironmentNotFound(_) => 404,
            Error::UnknownExecution => 404,
            Error::MethodNotAllowed => 405,
            Error::UnknownRunner(_) => 410,
            Error::PayloadTooLarge(_) => 413,
            Error::FileNotFound(_) => 424,
            Error::Registry(_) => 502,
            Error::NoRunnerAvailable
            | Error::ImagePending(_)
            | Error::FileCopy(_)
            | Error::Io(_)
            | Error::Internal(_) => 500,
        }
    }

    /// The Poseidon `errorCode` for 5xx errors; client errors carry none.
    pub fn code(&self) -> Option<&'static str> {
        match self {
            Error::NoRunnerAvailable | Error::ImagePending(_) => Some("NOMAD_OVERLOAD"),
            Error::FileCopy(_) | Error::Io(_) | Error::Internal(_) | Error::Registry(_) => {
                Some("UNKNOWN")
            }
            _ => None,
        }
    }

    /// Whether Poseidon answers this error with an empty body rather than JSON.
    pub fn has_empty_body(&self) -> bool {
        matches!(
            self,
            Error::Unauthorized
                | Error::NotFound
                | Error::MethodNotAllowed
                | Error::EnvironmentNotFound(_)
        )
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::BadRequest(message) => f.write_str(message),
            Error::Unauthorized => f.write_str("unauthorized"),
            Error::Forbidden(reason) => f.write_str(reason),
            Error::NotFound => f.write_str("not found"),
            Error::MethodNotAllowed => f.write_str("method not allowed"),
            Error::UnknownEnvironment(id) => {
                write!(f, "execution environment {id} not found")
            }
            Error::EnvironmentNotFound(id) => write!(f, "execution environment {id} not found"),
            Error::UnknownRunner(id) => write!(f, "no runner found with id {id}"),
            Error::UnknownExecution => f.write_str("execution id unknown"),
            Error::PayloadTooLarge(limit) => {
                write!(f, "request body exceeds the limit of {limit} bytes")
            }
            Error::FileNotFound(_) => f.write_str("file not found or insufficient permissions"),
            Error::NoRunnerAvailable => {
                f.write_str("no runners available for this execution environment")
            }
            Error::FileCopy(detail) => write!(f, "file copy failed: {detail}"),
            Error::UnknownImage(image) => write!(f, "unknown image {image:?}"),
            Error::Image(message) | Error::Registry(message) => f.write_str(message),
            Error::ImagePending(image) => write!(f, "image {image} is still being pulled"),
            Error::Io(err) => write!(f, "i/o error: {err}"),
            Error::Internal(message) => f.write_str(message),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io(err) => Some(err),
            _ => None,
        }
    }
}

impl From<io::Error> for Error {
    fn from(err: io::Error) -> Self {
        Error::Io(err)
    }
}

impl From<rustix::io::Errno> for Error {
    fn from(errno: rustix::io::Errno) -> Self {
        Error::Io(errno.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_and_codes_follow_poseidon() {
        assert_eq!(Error::NoRunnerAvailable.status(), 500);
        assert_eq!(Error::NoRunnerAvailable.code(), Some("NOMAD_OVERLOAD"));
        assert_eq!(Error::UnknownRunner("x".into()).status(), 410);
        assert_eq!(Error::UnknownRunner("x".into()).code(), None);
        assert_eq!(Error::UnknownEnvironment(EnvironmentId(3)).status(), 404);
        assert_eq!(Error::FileNotFound("a".into()).status(), 424);
        assert_eq!(Error::PayloadTooLarge(10).status(), 413);
        assert_eq!(Error::Internal("x".into()).code(), Some("UNKNOWN"));
        assert!(Error::Unauthorized.has_empty_body());
        assert!(!Error::UnknownExecution.has_empty_body());
    }

    #[test]
    fn messages_match_poseidon_wording() {
        assert_eq!(
            Error::NoRunnerAvailable.to_string(),
            "no runners available for this execution environment"
        );
        assert_eq!(Error::UnknownExecution.to_string(), "execution id unknown");
        assert_eq!(
            Error::FileNotFound("x".into()).to_string(),
            "file not found or insufficient permissions"
        );
        assert_eq!(
            Error::UnknownEnvironment(EnvironmentId(7)).to_string(),
            "execution environment 7 not found"
        );
    }
}
