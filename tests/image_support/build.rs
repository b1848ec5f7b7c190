//! Images built by the tests: layers as tar streams (with raw names when a test needs hostile
//! ones), configs, manifests in Docker schema 2 or OCI form, optionally behind an index.

use std::io::Write;

use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

/// `sha256:<hex>` of `bytes`.
pub fn sha256(bytes: &[u8]) -> String {
    let hash = Sha256::digest(bytes);
    format!(
        "sha256:{}",
        hash.iter().map(|b| format!("{b:02x}")).collect::<String>()
    )
}

/// The host's architecture as images name it.
pub fn arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// A layer: its tar, its blob (gzip unless built plain) and their digests.
#[derive(Clone)]
pub struct Layer {
    pub tar: Vec<u8>,
    pub blob: Vec<u8>,
    pub digest: String,
    pub diff_id: String,
    pub media_type: &'static str,
}

/// Builds a layer entry by entry.
pub struct LayerBuilder {
    tar: Vec<u8>,
}

impl Layer {
    pub fn builder() -> LayerBuilder {
        LayerBuilder { tar: Vec::new() }
    }
}

impl LayerBuilder {
    /// Appends an entry with `name` written verbatim into the header (so `..`, absolute names
    /// and whiteouts go in unchanged); names up to 100 bytes.
    pub fn entry(
        mut self,
        kind: tar::EntryType,
        name: &str,
        mode: u32,
        owner: (u64, u64),
        link: &str,
        data: &[u8],
    ) -> Self {
        let mut header = tar::Header::new_ustar();
        {
            let old = header.as_old_mut();
            assert!(name.len() <= 100 && link.len() <= 100);
            old.name[..name.len()].copy_from_slice(name.as_bytes());
            old.linkname[..link.len()].copy_from_slice(link.as_bytes());
        }
        header.set_entry_type(kind);
        header.set_mode(mode);
        header.set_uid(owner.0);
        header.set_gid(owner.1);
        header.set_mtime(1_700_000_000);
        header.set_size(data.len() as u64);
        header.set_cksum();
        self.tar.extend_from_slice(header.as_bytes());
        self.tar.extend_from_slice(data);
        let pad = (512 - data.len() % 512) % 512;
        self.tar.extend(std::iter::repeat_n(0, pad));
        self
    }

    pub fn dir(self, name: &str, mode: u32) -> Self {
        self.entry(tar::EntryType::Directory, name, mode, (0, 0), "", b"")
    }

    pub fn file(self, name: &str, data: &[u8]) -> Self {
        self.entry(tar::EntryType::Regular, name, 0o644, (0, 0), "", data)
    }

    pub fn file_owned(self, name: &str, data: &[u8], mode: u32, owner: (u64, u64)) -> Self {
        self.entry(tar::EntryType::Regular, name, mode, owner, "", data)
    }

    pub fn symlink(self, name: &str, target: &str) -> Self {
        self.entry(tar::EntryType::Symlink, name, 0o777, (0, 0), target, b"")
    }

    pub fn hardlink(self, name: &str, target: &str) -> Self {
        self.entry(tar::EntryType::Link, name, 0o644, (0, 0), target, b"")
    }

    /// Raw bytes appended as they are (for crafted headers).
    pub fn raw(mut self, bytes: &[u8]) -> Self {
        self.tar.extend_from_slice(bytes);
        self
    }

    fn finish_tar(mut self) -> Vec<u8> {
        self.tar.extend(std::iter::repeat_n(0, 1024));
        self.tar
    }

    /// A gzip-compressed layer.
    pub fn gzip(self) -> Layer {
        let tar = self.finish_tar();
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        encoder.write_all(&tar).unwrap();
        let blob = encoder.finish().unwrap();
        Layer {
            digest: sha256(&blob),
            diff_id: sha256(&tar),
            tar,
            blob,
            media_type: "application/vnd.docker.image.rootfs.diff.tar.gzip",
        }
    }

    /// An uncompressed layer.
    pub fn plain(self) -> Layer {
        let tar = self.finish_tar();
        Layer {
            digest: sha256(&tar),
            diff_id: sha256(&tar),
            blob: tar.clone(),
            tar,
            media_type: "application/vnd.oci.image.layer.v1.tar",
        }
    }
}

/// A tiny root file system: static busybox with a few applet links, `/etc/passwd` with `user`
/// at uid 1001, `/workspace` (1777) and a marker file.
pub fn busybox_layer() -> Layer {
    let busybox = std::fs::read("/bin/busybox").expect("busybox-static must be installed");
    let mut layer =
        Layer::builder()
            .dir("bin/", 0o755)
            .file_owned("bin/busybox", &busybox, 0o755, (0, 0));
    for applet in [
        "sh", "id", "cat", "ls", "env", "echo", "stat", "touch", "pwd", "sleep",
    ] {
        layer = layer.symlink(&format!("bin/{applet}"), "busybox");
    }
    layer
        .dir("etc/", 0o755)
        .file(
            "etc/passwd",
            b"root:x:0:0:root:/root:/bin/sh\nuser:x:1001:1001::/workspace:/bin/sh\n",
        )
        .file("etc/group", b"root:x:0:\nuser:x:1001:\n")
        .dir("workspace/", 0o1777)
        .dir("tmp/", 0o1777)
        .file("etc/image-marker", b"from the registry\n")
        .gzip()
}

