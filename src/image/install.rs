//! Installing an image into the store: its layers fetched (size and sha256 checked while
//! streaming into the staging area, a broken-off download restarted) and unpacked in order
//! (diff_ids checked), the mount points normalised, the user found, `image.json` written, and
//! the result renamed into `rootfs/` under the store lock.

use std::{
    fs::{self, File},
    io::{Read, Write},
    os::unix::fs::DirBuilderExt,
    path::Path,
    time::{SystemTime, UNIX_EPOCH},
};

use super::{
    digest::{Digest, Hashing, verify},
    inroot::{InPath, Root},
    manifest::Descriptor,
    passwd::{self, RUNNER_USER},
    store::{BlobSource, Progress, RefEntry, Resolved, Store, StoredImage, write_atomically},
    unpack::Unpacker,
};
use crate::error::{Error, Result};

impl Store {
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
            let target = self.dir().join("rootfs").join(id.hex());
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
        let mut unpacker = Unpacker::new(&root, self.limits());
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
