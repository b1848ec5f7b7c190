//! A client for the registry HTTP API v2 (OCI distribution): manifests by tag or digest, blobs
//! by digest (following redirects), token challenges, mirrors for Docker Hub names, retries of
//! transient failures. TLS is rustls with the system's root certificates (plus `ca_file`).

pub mod auth;
mod tls;

use std::{
    collections::HashMap, io::Read, net::IpAddr, path::PathBuf, sync::Mutex, thread, time::Duration,
};

use ureq::{Agent, tls::TlsConfig};

use self::auth::{Challenge, Credentials, token_from};
use super::{
    digest::Digest,
    manifest::{ACCEPT, MAX_DOCUMENT},
    reference::{DOCKER_HUB_API, Reference},
};
use crate::error::{Error, Result};

/// How to reach registries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegistryConfig {
    /// Base URLs tried first for Docker Hub names (`https://mirror.example`, `http://127.0.0.1:5000`).
    pub mirrors: Vec<String>,
    /// Registries (`host[:port]`) reached over plain HTTP.
    pub insecure: Vec<String>,
    /// Extra PEM certificates trusted besides the system's.
    pub ca_file: Option<PathBuf>,
    /// A Docker `config.json` with credentials.
    pub auth_file: Option<PathBuf>,
}

const ATTEMPTS: u32 = 4;

/// One place a repository can be fetched from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// `https://registry-1.docker.io`, `http://127.0.0.1:5000`, a mirror's base URL.
    pub base: String,
    /// The registry name credentials are looked up under.
    pub registry: String,
    /// The repository path.
    pub repository: String,
}

impl Endpoint {
    fn url(&self, kind: &str, reference: &str) -> String {
        format!(
            "{}/v2/{}/{kind}/{reference}",
            self.base.trim_end_matches('/'),
            self.repository
        )
    }
}

/// The registry client (one per server; cheap to share).
#[derive(Debug)]
pub struct Client {
    agent: Agent,
    config: RegistryConfig,
    credentials: Credentials,
    /// Bearer tokens per (registry, repository).
    tokens: Mutex<HashMap<(String, String), String>>,
}

/// A fetched manifest document.
#[derive(Debug)]
pub struct Fetched {
    /// The bytes (at most 4 MiB).
    pub bytes: Vec<u8>,
    /// The `Content-Type` header.
    pub content_type: Option<String>,
    /// Where it came from (blobs are fetched from the same place).
    pub endpoint: Endpoint,
}

enum Attempt<T> {
    Done(T),
    Retry(Error),
}

impl Client {
    /// A client with the configured trust roots and credentials.
    pub fn new(config: &RegistryConfig) -> Result<Client> {
        let credentials = match &config.auth_file {
            Some(path) => Credentials::load(path)?,
            None => Credentials::default(),
        };
        let tls = TlsConfig::builder()
            .root_certs(tls::roots(config.ca_file.as_deref())?)
            .build();
        let agent = Agent::config_builder()
            .http_status_as_error(false)
            .tls_config(tls)
            .max_redirects(5)
            .timeout_connect(Some(Duration::from_secs(10)))
            .timeout_recv_response(Some(Duration::from_secs(30)))
            .timeout_per_read(Some(Duration::from_secs(60)))
            .user_agent("poseidon-lite")
            .build()
            .into();
        Ok(Client {
            agent,
            config: config.clone(),
            credentials,
            tokens: Mutex::new(HashMap::new()),
        })
    }

    /// Where `reference` can be fetched from, in order: mirrors for Docker Hub names, then the
    /// registry itself.
    pub fn endpoints(&self, reference: &Reference) -> Vec<Endpoint> {
        let mut out = Vec::new();
        if reference.is_docker_hub() {
            for mirror in &self.config.mirrors {
                let host = host_of(mirror);
                out.push(Endpoint {
                    base: mirror.clone(),
                    registry: host,
                    repository: reference.repository.clone(),
                });
            }
        }
        let host = if reference.is_docker_hub() {
            DOCKER_HUB_API
        } else {
            reference.registry.as_str()
        };
        let scheme = if self.plain_http(host) {
            "http"
        } else {
            "https"
        };
        out.push(Endpoint {
            base: format!("{scheme}://{host}"),
            registry: reference.registry.clone(),
            repository: reference.repository.clone(),
        });
        out
    }

