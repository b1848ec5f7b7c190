//! Images: the time to pull and unpack an image from a local registry (Debian's
//! `docker-registry` on loopback) with `poseidon-lite image pull`, beside a same-run `tar -xzf`
//! of the same layer blobs; and the prewarm cost per runner of that image from the store beside
//! the same tree as an images_dir directory and the built-in host image.

use std::{
    io::Write,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

use super::{client::Client, server::ServerProcess};

/// Runners per prewarm measurement.
const POOL: u32 = 30;

/// The figures of this section.
#[derive(Debug, Clone)]
pub struct ImageFigures {
    /// Compressed and uncompressed bytes, and files, of the image.
    pub compressed: u64,
    pub uncompressed: u64,
    pub files: u64,
    /// `poseidon-lite image pull` from the local registry, seconds.
    pub pull_s: f64,
    /// `tar -xzf` of the same blobs, seconds.
    pub tar_s: f64,
    /// Prewarm milliseconds per runner: store image, directory image, host image.
    pub prewarm_ms: Vec<(&'static str, f64)>,
}

impl ImageFigures {
    /// The section of the table.
    pub fn show(&self) -> String {
        let mut out = format!(
            "\nimages (image of {:.0} MB compressed, {:.0} MB / {} files unpacked)\n",
            self.compressed as f64 / 1e6,
            self.uncompressed as f64 / 1e6,
            self.files
        );
        out += &format!(
            "  pull + unpack (image pull, local registry)   {:>8.2} s\n",
            self.pull_s
        );
        out += &format!(
            "  baseline: tar -xzf of the same layers        {:>8.2} s\n",
            self.tar_s
        );
        for (what, ms) in &self.prewarm_ms {
            out += &format!("  prewarm per runner, {what:<24} {ms:>8.1} ms\n");
        }
        out
    }

    /// The figures as JSON.
    pub fn to_json(&self) -> Value {
        let prewarm: serde_json::Map<String, Value> = self
            .prewarm_ms
            .iter()
            .map(|(k, v)| ((*k).to_owned(), json!(v)))
            .collect();
        json!({"compressed_bytes": self.compressed, "uncompressed_bytes": self.uncompressed,
               "files": self.files, "pull_unpack_s": self.pull_s, "tar_xzf_s": self.tar_s,
               "prewarm_ms_per_runner": prewarm})
    }
}

/// Why the section was skipped, or its figures.
pub fn measure(
    binary: &Path,
    sandbox_args: &dyn Fn(&Path) -> Vec<String>,
) -> Result<ImageFigures, String> {
    if !rustix::process::geteuid().is_root() {
        return Err("not measured: needs root".into());
    }
    if Command::new("docker-registry")
        .arg("--version")
        .output()
        .is_err()
    {
        return Err("not measured: docker-registry is not installed".into());
    }
    let work = tempfile::tempdir().map_err(|e| e.to_string())?;
    eprintln!("[images] building an image (busybox, python3.11, perl)");
    let layers = vec![
        layer(&[("bin/busybox", Path::new("/bin/busybox"))])?,
        layer(&[("usr/lib/python3.11", Path::new("/usr/lib/python3.11"))])?,
        layer(&[("usr/share/perl", Path::new("/usr/share/perl"))])?,
    ];
    let registry = Registry::start(work.path())?;
    let name = format!("{}/bench/image:1", registry.host);
    registry.push("bench/image", "1", &layers)?;

    // The baseline: tar -xzf of the same blobs, from files.
    let mut tar_s = 0.0;
    let target = work.path().join("tar");
    std::fs::create_dir(&target).map_err(|e| e.to_string())?;
    for (i, layer) in layers.iter().enumerate() {
        let file = work.path().join(format!("layer-{i}.tar.gz"));
        std::fs::write(&file, &layer.blob).map_err(|e| e.to_string())?;
        let started = Instant::now();
        let status = Command::new("tar")
            .arg("-xzf")
            .arg(&file)
            .arg("-C")
            .arg(&target)
            .status()
            .map_err(|e| e.to_string())?;
        tar_s += started.elapsed().as_secs_f64();
        if !status.success() {
            return Err(format!("tar -xzf failed: {status}"));
        }
    }

    let state = work.path().join("state");
    eprintln!("[images] poseidon-lite image pull {name}");
    let started = Instant::now();
    let output = Command::new(binary)
        .args(["image", "pull", &name, "--state-dir"])
        .arg(&state)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| e.to_string())?;
    let pull_s = started.elapsed().as_secs_f64();
    if !output.status.success() {
        return Err(format!(
            "image pull failed: {}",
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    let rootfs = single_dir(&state.join("images/rootfs"))?;

    eprintln!("[images] prewarming {POOL} runners per image kind");
    let mut args = sandbox_args(&state);
    args.extend(["--images-dir".to_owned(), rootfs.display().to_string()]);
    let mut server = ServerProcess::start(binary, &args).map_err(|e| format!("{e:?}"))?;
    let client = Client::new(&server.api, server.websocket);
    let mut prewarm_ms = Vec::new();
    for (id, (what, image)) in [
        ("store image", name.as_str()),
        ("images_dir directory", "root"),
        ("host image", "host"),
    ]
    .into_iter()
    .enumerate()
    {
        let id = id as u32 + 1;
        prewarm_ms.push((
            what,
            prewarm(&client, id, image)? * 1000.0 / f64::from(POOL),
        ));
        client.delete_environment(id)?;
        server.check_alive()?;
    }
    server.stop()?;
    Ok(ImageFigures {
        compressed: layers.iter().map(|l| l.blob.len() as u64).sum(),
        uncompressed: layers.iter().map(|l| l.tar.len() as u64).sum(),
        files: layers.iter().map(|l| l.files).sum(),
        pull_s,
        tar_s,
        prewarm_ms,
    })
}

/// Seconds from the PUT of an environment with a pool of [`POOL`] until the pool is full.
fn prewarm(client: &Client, id: u32, image: &str) -> Result<f64, String> {
    let body = json!({"id": id, "image": image, "prewarmingPoolSize": POOL, "cpuLimit": 20,
        "memoryLimit": 256, "networkAccess": false, "exposedPorts": []});
    let started = Instant::now();
    client.expect(
        "PUT",
        &format!("/execution-environments/{id}"),
        body.to_string().as_bytes(),
        &[201, 204],
    )?;
    let deadline = started + Duration::from_secs(300);
    while client.idle(id)? < u64::from(POOL) {
        if Instant::now() > deadline {
            return Err(format!("the pool of {image} did not fill"));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(started.elapsed().as_secs_f64())
}

fn single_dir(dir: &Path) -> Result<PathBuf, String> {
    let entry = std::fs::read_dir(dir)
        .map_err(|e| e.to_string())?
        .flatten()
        .next()
        .ok_or("no image was stored")?;
    Ok(entry.path())
}

struct Layer {
    tar: Vec<u8>,
    blob: Vec<u8>,
    files: u64,
}

fn sha256(bytes: &[u8]) -> String {
    format!(
        "sha256:{}",
        Sha256::digest(bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    )
}

/// A gzip layer of host files and directories under the given names.
fn layer(contents: &[(&str, &Path)]) -> Result<Layer, String> {
    let mut builder = tar::Builder::new(Vec::new());
    builder.follow_symlinks(false);
    for (name, path) in contents {
        if path.is_dir() {
            builder
                .append_dir_all(name, path)
                .map_err(|e| e.to_string())?;
        } else {
            builder
                .append_path_with_name(path, name)
                .map_err(|e| e.to_string())?;
        }
    }
    let tar = builder.into_inner().map_err(|e| e.to_string())?;
    let files = tar::Archive::new(&tar[..])
        .entries()
        .map_err(|e| e.to_string())?
        .count() as u64;
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(&tar).map_err(|e| e.to_string())?;
    let blob = encoder.finish().map_err(|e| e.to_string())?;
    Ok(Layer { tar, blob, files })
}

struct Registry {
    child: Child,
    host: String,
}

impl Registry {
    fn start(work: &Path) -> Result<Registry, String> {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| e.to_string())?
            .port();
        let host = format!("127.0.0.1:{port}");
        let config = work.join("registry.yml");
        let yaml = format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {host}\n",
            work.join("registry").display()
        );
        std::fs::write(&config, yaml).map_err(|e| e.to_string())?;
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| e.to_string())?;
        let registry = Registry { child, host };
        let deadline = Instant::now() + Duration::from_secs(20);
        while agent()
            .get(&format!("http://{}/v2/", registry.host))
            .call()
            .map_or(true, |r| r.status() != 200)
        {
            if Instant::now() > deadline {
                return Err("docker-registry did not answer".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(registry)
    }

    fn push(&self, repository: &str, tag: &str, layers: &[Layer]) -> Result<(), String> {
        let base = format!("http://{}", self.host);
        let diff_ids: Vec<String> = layers.iter().map(|l| sha256(&l.tar)).collect();
        let config = serde_json::to_vec(&json!({"architecture": arch(), "os": "linux",
            "config": {"Env": ["PATH=/bin:/usr/bin"]}, "rootfs": {"type": "layers", "diff_ids": diff_ids}}))
        .map_err(|e| e.to_string())?;
        let mut blobs: Vec<&[u8]> = vec![&config];
        blobs.extend(layers.iter().map(|l| &l.blob[..]));
        let agent = agent();
        for bytes in blobs {
            let start = agent
                .post(&format!("{base}/v2/{repository}/blobs/uploads/"))
                .send_empty()
                .map_err(|e| e.to_string())?;
            let location = start
                .headers()
                .get("location")
                .and_then(|v| v.to_str().ok())
                .ok_or("no upload location")?
                .to_owned();
            let location = if location.starts_with("http") {
                location
            } else {
                format!("{base}{location}")
            };
            let separator = if location.contains('?') { '&' } else { '?' };
            let put = agent
                .put(&format!("{location}{separator}digest={}", sha256(bytes)))
                .send(bytes)
                .map_err(|e| e.to_string())?;
            if put.status() != 201 {
                return Err(format!("blob upload answered {}", put.status()));
            }
        }
        let manifest = json!({"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
            "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": sha256(&config), "size": config.len()},
            "layers": layers.iter().map(|l| json!({"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
                "digest": sha256(&l.blob), "size": l.blob.len()})).collect::<Vec<_>>()});
        let put = agent
            .put(&format!("{base}/v2/{repository}/manifests/{tag}"))
            .header(
                "Content-Type",
                "application/vnd.docker.distribution.manifest.v2+json",
            )
            .send(manifest.to_string().as_bytes())
            .map_err(|e| e.to_string())?;
        if put.status() != 201 {
            return Err(format!("manifest upload answered {}", put.status()));
        }
        Ok(())
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(60)))
        .proxy(None)
        .build()
        .into()
}

fn arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}
