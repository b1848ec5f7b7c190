//! Image references as Docker writes and resolves them:
//! `[registry[:port]/]repository[:tag][@sha256:digest]`. No registry part means Docker Hub, and
//! a one-component Docker Hub name lives under `library/` (`python` is
//! `docker.io/library/python:latest`).

use std::fmt;

use super::digest::Digest;
use crate::error::{Error, Result};

/// Docker Hub's canonical registry name.
pub const DOCKER_HUB: &str = "docker.io";
/// The host that serves Docker Hub's registry API.
pub const DOCKER_HUB_API: &str = "registry-1.docker.io";

/// A fully resolved image reference.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    /// The registry host (and port): `docker.io`, `ghcr.io`, `127.0.0.1:5000`.
    pub registry: String,
    /// The repository path: `library/python`, `openhpi/co_execenv_python`.
    pub repository: String,
    /// The tag; `latest` when the name has neither tag nor digest.
    pub tag: Option<String>,
    /// The pinned manifest digest, which wins over the tag when pulling.
    pub digest: Option<Digest>,
}

impl Reference {
    /// Parses a name the way `docker pull` does.
    pub fn parse(name: &str) -> Result<Reference> {
        let bad = |why: &str| Error::Image(format!("invalid image name {name:?}: {why}"));
        if name.is_empty() || name.len() > 512 {
            return Err(bad("empty or too long"));
        }
        let (rest, digest) = match name.split_once('@') {
            Some((rest, digest)) => (
                rest,
                Some(Digest::parse(digest).map_err(|_| bad("bad digest"))?),
            ),
            None => (name, None),
        };
        // A tag follows the last ':' after the last '/'; an earlier ':' is a registry port.
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (path, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => (&rest[..last_slash + i], Some(&rest[last_slash + i + 1..])),
            None => (rest, None),
        };
        if tag.is_some_and(|tag| !valid_tag(tag)) {
            return Err(bad("bad tag"));
        }
        let (registry, repository) = split_registry(path);
        if repository.len() > 255 || !repository.split('/').all(valid_component) {
            return Err(bad(
                "repository must be lower-case letters, digits and separators",
            ));
        }
        if registry.is_empty()
            || !registry
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
        {
            return Err(bad("bad registry"));
        }
        let repository = if registry == DOCKER_HUB && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository.to_owned()
        };
        let tag = match (tag, &digest) {
            (None, None) => Some("latest".to_owned()),
            (tag, _) => tag.map(str::to_owned),
        };
        Ok(Reference {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// What to ask the registry's manifest endpoint for: the digest if pinned, else the tag.
    pub fn manifest_reference(&self) -> &str {
        match (&self.digest, &self.tag) {
            (Some(digest), _) => digest.as_str(),
            (None, Some(tag)) => tag,
            (None, None) => "latest",
        }
    }

    /// Whether this names an image on Docker Hub (where registry mirrors apply).
    pub fn is_docker_hub(&self) -> bool {
        self.registry == DOCKER_HUB
    }

    /// The short form Docker prints: `python:3.8`, `openhpi/co_execenv_python:3.8`,
    /// `127.0.0.1:5000/busybox:1`.
    pub fn familiar(&self) -> String {
        let full = self.to_string();
        let Some(short) = full.strip_prefix("docker.io/") else {
            return full;
        };
        short
            .strip_prefix("library/")
            .filter(|s| !s.contains('/') || s.contains('@'))
            .unwrap_or(short)
            .to_owned()
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

/// Splits the registry off as Docker does: the first component is a registry only if it
/// contains a '.' or ':' or is `localhost`, and there is more than one component.
fn split_registry(path: &str) -> (String, &str) {
    match path.split_once('/') {
        Some((first, rest))
            if first.contains('.') || first.contains(':') || first == "localhost" =>
        {
            let registry = if first == "index.docker.io" {
                DOCKER_HUB
            } else {
                first
            };
            (registry.to_owned(), rest)
        }
        _ => (DOCKER_HUB.to_owned(), path),
    }
}

/// `[a-z0-9]+` runs separated by `.`, `_`, `__` or runs of `-`.
fn valid_component(component: &str) -> bool {
    let bytes = component.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if bytes.is_empty() || !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < bytes.len() {
        if alnum(bytes[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && !alnum(bytes[i]) {
            i += 1;
        }
        let sep = &component[start..i];
        if !(sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|b| b == b'-')) {
            return false;
        }
    }
    true
}

/// `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`.
fn valid_tag(tag: &str) -> bool {
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    !tag.is_empty()
        && tag.len() <= 128
        && word(tag.as_bytes()[0])
        && tag.bytes().all(|b| word(b) || b == b'.' || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full(name: &str) -> String {
        Reference::parse(name).unwrap().to_string()
    }

    #[test]
    fn names_resolve_as_docker_resolves_them() {
        assert_eq!(full("python"), "docker.io/library/python:latest");
        assert_eq!(full("python:3.8"), "docker.io/library/python:3.8");
        assert_eq!(
            full("openhpi/co_execenv_python:3.8"),
            "docker.io/openhpi/co_execenv_python:3.8"
        );
        assert_eq!(full("docker.io/python"), "docker.io/library/python:latest");
        assert_eq!(
            full("index.docker.io/library/python:3"),
            "docker.io/library/python:3"
        );
        assert_eq!(full("localhost/app"), "localhost/app:latest");
        assert_eq!(full("localhost:5000/app:1"), "localhost:5000/app:1");
        assert_eq!(
            full("127.0.0.1:5000/a/b/c:v1.2-x"),
            "127.0.0.1:5000/a/b/c:v1.2-x"
        );
        assert_eq!(full("ghcr.io/org/img"), "ghcr.io/org/img:latest");
        assert_eq!(full("foo/bar"), "docker.io/foo/bar:latest");
        let digest = format!("sha256:{}", "0".repeat(64));
        let pinned = Reference::parse(&format!("python@{digest}")).unwrap();
        assert_eq!(pinned.tag, None);
        assert_eq!(pinned.manifest_reference(), digest);
        let both = Reference::parse(&format!("python:3@{digest}")).unwrap();
        assert_eq!(both.manifest_reference(), digest);
        assert_eq!(both.tag.as_deref(), Some("3"));
    }

    #[test]
    fn familiar_names_drop_docker_hub_defaults() {
        let familiar = |name: &str| Reference::parse(name).unwrap().familiar();
        assert_eq!(familiar("docker.io/library/python:3.8"), "python:3.8");
        assert_eq!(
            familiar("openhpi/co_execenv_java:17"),
            "openhpi/co_execenv_java:17"
        );
        assert_eq!(familiar("127.0.0.1:5000/x:1"), "127.0.0.1:5000/x:1");
    }

    #[test]
    fn bad_names_are_refused() {
        for bad in [
            "",
            "Python",
            "a//b",
            "a/../b",
            "-a",
            "a:",
            "a:-x",
            "a@sha256:12",
            "/a",
            "a/",
            "a b",
        ] {
            let err = Reference::parse(bad).unwrap_err();
            assert!(
                err.to_string().starts_with("invalid image name"),
                "{bad}: {err}"
            );
        }
    }
}
