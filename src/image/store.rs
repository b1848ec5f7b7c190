//! The image store under the state directory (root only, 0700):
//!
//! ```text
//! images/lock                 flock held while refs.json or rootfs/ change
//! images/refs.json            {"<full name>": {"image": "<config digest>", "manifest": "<digest>"}}
//! images/blobs/sha256/<hex>   manifests and configs, content-addressed
//! images/rootfs/<hex>/root    the unpacked image (owners as in the image), never written again
//! images/rootfs/<hex>/image.json
//! images/tmp/<pid>-<n>/       staging; nothing is visible until it is renamed into rootfs/
//! ```
//!
//! An image is identified by its config digest and unpacked once, however many names and
//! environments use it. The server and the `image` commands may use the store at the same time.

use std::{
    collections::BTreeMap,
    fs::{self, File},
    io::{self, Read, Write},
    os::unix::fs::{DirBuilderExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
};

use rustix::fs::{FlockOperation, flock};
use serde::{Deserialize, Serialize};

use super::{
    digest::{Digest, verify},
    manifest::{Descriptor, ImageConfig, Manifest},
    passwd::User,
    unpack::Limits,
};
use crate::error::{Error, Result};

/// What a stored image offers a runner (kept in `image.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredImage {
    /// The image id: its config digest.
    pub id: Digest,
    /// The manifest it was installed from.
    pub manifest: Digest,
    /// The image's `Env`, in order.
    pub env: Vec<String>,
    /// The image's `WorkingDir` (may be empty).
    pub working_dir: String,
    /// The unprivileged user (`user` from the image's passwd), if it has one.
    pub user: Option<User>,
    /// Uncompressed bytes of all layers.
    pub size: u64,
    /// Number of layers.
    pub layers: usize,
    /// When it was installed (seconds since the epoch).
    pub installed: u64,
}

/// A name in the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefEntry {
    /// The image id (config digest).
    pub image: Digest,
    /// The manifest digest the name resolved to.
    pub manifest: Digest,
}

/// The image an environment runs on, kept across restarts (`environments.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pin {
    /// The full image name the environment gave.
    pub name: String,
    /// The image id.
    pub image: Digest,
    /// The manifest digest.
    pub manifest: Digest,
}

/// A layer download or unpack step, for progress display.
#[derive(Debug, Clone)]
pub struct Progress {
    /// 1-based layer number.
    pub layer: usize,
    /// Number of layers.
    pub layers: usize,
    /// The layer's blob digest.
    pub digest: Digest,
    /// Bytes of the blob received so far.
    pub received: u64,
    /// The blob's size.
    pub size: u64,
    /// Whether the layer is unpacked.
    pub unpacked: bool,
}

/// Opens a blob by descriptor: from a registry, an image layout or an archive.
pub trait BlobSource {
    /// A stream of the blob's bytes (verified by the caller).
    fn open(&mut self, descriptor: &Descriptor, digest: &Digest) -> Result<Box<dyn Read + '_>>;
}

/// A resolved image: its manifest and config, checked, but its layers not yet fetched.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// The manifest digest.
    pub manifest_digest: Digest,
    /// The manifest bytes, kept in the store.
    pub manifest_bytes: Vec<u8>,
    /// The parsed manifest.
    pub manifest: Manifest,
    /// The config digest: the image id.
    pub config_digest: Digest,
    /// The config bytes.
    pub config_bytes: Vec<u8>,
    /// The parsed config.
    pub config: ImageConfig,
}

/// The store.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
    limits: Limits,
}

static STAGING: AtomicU64 = AtomicU64::new(0);