    /// Loopback registries and those listed insecure speak plain HTTP (as Docker allows).
    fn plain_http(&self, host: &str) -> bool {
        if self.config.insecure.iter().any(|h| h == host) {
            return true;
        }
        let name = match host.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
            _ => host,
        };
        let name = name.trim_start_matches('[').trim_end_matches(']');
        name == "localhost" || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
    }

    /// Fetches the manifest `what` (a tag or digest) of `reference`, trying each endpoint.
    pub fn manifest(&self, reference: &Reference, what: &str) -> Result<Fetched> {
        let mut last = None;
        for endpoint in self.endpoints(reference) {
            match self.get(&endpoint, &endpoint.url("manifests", what), Some(ACCEPT)) {
                Ok(response) => {
                    let content_type = response
                        .headers()
                        .get("content-type")
                        .and_then(|v| v.to_str().ok())
                        .map(|v| v.split(';').next().unwrap_or(v).trim().to_owned());
                    let bytes = read_capped(response, MAX_DOCUMENT, "manifest")?;
                    return Ok(Fetched {
                        bytes,
                        content_type,
                        endpoint,
                    });
                }
                Err(e) => {
                    log::warn!("{}: {e}", endpoint.base);
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| Error::Registry(format!("no endpoint for {reference}"))))
    }

    /// Opens the blob `digest` of the repository at `endpoint` as a stream.
    pub fn blob(&self, endpoint: &Endpoint, digest: &Digest) -> Result<impl Read + Send + use<>> {
        let response = self.get(endpoint, &endpoint.url("blobs", digest.as_str()), None)?;
        Ok(response.into_body().into_reader())
    }

    /// GET with authentication and retries of transient failures.
    fn get(
        &self,
        endpoint: &Endpoint,
        url: &str,
        accept: Option<&str>,
    ) -> Result<ureq::http::Response<ureq::Body>> {
        let mut delay = Duration::from_millis(250);
        let mut attempt = 1;
        loop {
            match self.get_once(endpoint, url, accept) {
                Ok(Attempt::Done(response)) => return Ok(response),
                Ok(Attempt::Retry(e)) | Err(e @ Error::Registry(_)) if attempt < ATTEMPTS => {
                    log::info!("{url}: {e}; retrying");
                    thread::sleep(delay);
                    delay *= 2;
                    attempt += 1;
                }
                Ok(Attempt::Retry(e)) | Err(e) => return Err(e),
            }
        }
    }

    fn get_once(
        &self,
        endpoint: &Endpoint,
        url: &str,
        accept: Option<&str>,
    ) -> Result<Attempt<ureq::http::Response<ureq::Body>>> {
        let key = (endpoint.base.clone(), endpoint.repository.clone());
        let mut authorization = self.tokens.lock().unwrap().get(&key).cloned();
        for round in 0..2 {
            let mut request = self.agent.get(url);
            if let Some(accept) = accept {
                request = request.header("Accept", accept);
            }
            if let Some(value) = &authorization {
                request = request.header("Authorization", value);
            }
            let response = request.call().map_err(|e| unreachable(endpoint, &e))?;
            let status = response.status().as_u16();
            match status {
                200..=299 => return Ok(Attempt::Done(response)),
                401 if round == 0 => {
                    let challenge = response
                        .headers()
                        .get("www-authenticate")
                        .and_then(|v| v.to_str().ok())
                        .and_then(Challenge::parse);
                    let Some(challenge) = challenge else {
                        return Err(Error::Image(format!(
                            "{url}: access denied (no usable challenge)"
                        )));
                    };
                    let value = self.answer(endpoint, challenge)?;
                    self.tokens
                        .lock()
                        .unwrap()
                        .insert(key.clone(), value.clone());
                    authorization = Some(value);
                }
                401 | 403 => {
                    return Err(Error::Image(format!(
                        "access to {} on {} denied (the image does not exist or needs credentials)",
                        endpoint.repository, endpoint.registry
                    )));
                }
                404 => {
                    let body = read_capped(response, 64 * 1024, "error").unwrap_or_default();
                    return Err(Error::Image(format!(
                        "not found on {}: {} ({})",
                        endpoint.base,
                        url.rsplit_once("/v2/").map_or(url, |(_, p)| p),
                        registry_error(&body).unwrap_or_else(|| "404".into())
                    )));
                }
                408 | 429 | 500..=599 => {
                    return Ok(Attempt::Retry(Error::Registry(format!(
                        "{} answered {status}",
                        endpoint.base
                    ))));
                }
                other => {
                    return Err(Error::Registry(format!(
                        "{} answered {other} for {url}",
                        endpoint.base
                    )));
                }
            }
        }
        Err(Error::Image(format!("{url}: access denied")))
    }

    /// The `Authorization` value that answers `challenge`.
    fn answer(&self, endpoint: &Endpoint, challenge: Challenge) -> Result<String> {
        let credential = self.credentials.get(&endpoint.registry);
        let (realm, service, scope) = match challenge {
            Challenge::Basic => {
                return credential.map(auth::Credential::basic).ok_or_else(|| {
                    Error::Image(format!(
                        "{} needs credentials (none in the auth file)",
                        endpoint.registry
                    ))
                });
            }
            Challenge::Bearer {
                realm,
                service,
                scope,
            } => (realm, service, scope),
        };
        let scope = scope.unwrap_or_else(|| format!("repository:{}:pull", endpoint.repository));
        let mut request = self.agent.get(&realm).query("scope", &scope);
        if let Some(service) = &service {
            request = request.query("service", service);
        }
        if let Some(credential) = credential {
            request = request.header("Authorization", credential.basic());
        }
        let response = request.call().map_err(|e| {
            Error::Registry(format!("token endpoint {realm} cannot be reached: {e}"))
        })?;
        if !response.status().is_success() {
            return Err(Error::Image(format!(
                "token endpoint {realm} refused access to {} ({})",
                endpoint.repository,
                response.status()
            )));
        }
        let body = read_capped(response, 1 << 20, "token")?;
        let token = token_from(&body)
            .ok_or_else(|| Error::Registry(format!("token endpoint {realm} sent no token")))?;
        Ok(format!("Bearer {token}"))
    }
}

