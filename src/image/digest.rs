//! Content digests (`sha256:<64 hex>`): validated before any path is built from one, and
//! computed while data streams past.

use std::{fmt, io, io::Read};

use sha2::{Digest as _, Sha256};

use crate::error::{Error, Result};

/// A validated `sha256:` digest (the only algorithm registries and image layouts use in
/// practice; others are refused rather than half supported).
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "String", into = "String")]
pub struct Digest(String);

impl TryFrom<String> for Digest {
    type Error = Error;
    fn try_from(text: String) -> Result<Digest> {
        Digest::parse(&text)
    }
}

impl From<Digest> for String {
    fn from(digest: Digest) -> String {
        digest.0
    }
}

impl Digest {
    /// Parses `sha256:` followed by 64 lower-case hex digits; anything else is refused, so a
    /// digest can safely become a file name.
    pub fn parse(text: &str) -> Result<Digest> {
        let hex = text
            .strip_prefix("sha256:")
            .ok_or_else(|| Error::Image(format!("unsupported digest {text:?}: not sha256")))?;
        if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(Error::Image(format!("malformed digest {text:?}")));
        }
        Ok(Digest(text.to_owned()))
    }

    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Digest {
        Digest::from_hasher(Sha256::new_with_prefix(bytes))
    }

    fn from_hasher(hasher: Sha256) -> Digest {
        Digest(format!("sha256:{}", hex(&hasher.finalize())))
    }

    /// The 64 hex digits (a safe file name).
    pub fn hex(&self) -> &str {
        &self.0["sha256:".len()..]
    }

    /// The full `sha256:…` form.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The first 12 hex digits, as Docker shows image ids.
    pub fn short(&self) -> &str {
        &self.hex()[..12]
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A reader that hashes and counts what passes through it and refuses to yield more than
/// `limit` bytes (an error, not a silent truncation).
#[derive(Debug)]
pub struct Hashing<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
    limit: u64,
    what: &'static str,
}

impl<R: Read> Hashing<R> {
    /// Wraps `inner`; `what` names the stream in the error when `limit` is exceeded.
    pub fn new(inner: R, limit: u64, what: &'static str) -> Self {
        Hashing {
            inner,
            hasher: Sha256::new(),
            count: 0,
            limit,
            what,
        }
    }

    /// Bytes read so far.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Reads to the end, then returns the digest and byte count of everything read.
    pub fn finish(mut self) -> io::Result<(Digest, u64)> {
        io::copy(&mut self, &mut io::sink())?;
        Ok((Digest::from_hasher(self.hasher), self.count))
    }
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count += n as u64;
        if self.count > self.limit {
            return Err(io::Error::other(format!(
                "{} exceeds the limit of {} bytes",
                self.what, self.limit
            )));
        }
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// Checks that `actual` is `expected`, naming `what` otherwise.
pub fn verify(what: &str, expected: &Digest, actual: &Digest) -> Result<()> {
    if expected == actual {
        return Ok(());
    }
    Err(Error::Image(format!(
        "{what}: digest mismatch: expected {expected}, got {actual}"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_well_formed_sha256_digests_parse() {
        let good = format!("sha256:{}", "a".repeat(64));
        assert_eq!(Digest::parse(&good).unwrap().hex(), "a".repeat(64));
        for bad in [
            "sha256:../../etc/passwd".to_owned(),
            format!("sha256:{}", "A".repeat(64)),
            format!("sha256:{}", "a".repeat(63)),
            format!("sha512:{}", "a".repeat(128)),
            "a".repeat(64),
        ] {
            assert!(Digest::parse(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn hashing_reader_hashes_and_bounds() {
        let (digest, n) = Hashing::new(&b"abc"[..], 3, "blob").finish().unwrap();
        assert_eq!(n, 3);
        assert_eq!(
            digest.as_str(),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let err = Hashing::new(&b"abcd"[..], 3, "blob").finish().unwrap_err();
        assert_eq!(err.to_string(), "blob exceeds the limit of 3 bytes");
    }
}
