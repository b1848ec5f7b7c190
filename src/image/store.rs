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
    time::{SystemTime, UNIX_EPOCH},
};

use rustix::fs::{FlockOperation, flock};
use serde::{Deserialize, Serialize};

use super::{
    digest::{Digest, Hashing, verify},
    inroot::{InPath, Root},
    manifest::{Descriptor, ImageConfig, Manifest},
    passwd::{self, RUNNER_USER, User},
    unpack::{Limits, Unpacker},
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

    fn lock(&self) -> Result<File> {
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

    /// Fetches and unpacks the layers of `resolved` (unless the image is already stored),
    /// then points `name` at it.
    pub fn install(
        &self,
        name: &str,
        resolved: &Resolved,
        source: &mut dyn BlobSource,
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<StoredImage> {
        let id = &resolved.config_digest;
        let entry = RefEntry {
            image: id.clone(),
            manifest: resolved.manifest_digest.clone(),
        };
        if let Some(image) = self.image(id)? {
            self.tag(name, entry)?;
            return Ok(image);
        }
        self.put_blob(&resolved.manifest_digest, &resolved.manifest_bytes)?;
        self.put_blob(id, &resolved.config_bytes)?;
        let staging = self.staging_dir()?;
        let result = self.unpack(&staging, resolved, source, progress);
        let image = match result {
            Ok(image) => image,
            Err(e) => {
                fs::remove_dir_all(&staging).ok();
                return Err(e);
            }
        };
        {
            let _lock = self.lock()?;
            let target = self.dir.join("rootfs").join(id.hex());
            if fs::rename(&staging, &target).is_err() {
                // Another process installed the same image meanwhile: keep theirs.
                fs::remove_dir_all(&staging).ok();
            }
        }
        self.tag(name, entry)?;
        Ok(image)
    }

    fn unpack(
        &self,
        staging: &Path,
        resolved: &Resolved,
        source: &mut dyn BlobSource,
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<StoredImage> {
        let root_dir = staging.join("root");
        fs::DirBuilder::new().mode(0o755).create(&root_dir)?;
        let root = Root::open(&root_dir)?;
        let mut unpacker = Unpacker::new(&root, &self.limits);
        let layers = &resolved.manifest.layers;
        for (i, (layer, diff_id)) in layers
            .iter()
            .zip(&resolved.config.rootfs.diff_ids)
            .enumerate()
        {
            let digest = layer.digest()?;
            let diff_id = Digest::parse(diff_id)?;
            let size = layer.size()?;
            let what = format!("layer {} of {} ({})", i + 1, layers.len(), digest.short());
            let mut step = Progress {
                layer: i + 1,
                layers: layers.len(),
                digest: digest.clone(),
                received: 0,
                size,
                unpacked: false,
            };
            let blob_path = staging.join(format!("layer-{i}"));
            // A broken connection (not a wrong blob) is tried again, from the start.
            let mut attempt = 1;
            loop {
                step.received = 0;
                match fetch(source, layer, &digest, &blob_path, &mut step, progress) {
                    Err(Error::Registry(e)) if attempt < 3 => {
                        log::warn!("{what}: {e}; downloading it again");
                        attempt += 1;
                    }
                    other => break other?,
                }
            }
            unpacker.apply(File::open(&blob_path)?, &diff_id, &what)?;
            fs::remove_file(&blob_path)?;
            step.unpacked = true;
            progress(&step);
        }
        if unpacker.skipped_devices > 0 {
            log::info!(
                "image {}: skipped {} device nodes",
                resolved.config_digest.short(),
                unpacker.skipped_devices
            );
        }
        normalise(&root)?;
        let config = resolved.config.config.clone().unwrap_or_default();
        let image = StoredImage {
            id: resolved.config_digest.clone(),
            manifest: resolved.manifest_digest.clone(),
            env: config.env.unwrap_or_default(),
            working_dir: config.working_dir.unwrap_or_default(),
            user: passwd::lookup(&root, RUNNER_USER).filter(|u| u.uid != 0),
            size: unpacker.bytes(),
            layers: layers.len(),
            installed: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        };
        let json =
            serde_json::to_vec_pretty(&image).map_err(|e| Error::internal("image.json", e))?;
        write_atomically(&staging.join("image.json"), &json)?;
        Ok(image)
    }

    fn staging_dir(&self) -> Result<PathBuf> {
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

/// Downloads the blob of `layer` into `path`, checking its size and digest.
fn fetch(
    source: &mut dyn BlobSource,
    layer: &Descriptor,
    digest: &Digest,
    path: &Path,
    step: &mut Progress,
    progress: &mut dyn FnMut(&Progress),
) -> Result<()> {
    let what = format!(
        "layer {} of {} ({})",
        step.layer,
        step.layers,
        digest.short()
    );
    let mut input = Hashing::new(source.open(layer, digest)?, step.size, "layer blob");
    let mut output = File::create(path)?;
    let mut buf = vec![0; 256 * 1024];
    loop {
        let n = input
            .read(&mut buf)
            .map_err(|e| Error::Registry(format!("{what}: {e}")))?;
        if n == 0 {
            break;
        }
        output.write_all(&buf[..n])?;
        step.received += n as u64;
        if step.received == step.size || step.received % (8 << 20) < n as u64 {
            progress(step);
        }
    }
    let (actual, n) = input.finish()?;
    if n != step.size {
        return Err(Error::Image(format!(
            "{what}: {n} bytes received, {} expected",
            step.size
        )));
    }
    verify(&what, digest, &actual)
}

/// The mount points the sandbox uses must be plain directories in the image (not symlinks a
/// hostile image could aim elsewhere), as Docker's init layer ensures.
fn normalise(root: &Root) -> Result<()> {
    for dir in ["proc", "sys", "dev", "tmp"] {
        let path = InPath::parse(dir.as_bytes(), 16)?;
        let (_, name) = path.split_last().expect("not the root");
        if super::inroot::kind_at(root.fd(), name)? != Some(rustix::fs::FileType::Directory) {
            super::inroot::remove_all(root.fd(), name)?;
            rustix::fs::mkdirat(
                root.fd(),
                name,
                rustix::fs::Mode::from_raw_mode(if dir == "tmp" { 0o1777 } else { 0o755 }),
            )?;
        }
    }
    Ok(())
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let mut file = File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    fs::rename(&tmp, path)?;
    Ok(())
}
