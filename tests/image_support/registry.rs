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
}

impl Registry {
    /// Starts a registry; panics with the reason if it does not answer within 20 s.
    pub fn start() -> Registry {
        let dir = tempfile::tempdir().unwrap();
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
                "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {host}\n",
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

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.host)
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
