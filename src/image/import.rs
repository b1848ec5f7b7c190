//! `image import`: an image from a file rather than a registry — an OCI image layout (directory
//! or tar, as `skopeo`, `podman save --format oci-archive` and Docker ≥ 25 write them) or a
//! `docker save` archive of the older format (`manifest.json` with `<id>/layer.tar`).

use std::{collections::BTreeMap, io::Read, path::Path};

use serde::Deserialize;

use super::{
    Digest, Reference, Store, StoredImage,
    archive::Archive,
    digest::verify,
    manifest::{self, Descriptor, Document, ImageConfig, Index, MAX_DOCUMENT, Manifest},
    store::{BlobSource, Progress, Resolved},
};
use crate::error::{Error, Result};

const CONTAINERD_NAME: &str = "io.containerd.image.name";
const OCI_REF_NAME: &str = "org.opencontainers.image.ref.name";

/// What `import` did.
#[derive(Debug, Clone)]
pub struct Imported {
    /// The names the image is stored under.
    pub names: Vec<String>,
    /// The image.
    pub image: StoredImage,
}

/// Imports the image in `input` (a directory, a file, or `-` for stdin) into `store`, under
/// `name` or the names the archive gives it.
pub fn import(
    store: &Store,
    input: &Path,
    name: Option<&str>,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Imported> {
    let spool = store.spool_path()?;
    let result = import_from(store, input, &spool, name, progress);
    std::fs::remove_file(&spool).ok();
    result
}

fn import_from(
    store: &Store,
    input: &Path,
    spool: &Path,
    name: Option<&str>,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Imported> {
    let limits = store.limits();
    let archive = Archive::open(input, spool, limits.max_header, limits.max_unpacked_bytes)?;
    let (resolved, found) = if archive.has("index.json") {
        oci(&archive, name)?
    } else if archive.has("manifest.json") {
        docker(&archive, name)?
    } else {
        return Err(Error::Image(format!(
            "{} is neither an OCI image layout (index.json) nor a docker save archive (manifest.json); it holds: {}",
            input.display(),
            archive.listing()
        )));
    };
    let names: Vec<String> = match name {
        Some(name) => vec![full_name(name)?],
        None => found.iter().filter_map(|n| full_name(n).ok()).collect(),
    };
    let Some(first) = names.first() else {
        return Err(Error::Image(
            "the archive names no image: give --name".into(),
        ));
    };
    let mut source = ArchiveBlobs(&archive);
    let image = store.install(first, &resolved, &mut source, progress)?;
    for other in &names[1..] {
        store.tag(
            other,
            super::store::RefEntry {
                image: image.id.clone(),
                manifest: image.manifest.clone(),
            },
        )?;
    }
    Ok(Imported { names, image })
}

fn full_name(name: &str) -> Result<String> {
    Ok(Reference::parse(name)?.to_string())
}

struct ArchiveBlobs<'a>(&'a Archive);

impl BlobSource for ArchiveBlobs<'_> {
    fn open(&mut self, descriptor: &Descriptor, digest: &Digest) -> Result<Box<dyn Read + '_>> {
        // Docker's older format names layers by path; everything else by digest.
        let path = descriptor
            .annotations
            .get(PATH_ANNOTATION)
            .cloned()
            .unwrap_or_else(|| blob_path(digest));
        self.0.open_member(&path)
    }
}

/// Where an image layout keeps a blob (the digest is validated, so this is a safe name).
fn blob_path(digest: &Digest) -> String {
    format!("blobs/sha256/{}", digest.hex())
}

/// Internal annotation: the member holding a layer of a `docker save` archive.
const PATH_ANNOTATION: &str = "poseidon-lite.path";

fn read_blob(archive: &Archive, digest: &Digest) -> Result<Vec<u8>> {
    let bytes = archive.read_small(&blob_path(digest), MAX_DOCUMENT)?;
    verify(
        &format!("blob {}", digest.short()),
        digest,
        &Digest::of(&bytes),
    )?;
    Ok(bytes)
}

/// An OCI layout: index.json → (nested indexes) → the image for this host. With several
/// images, `name` picks one by its annotations.
fn oci(archive: &Archive, name: Option<&str>) -> Result<(Resolved, Vec<String>)> {
    let index: Index = serde_json::from_slice(&archive.read_small("index.json", MAX_DOCUMENT)?)
        .map_err(|e| Error::Image(format!("malformed index.json: {e}")))?;
    let wanted = name.map(full_name).transpose()?;
    let mut candidates = Vec::new();
    for entry in &index.manifests {
        // Descriptors whose blob is absent (platforms that were not saved) are skipped.
        let Ok(digest) = entry.digest() else { continue };
        if archive.has(&blob_path(&digest)) {
            candidates.push((entry.clone(), entry_names(entry)));
        }
    }
    // With several images, the name picks one.
    if let Some(wanted) = &wanted
        && candidates.len() > 1
    {
        candidates.retain(|(_, names)| {
            names
                .iter()
                .any(|n| full_name(n).ok().as_ref() == Some(wanted))
        });
    }
    let (entry, names) = match candidates.len() {
        1 => candidates.remove(0),
        0 => return Err(Error::Image("the image layout has no usable image".into())),
        _ => {
            let all: Vec<String> = candidates.iter().flat_map(|(_, n)| n.clone()).collect();
            return Err(Error::Image(format!(
                "the image layout holds several images ({}): choose one with --name",
                all.join(", ")
            )));
        }
    };
    let mut digest = entry.digest()?;
    for _ in 0..4 {
        let bytes = read_blob(archive, &digest)?;
        match Document::parse(&bytes, Some(&entry.media_type))? {
            Document::Index(nested) => {
                let available = Index {
                    manifests: nested
                        .manifests
                        .into_iter()
                        .filter(|d| d.digest().is_ok_and(|d| archive.has(&blob_path(&d))))
                        .collect(),
                };
                digest = manifest::select_platform(&available, "the image layout")?.digest()?;
            }
            Document::Manifest(manifest) => {
                let config_digest = manifest.config.digest()?;
                let config_bytes = read_blob(archive, &config_digest)?;
                let config = ImageConfig::parse(&config_bytes)?;
                manifest::check(&manifest, &config, "the image")?;
                let resolved = Resolved {
                    manifest_digest: digest,
                    manifest_bytes: bytes,
                    manifest,
                    config_digest,
                    config_bytes,
                    config,
                };
                let mut names = names;
                names.extend(docker_tags(archive));
                return Ok((resolved, names));
            }
        }
    }
    Err(Error::Image("indexes nested too deeply".into()))
}