fn unreachable(endpoint: &Endpoint, e: &ureq::Error) -> Error {
    Error::Registry(format!("registry {} cannot be reached: {e}", endpoint.base))
}

fn read_capped(
    response: ureq::http::Response<ureq::Body>,
    max: u64,
    what: &str,
) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    response
        .into_body()
        .into_reader()
        .take(max + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::Registry(format!("reading the {what}: {e}")))?;
    if bytes.len() as u64 > max {
        return Err(Error::Image(format!("{what} exceeds {max} bytes")));
    }
    Ok(bytes)
}

/// The first message of a registry's `{"errors":[{"code","message"}]}` body.
fn registry_error(body: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    let first = value.get("errors")?.get(0)?;
    let code = first.get("code").and_then(|c| c.as_str()).unwrap_or("");
    let message = first.get("message").and_then(|m| m.as_str()).unwrap_or("");
    Some(format!("{code}: {message}"))
}

fn host_of(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    rest.split('/').next().unwrap_or(rest).to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_and_listed_registries_use_http_and_mirrors_come_first() {
        let client = Client::new(&RegistryConfig {
            mirrors: vec!["http://127.0.0.1:9/".into()],
            insecure: vec!["registry.lan:5000".into()],
            ..RegistryConfig::default()
        })
        .unwrap();
        let bases = |name: &str| {
            client
                .endpoints(&Reference::parse(name).unwrap())
                .into_iter()
                .map(|e| e.base)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            bases("python:3"),
            ["http://127.0.0.1:9/", "https://registry-1.docker.io"]
        );
        assert_eq!(bases("localhost:5000/x"), ["http://localhost:5000"]);
        assert_eq!(bases("127.0.0.1:5000/x"), ["http://127.0.0.1:5000"]);
        assert_eq!(bases("[::1]:5000/x"), ["http://[::1]:5000"]);
        assert_eq!(bases("registry.lan:5000/x"), ["http://registry.lan:5000"]);
        assert_eq!(bases("ghcr.io/x/y"), ["https://ghcr.io"]);
    }
}
