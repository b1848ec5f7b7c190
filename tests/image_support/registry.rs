//! A real registry (the CNCF distribution registry from Debian's `docker-registry` package)
//! as a child process on a loopback port with temporary storage; killed when dropped.

use std::{
    net::TcpListener,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use super::{Image, agent};

/// A running registry.
pub struct Registry {
    child: Child,
    /// `127.0.0.1:<port>`.
    pub host: String,
    _dir: tempfile::TempDir,
    tls: bool,
}

impl Registry {
    /// Starts a registry; panics with the reason if it does not answer within 20 s.
    pub fn start() -> Registry {
        Self::start_with(None)
    }

    /// Starts a registry serving HTTPS with a certificate for 127.0.0.1 made by `openssl`;
    /// returns it and the PEM file of the CA that signed the certificate.
    pub fn start_tls() -> (Registry, std::path::PathBuf) {
        let registry = Self::start_with(Some(()));
        let cert = registry._dir.path().join("ca.pem");
        (registry, cert)
    }

    fn start_with(tls: Option<()>) -> Registry {
        let dir = tempfile::tempdir().unwrap();
        let mut tls_config = String::new();
        if tls.is_some() {
            // A CA and a server certificate for 127.0.0.1 signed by it (webpki accepts no
            // self-signed server certificate as its own root).
            let path = |name: &str| dir.path().join(name);
            let ext = path("ext.cnf");
            std::fs::write(&ext, "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n").unwrap();
            let openssl = |args: &[&std::ffi::OsStr]| {
                let status = Command::new("openssl")
                    .args(args)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .expect("openssl must be installed");
                assert!(status.success(), "openssl {args:?} failed");
            };
            let os = |s: &'static str| std::ffi::OsStr::new(s);
            let ec = [
                os("-newkey"),
                os("ec"),
                os("-pkeyopt"),
                os("ec_paramgen_curve:prime256v1"),
                os("-nodes"),
            ];
            let mut ca = vec![
                os("req"),
                os("-x509"),
                os("-days"),
                os("1"),
                os("-subj"),
                os("/CN=poseidon-lite test CA"),
            ];
            ca.extend(ec);
            let (ca_key, ca_pem, key, csr, cert) = (
                path("ca.key"),
                path("ca.pem"),
                path("key.pem"),
                path("server.csr"),
                path("server.pem"),
            );
            ca.extend([
                os("-keyout"),
                ca_key.as_os_str(),
                os("-out"),
                ca_pem.as_os_str(),
            ]);
            openssl(&ca);
            let mut req = vec![os("req"), os("-subj"), os("/CN=127.0.0.1")];
            req.extend(ec);
            req.extend([os("-keyout"), key.as_os_str(), os("-out"), csr.as_os_str()]);
            openssl(&req);
            openssl(&[
                os("x509"),
                os("-req"),
                os("-days"),
                os("1"),
                os("-in"),
                csr.as_os_str(),
                os("-CA"),
                ca_pem.as_os_str(),
                os("-CAkey"),
                ca_key.as_os_str(),
                os("-CAcreateserial"),
                os("-extfile"),
                ext.as_os_str(),
                os("-out"),
                cert.as_os_str(),
            ]);
            tls_config = format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                cert.display(),
                key.display()
            );
        }
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let host = format!("127.0.0.1:{port}");
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {host}\n{tls_config}",
                dir.path().join("storage").display()
            ),
        )
        .unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("docker-registry (Debian package docker-registry) must be installed");
        let mut registry = Registry {
            child,
            host,
            _dir: dir,
            tls: tls.is_some(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        let agent = agent();
        loop {
            let answer = agent.get(&format!("{}/v2/", registry.url())).call();
            if answer.is_ok_and(|response| response.status() == 200) {
                return registry;
            }
            if let Ok(Some(status)) = registry.child.try_wait() {
                panic!("docker-registry exited: {status}");
            }
            assert!(Instant::now() < deadline, "docker-registry did not answer");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `http://127.0.0.1:<port>` (`https://` with TLS).
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.host)
    }

    /// Pushes `image` as `repository:tag`; returns the manifest digest.
    pub fn push(&self, repository: &str, tag: &str, image: &Image) -> String {
        push_to(&self.url(), repository, tag, image)
    }
}

/// Pushes through the registry API: blobs by monolithic upload, then the manifest.
pub fn push_to(base: &str, repository: &str, tag: &str, image: &Image) -> String {
    let agent = agent();
    let mut blobs: Vec<(&str, &[u8])> = vec![(&image.config_digest, &image.config)];
    for layer in &image.layers {
        blobs.push((&layer.digest, &layer.blob));
    }
    for (digest, bytes) in &image.extra_blobs {
        blobs.push((digest, bytes));
    }
    for (digest, bytes) in blobs {
        let start = agent
            .post(&format!("{base}/v2/{repository}/blobs/uploads/"))
            .send_empty()
            .unwrap();
        assert_eq!(start.status(), 202, "starting an upload");
        let location = start
            .headers()
            .get("location")
            .unwrap()
            .to_str()
            .unwrap()
            .to_owned();
        let location = if location.starts_with("http") {
            location
        } else {
            format!("{base}{location}")
        };
        let separator = if location.contains('?') { '&' } else { '?' };
        let put = agent
            .put(&format!("{location}{separator}digest={digest}"))
            .header("Content-Type", "application/octet-stream")
            .send(bytes)
            .unwrap();
        assert_eq!(put.status(), 201, "uploading {digest}");
    }
    for (reference, bytes, media_type) in image.documents(tag) {
        let put = agent
            .put(&format!("{base}/v2/{repository}/manifests/{reference}"))
            .header("Content-Type", media_type)
            .send(&bytes[..])
            .unwrap();
        assert_eq!(put.status(), 201, "putting manifest {reference}");
    }
    image.manifest_digest.clone()
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}
