//! Pulling an image by name: resolve the manifest (through an index to the host's platform)
//! and the config, then fetch and unpack the layers into the store.

use std::io::Read;

use super::{
    digest::{Digest, verify},
    manifest::{self, Document, ImageConfig, MAX_DOCUMENT},
    reference::Reference,
    registry::{Client, Endpoint},
    store::{BlobSource, Progress, Resolved, Store, StoredImage},
};
use crate::error::{Error, Result};

/// A resolved registry image and where its blobs come from.
#[derive(Debug, Clone)]
pub struct Remote {
    /// The name as given, resolved.
    pub reference: Reference,
    /// The manifest and config.
    pub resolved: Resolved,
    /// The endpoint that answered.
    pub endpoint: Endpoint,
}

/// Resolves `reference` on its registry (or a mirror): fast, only small documents.
pub fn resolve(client: &Client, reference: &Reference) -> Result<Remote> {
    let name = reference.familiar();
    let mut fetched = client.manifest(reference, reference.manifest_reference())?;
    let mut digest = Digest::of(&fetched.bytes);
    if let Some(pinned) = &reference.digest {
        verify(&format!("manifest of {name}"), pinned, &digest)?;
    }
    for _ in 0..4 {
        match Document::parse(&fetched.bytes, fetched.content_type.as_deref())? {
            Document::Index(index) => {
                let chosen = manifest::select_platform(&index, &name)?;
                let chosen_digest = chosen.digest()?;
                fetched = client.manifest(reference, chosen_digest.as_str())?;
                digest = Digest::of(&fetched.bytes);
                verify(&format!("manifest of {name}"), &chosen_digest, &digest)?;
            }
            Document::Manifest(manifest) => {
                let config_digest = manifest.config.digest()?;
                if manifest.config.size()? > MAX_DOCUMENT {
                    return Err(Error::Image(format!(
                        "config of {name} is larger than {MAX_DOCUMENT} bytes"
                    )));
                }
                let mut config_bytes = Vec::new();
                client
                    .blob(&fetched.endpoint, &config_digest)?
                    .take(MAX_DOCUMENT + 1)
                    .read_to_end(&mut config_bytes)
                    .map_err(|e| Error::Registry(format!("reading the config of {name}: {e}")))?;
                verify(
                    &format!("config of {name}"),
                    &config_digest,
                    &Digest::of(&config_bytes),
                )?;
                let config = ImageConfig::parse(&config_bytes)?;
                manifest::check(&manifest, &config, &name)?;
                return Ok(Remote {
                    reference: reference.clone(),
                    resolved: Resolved {
                        manifest_digest: digest,
                        manifest_bytes: fetched.bytes,
                        manifest,
                        config_digest,
                        config_bytes,
                        config,
                    },
                    endpoint: fetched.endpoint,
                });
            }
        }
    }
    Err(Error::Image(format!("{name}: indexes nested too deeply")))
}

struct RegistryBlobs<'a> {
    client: &'a Client,
    endpoint: &'a Endpoint,
}

impl BlobSource for RegistryBlobs<'_> {
    fn open(&mut self, _: &manifest::Descriptor, digest: &Digest) -> Result<Box<dyn Read + '_>> {
        Ok(Box::new(self.client.blob(self.endpoint, digest)?))
    }
}

/// Fetches and unpacks a resolved image into the store under its full name.
pub fn install(
    store: &Store,
    client: &Client,
    remote: &Remote,
    progress: &mut dyn FnMut(&Progress),
) -> Result<StoredImage> {
    let mut source = RegistryBlobs {
        client,
        endpoint: &remote.endpoint,
    };
    store.install(
        &remote.reference.to_string(),
        &remote.resolved,
        &mut source,
        progress,
    )
}

/// Resolves and installs `reference`, unless the store has it already.
pub fn pull(
    store: &Store,
    client: &Client,
    reference: &Reference,
    progress: &mut dyn FnMut(&Progress),
) -> Result<StoredImage> {
    let remote = resolve(client, reference)?;
    install(store, client, &remote, progress)
}