impl Store {
    /// Opens (creating) the store in `<state_dir>/images`, 0700, and removes staging
    /// directories of processes that are gone.
    pub fn open(state_dir: &Path, limits: Limits) -> Result<Store> {
        let dir = state_dir.join("images");
        for sub in ["", "blobs/sha256", "rootfs", "tmp"] {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir.join(sub))?;
        }
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))?;
        let store = Store { dir, limits };
        store.clean_staging();
        Ok(store)
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The unpacking bounds.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// A fresh path in the staging area (for spooled archives); the caller removes it.
    pub fn spool_path(&self) -> Result<PathBuf> {
        let n = STAGING.fetch_add(1, Ordering::Relaxed);
        Ok(self
            .dir
            .join("tmp")
            .join(format!("{}-{n}-spool", std::process::id())))
    }

    /// The unpacked root of image `id`.
    pub fn rootfs(&self, id: &Digest) -> PathBuf {
        self.dir.join("rootfs").join(id.hex()).join("root")
    }

    /// The image a name refers to, if stored.
    pub fn lookup(&self, name: &str) -> Result<Option<(RefEntry, StoredImage)>> {
        let Some(entry) = self.refs()?.remove(name) else {
            return Ok(None);
        };
        Ok(self.image(&entry.image)?.map(|image| (entry, image)))
    }

    /// The stored image with id `id`, if present.
    pub fn image(&self, id: &Digest) -> Result<Option<StoredImage>> {
        let path = self.dir.join("rootfs").join(id.hex()).join("image.json");
        match fs::read(&path) {
            Ok(bytes) => Ok(Some(
                serde_json::from_slice(&bytes).map_err(|e| Error::internal("image.json", e))?,
            )),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Every name and the image it refers to.
    pub fn refs(&self) -> Result<BTreeMap<String, RefEntry>> {
        match fs::read(self.dir.join("refs.json")) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes).map_err(|e| Error::internal("refs.json", e))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(BTreeMap::new()),
            Err(e) => Err(e.into()),
        }
    }

    /// Points `name` at an image (under the store lock).
    pub fn tag(&self, name: &str, entry: RefEntry) -> Result<()> {
        let _lock = self.lock()?;
        let mut refs = self.refs()?;
        refs.insert(name.to_owned(), entry);
        self.write_refs(&refs)
    }

    /// Removes `name`; the image's files go too when no other name refers to it. Returns the
    /// removed entry.
    pub fn untag(&self, name: &str) -> Result<Option<RefEntry>> {
        let _lock = self.lock()?;
        let mut refs = self.refs()?;
        let Some(entry) = refs.remove(name) else {
            return Ok(None);
        };
        self.write_refs(&refs)?;
        if !refs.values().any(|e| e.image == entry.image) {
            let dir = self.dir.join("rootfs").join(entry.image.hex());
            let doomed = self.staging_dir()?;
            if fs::rename(&dir, &doomed).is_ok() {
                fs::remove_dir_all(&doomed)?;
            }
        }
        Ok(Some(entry))
    }

    /// The images environments run on, by environment id.
    pub fn pins(&self) -> Result<BTreeMap<u64, Pin>> {
        match fs::read(self.dir.join("environments.json")) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes).map_err(|e| Error::internal("environments.json", e))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(BTreeMap::new()),
            Err(e) => Err(e.into()),
        }
    }

    /// Records the image environment `environment` runs on.
    pub fn pin(&self, environment: u64, pin: Pin) -> Result<()> {
        let _lock = self.lock()?;
        let mut pins = self.pins()?;
        if pins.get(&environment) == Some(&pin) {
            return Ok(());
        }
        pins.insert(environment, pin);
        let bytes = serde_json::to_vec_pretty(&pins)
            .map_err(|e| Error::internal("environments.json", e))?;
        write_atomically(&self.dir.join("environments.json"), &bytes)
    }

    fn write_refs(&self, refs: &BTreeMap<String, RefEntry>) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(refs).map_err(|e| Error::internal("refs.json", e))?;
        write_atomically(&self.dir.join("refs.json"), &bytes)
    }

    pub(super) fn lock(&self) -> Result<File> {
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.dir.join("lock"))?;
        flock(&file, FlockOperation::LockExclusive)?;
        Ok(file)
    }

    /// Keeps a manifest or config document in `blobs/`.
    pub fn put_blob(&self, digest: &Digest, bytes: &[u8]) -> Result<()> {
        verify("blob", digest, &Digest::of(bytes))?;
        let path = self.dir.join("blobs/sha256").join(digest.hex());
        if !path.exists() {
            write_atomically(&path, bytes)?;
        }
        Ok(())
    }

    pub(super) fn staging_dir(&self) -> Result<PathBuf> {
        let n = STAGING.fetch_add(1, Ordering::Relaxed);
        let dir = self.dir.join("tmp").join(format!(
            "{}-{n}-{}",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ));
        fs::DirBuilder::new().mode(0o700).create(&dir)?;
        Ok(dir)
    }

    /// Removes staging directories whose process is gone (a killed pull leaves only these).
    fn clean_staging(&self) {
        let Ok(entries) = fs::read_dir(self.dir.join("tmp")) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let pid = name
                .to_str()
                .and_then(|n| n.split('-').next())
                .and_then(|p| p.parse::<u32>().ok());
            let alive = pid.is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
            if !alive {
                fs::remove_dir_all(entry.path())
                    .or_else(|_| fs::remove_file(entry.path()))
                    .ok();
            }
        }
    }
}

pub(super) fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let mut file = File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    fs::rename(&tmp, path)?;
    Ok(())
}