/// An image: config and manifest over layers.
#[derive(Clone)]
pub struct Image {
    pub layers: Vec<Layer>,
    pub config: Vec<u8>,
    pub config_digest: String,
    pub manifest: Vec<u8>,
    pub manifest_digest: String,
    pub oci: bool,
    /// An index (manifest list) over this manifest and one for another architecture.
    pub index: Option<(Vec<u8>, String, Vec<u8>, String)>,
    /// Blobs besides the config and layers (the other platform's config).
    pub extra_blobs: Vec<(String, Vec<u8>)>,
}

impl Image {
    /// A Docker schema 2 image with `env` in its config.
    pub fn new(layers: Vec<Layer>, env: &[&str]) -> Image {
        Image::build(layers, env, false, arch())
    }

    /// The same as an OCI image.
    pub fn oci(layers: Vec<Layer>, env: &[&str]) -> Image {
        Image::build(layers, env, true, arch())
    }

    fn build(layers: Vec<Layer>, env: &[&str], oci: bool, architecture: &str) -> Image {
        let config = serde_json::to_vec(&json!({
            "architecture": architecture,
            "os": "linux",
            "config": {"Env": env, "WorkingDir": "/workspace", "Cmd": ["/bin/sh"]},
            "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>()},
        }))
        .unwrap();
        let config_digest = sha256(&config);
        let (manifest_type, config_type) = if oci {
            (
                "application/vnd.oci.image.manifest.v1+json",
                "application/vnd.oci.image.config.v1+json",
            )
        } else {
            (
                "application/vnd.docker.distribution.manifest.v2+json",
                "application/vnd.docker.container.image.v1+json",
            )
        };
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": manifest_type,
            "config": {"mediaType": config_type, "digest": config_digest, "size": config.len()},
            "layers": layers.iter().map(|l| json!({"mediaType": if oci { "application/vnd.oci.image.layer.v1.tar+gzip" } else { l.media_type }, "digest": l.digest, "size": l.blob.len()})).collect::<Vec<Value>>(),
        }))
        .unwrap();
        Image {
            manifest_digest: sha256(&manifest),
            manifest,
            config_digest,
            config,
            layers,
            oci,
            index: None,
            extra_blobs: Vec::new(),
        }
    }

    /// Wraps the image in a multi-platform index whose other entry is an s390x image.
    pub fn with_index(mut self) -> Image {
        let other = Image::build(self.layers.clone(), &[], self.oci, "s390x");
        let entry = |image: &Image, arch: &str| {
            json!({"mediaType": if image.oci { "application/vnd.oci.image.manifest.v1+json" } else { "application/vnd.docker.distribution.manifest.v2+json" },
                   "digest": image.manifest_digest, "size": image.manifest.len(),
                   "platform": {"architecture": arch, "os": "linux"}})
        };
        let index = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": if self.oci { "application/vnd.oci.image.index.v1+json" } else { "application/vnd.docker.distribution.manifest.list.v2+json" },
            "manifests": [entry(&other, "s390x"), entry(&self, arch())],
        }))
        .unwrap();
        self.index = Some((
            other.manifest.clone(),
            other.manifest_digest.clone(),
            index.clone(),
            sha256(&index),
        ));
        // The other platform's config must be in the registry too.
        self.extra_blobs.push((other.config_digest, other.config));
        self
    }

    fn manifest_type(&self) -> &'static str {
        if self.oci {
            "application/vnd.oci.image.manifest.v1+json"
        } else {
            "application/vnd.docker.distribution.manifest.v2+json"
        }
    }

    /// The manifest documents to put, in order: (reference, bytes, media type).
    pub fn documents(&self, tag: &str) -> Vec<(String, Vec<u8>, &'static str)> {
        match &self.index {
            None => vec![(tag.to_owned(), self.manifest.clone(), self.manifest_type())],
            Some((other, other_digest, index, _)) => vec![
                (other_digest.clone(), other.clone(), self.manifest_type()),
                (
                    self.manifest_digest.clone(),
                    self.manifest.clone(),
                    self.manifest_type(),
                ),
                (
                    tag.to_owned(),
                    index.clone(),
                    if self.oci {
                        "application/vnd.oci.image.index.v1+json"
                    } else {
                        "application/vnd.docker.distribution.manifest.list.v2+json"
                    },
                ),
            ],
        }
    }
}