/// The names an index entry gives its image: containerd's full name, or a ref name that is a
/// whole image name (skopeo and podman write `name:tag`; a bare tag names nothing).
fn entry_names(entry: &Descriptor) -> Vec<String> {
    let mut names = Vec::new();
    if let Some(name) = entry.annotations.get(CONTAINERD_NAME) {
        names.push(name.clone());
    } else if let Some(name) = entry.annotations.get(OCI_REF_NAME)
        && (name.contains('/') || name.contains(':'))
        && Reference::parse(name).is_ok()
    {
        names.push(name.clone());
    }
    names
}

/// Docker ≥ 25 also writes `manifest.json` with `RepoTags` into its OCI layout.
fn docker_tags(archive: &Archive) -> Vec<String> {
    archive
        .read_small("manifest.json", MAX_DOCUMENT)
        .ok()
        .and_then(|bytes| serde_json::from_slice::<Vec<SaveEntry>>(&bytes).ok())
        .map(|entries| {
            entries
                .into_iter()
                .flat_map(|e| e.repo_tags.unwrap_or_default())
                .collect()
        })
        .unwrap_or_default()
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct SaveEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

/// The older `docker save` format: `manifest.json` lists the config file (named by its digest)
/// and uncompressed layer tars, whose digests are therefore the config's diff_ids.
fn docker(archive: &Archive, name: Option<&str>) -> Result<(Resolved, Vec<String>)> {
    let entries: Vec<SaveEntry> =
        serde_json::from_slice(&archive.read_small("manifest.json", MAX_DOCUMENT)?)
            .map_err(|e| Error::Image(format!("malformed manifest.json: {e}")))?;
    let wanted = name.map(full_name).transpose()?;
    let tags = |e: &SaveEntry| e.repo_tags.clone().unwrap_or_default();
    let entry = match entries.as_slice() {
        [only] => only,
        [] => return Err(Error::Image("manifest.json lists no image".into())),
        several => several
            .iter()
            .find(|e| tags(e).iter().any(|t| full_name(t).ok() == wanted))
            .ok_or_else(|| {
                let all: Vec<String> = several.iter().flat_map(tags).collect();
                Error::Image(format!(
                    "the archive holds several images ({}): choose one with --name",
                    all.join(", ")
                ))
            })?,
    };
    let config_bytes = archive.read_small(&entry.config, MAX_DOCUMENT)?;
    let config_digest = Digest::of(&config_bytes);
    let stem = entry
        .config
        .rsplit('/')
        .next()
        .unwrap_or("")
        .trim_end_matches(".json");
    if stem.len() == 64 && stem != config_digest.hex() {
        return Err(Error::Image(format!("{}: digest mismatch", entry.config)));
    }
    let config = ImageConfig::parse(&config_bytes)?;
    let mut layers = Vec::new();
    for (path, diff_id) in entry.layers.iter().zip(&config.rootfs.diff_ids) {
        let size = archive
            .size(path)
            .ok_or_else(|| Error::Image(format!("the archive has no {path}")))?;
        layers.push(Descriptor {
            media_type: "application/vnd.docker.image.rootfs.diff.tar".into(),
            digest: Digest::parse(diff_id)?.to_string(),
            size: i64::try_from(size).unwrap_or(i64::MAX),
            platform: None,
            annotations: BTreeMap::from([(PATH_ANNOTATION.to_owned(), path.clone())]),
        });
    }
    let manifest = Manifest {
        config: Descriptor {
            media_type: "application/vnd.docker.container.image.v1+json".into(),
            digest: config_digest.to_string(),
            size: config_bytes.len() as i64,
            platform: None,
            annotations: BTreeMap::new(),
        },
        layers,
    };
    if entry.layers.len() != config.rootfs.diff_ids.len() {
        return Err(Error::Image(format!(
            "manifest.json lists {} layers, the config {} diff_ids",
            entry.layers.len(),
            config.rootfs.diff_ids.len()
        )));
    }
    manifest::check(&manifest, &config, "the image")?;
    let mut stored = manifest.clone();
    for layer in &mut stored.layers {
        layer.annotations.clear();
    }
    let manifest_bytes = serde_json::to_vec(&stored).map_err(|e| Error::internal("manifest", e))?;
    let resolved = Resolved {
        manifest_digest: Digest::of(&manifest_bytes),
        manifest_bytes,
        manifest,
        config_digest,
        config_bytes,
        config,
    };
    Ok((resolved, tags(entry)))
}
