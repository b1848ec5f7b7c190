//! Registry authentication: credentials from a Docker `config.json` auth file and the
//! `WWW-Authenticate` challenges registries answer with (Bearer token realms, as Docker Hub
//! uses, and plain Basic).

use std::{collections::BTreeMap, path::Path};

use base64::Engine as _;
use serde::Deserialize;

use crate::error::{Error, Result};

/// A user name and password for one registry.
#[derive(Clone, PartialEq, Eq)]
pub struct Credential {
    /// The user name.
    pub username: String,
    /// The password or access token.
    pub password: String,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credential({}, <hidden>)", self.username)
    }
}

impl Credential {
    /// The `Authorization: Basic …` value.
    pub fn basic(&self) -> String {
        let raw = format!("{}:{}", self.username, self.password);
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(raw)
        )
    }
}

/// Credentials per registry host, from Docker's `config.json` format (`auths` with `auth`
/// = base64 of `user:password`, or `username` and `password`). Credential helpers are not run.
#[derive(Debug, Clone, Default)]
pub struct Credentials(BTreeMap<String, Credential>);

#[derive(Deserialize)]
struct DockerConfig {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
}

#[derive(Deserialize)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
}

impl Credentials {
    /// Reads an auth file.
    pub fn load(path: &Path) -> Result<Credentials> {
        let bytes = std::fs::read(path).map_err(|e| {
            Error::Internal(format!("cannot read the auth file {}: {e}", path.display()))
        })?;
        Credentials::parse(&bytes)
            .map_err(|e| Error::Internal(format!("auth file {}: {e}", path.display())))
    }

    /// Parses the contents of an auth file.
    pub fn parse(bytes: &[u8]) -> std::result::Result<Credentials, String> {
        let config: DockerConfig = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        let mut out = BTreeMap::new();
        for (key, entry) in config.auths {
            let credential = match (entry.auth, entry.username, entry.password) {
                (Some(auth), _, _) if !auth.is_empty() => {
                    let decoded = base64::engine::general_purpose::STANDARD
                        .decode(auth.trim())
                        .map_err(|_| format!("entry {key:?}: auth is not base64"))?;
                    let decoded = String::from_utf8(decoded)
                        .map_err(|_| format!("entry {key:?}: auth is not UTF-8"))?;
                    let (user, pass) = decoded
                        .split_once(':')
                        .ok_or_else(|| format!("entry {key:?}: auth is not user:password"))?;
                    Credential {
                        username: user.to_owned(),
                        password: pass.to_owned(),
                    }
                }
                (_, Some(username), Some(password)) => Credential { username, password },
                _ => continue,
            };
            out.insert(registry_key(&key), credential);
        }
        Ok(Credentials(out))
    }

    /// The credential for a registry host (`docker.io` also matches Docker's
    /// `https://index.docker.io/v1/` key).
    pub fn get(&self, registry: &str) -> Option<&Credential> {
        self.0.get(&registry_key(registry))
    }
}

/// `https://index.docker.io/v1/` → `docker.io`; `https://host:5000/x` → `host:5000`.
fn registry_key(key: &str) -> String {
    let host = key.split_once("://").map_or(key, |(_, rest)| rest);
    let host = host.split('/').next().unwrap_or(host);
    match host {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
            "docker.io".to_owned()
        }
        other => other.to_owned(),
    }
}

/// A parsed `WWW-Authenticate` challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    /// `Bearer realm=…,service=…,scope=…`: fetch a token from the realm.
    Bearer {
        /// The token endpoint.
        realm: String,
        /// The `service` parameter, if given.
        service: Option<String>,
        /// The `scope` parameter, if given.
        scope: Option<String>,
    },
    /// `Basic realm=…`: send the credential with every request.
    Basic,
}

impl Challenge {
    /// Parses a header value; `None` for schemes not understood.
    pub fn parse(header: &str) -> Option<Challenge> {
        let (scheme, rest) = header.trim().split_once(' ').unwrap_or((header.trim(), ""));
        if scheme.eq_ignore_ascii_case("basic") {
            return Some(Challenge::Basic);
        }
        if !scheme.eq_ignore_ascii_case("bearer") {
            return None;
        }
        let params = parameters(rest);
        let get = |name: &str| {
            params
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.clone())
        };
        Some(Challenge::Bearer {
            realm: get("realm")?,
            service: get("service"),
            scope: get("scope"),
        })
    }
}

/// `key="value", key=value` pairs; quoted values may contain commas.
fn parameters(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = text.trim();
    while let Some((key, after)) = rest.split_once('=') {
        let key = key.trim().trim_start_matches(',').trim().to_owned();
        let after = after.trim_start();
        let (value, next) = if let Some(quoted) = after.strip_prefix('"') {
            let end = quoted.find('"').unwrap_or(quoted.len());
            (
                quoted[..end].to_owned(),
                quoted.get(end + 1..).unwrap_or(""),
            )
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (after[..end].trim().to_owned(), &after[end..])
        };
        out.push((key, value));
        rest = next.trim_start().trim_start_matches(',');
    }
    out
}

/// The token from a token endpoint's JSON answer (`token` or `access_token`).
pub fn token_from(bytes: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Answer {
        token: Option<String>,
        access_token: Option<String>,
    }
    let answer: Answer = serde_json::from_slice(bytes).ok()?;
    answer
        .token
        .or(answer.access_token)
        .filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_hub_challenges_parse() {
        let header = r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/python:pull,push""#;
        assert_eq!(
            Challenge::parse(header),
            Some(Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
                scope: Some("repository:library/python:pull,push".into()),
            })
        );
        assert_eq!(
            Challenge::parse(r#"Basic realm="x""#),
            Some(Challenge::Basic)
        );
        assert_eq!(Challenge::parse("Negotiate"), None);
    }

    #[test]
    fn auth_files_in_docker_format() {
        let file = br#"{"auths":{"https://index.docker.io/v1/":{"auth":"dXNlcjpwYXNz"},
            "127.0.0.1:5000":{"username":"a","password":"b:c"},"other":{}}}"#;
        let credentials = Credentials::parse(file).unwrap();
        assert_eq!(credentials.get("docker.io").unwrap().username, "user");
        assert_eq!(credentials.get("docker.io").unwrap().password, "pass");
        assert_eq!(credentials.get("127.0.0.1:5000").unwrap().password, "b:c");
        assert!(credentials.get("other").is_none());
        assert_eq!(
            format!("{:?}", credentials.get("docker.io").unwrap()),
            "Credential(user, <hidden>)"
        );
        assert!(Credentials::parse(br#"{"auths":{"x":{"auth":"!!"}}}"#).is_err());
    }
}
