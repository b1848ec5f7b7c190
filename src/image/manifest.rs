//! The JSON documents of an image: indexes (manifest lists), manifests and the image config,
//! in their OCI and Docker v2 schema 2 spellings, and choosing the host's platform from an index.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::digest::Digest;
use crate::error::{Error, Result};

/// OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// Docker manifest list.
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Docker v2 schema 2 manifest.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// What the registry client accepts, in its `Accept` header.
pub const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
    application/vnd.docker.distribution.manifest.list.v2+json, \
    application/vnd.oci.image.manifest.v1+json, \
    application/vnd.docker.distribution.manifest.v2+json";
/// The largest manifest, index or config document read (they are small; a cap keeps a hostile
/// source from filling memory).
pub const MAX_DOCUMENT: u64 = 4 << 20;

/// A reference to content: media type, digest and size.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// The media type of the referenced content.
    #[serde(default)]
    pub media_type: String,
    /// The digest (validated with [`Descriptor::digest`]).
    pub digest: String,
    /// The size in bytes (negative sizes are refused).
    pub size: i64,
    /// The platform, in index entries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    /// Annotations (image layouts name images with `org.opencontainers.image.ref.name`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

impl Descriptor {
    /// The validated digest.
    pub fn digest(&self) -> Result<Digest> {
        Digest::parse(&self.digest)
    }

    /// The size, refused when negative.
    pub fn size(&self) -> Result<u64> {
        u64::try_from(self.size)
            .map_err(|_| Error::Image(format!("negative size in descriptor {}", self.digest)))
    }
}

/// An index entry's platform.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Platform {
    /// `amd64`, `arm64`, …
    #[serde(default)]
    pub architecture: String,
    /// `linux`, …
    #[serde(default)]
    pub os: String,
    /// `v8`, …
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

/// An image index or a manifest list.
#[derive(Debug, Clone, Deserialize)]
pub struct Index {
    /// The entries, one per platform (plus attestations).
    pub manifests: Vec<Descriptor>,
}

/// An image manifest.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Manifest {
    /// The config blob.
    pub config: Descriptor,
    /// The layers, base first.
    pub layers: Vec<Descriptor>,
}

/// A manifest document of either kind.
#[derive(Debug)]
pub enum Document {
    /// An index: pick a platform and fetch again.
    Index(Index),
    /// A manifest.
    Manifest(Manifest),
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Probe {
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    schema_version: Option<u32>,
    #[serde(default)]
    manifests: Option<serde_json::Value>,
}

impl Document {
    /// Parses a manifest document; `content_type` is the registry's header, if any.
    pub fn parse(bytes: &[u8], content_type: Option<&str>) -> Result<Document> {
        let bad = |e: serde_json::Error| Error::Image(format!("malformed manifest: {e}"));
        let probe: Probe = serde_json::from_slice(bytes).map_err(bad)?;
        let kind = probe.media_type.as_deref().or(content_type).unwrap_or("");
        if probe.schema_version == Some(1)
            || kind.starts_with("application/vnd.docker.distribution.manifest.v1")
        {
            return Err(Error::Image(
                "Docker schema 1 manifests are not supported".into(),
            ));
        }
        if kind.starts_with(OCI_INDEX) || kind.starts_with(DOCKER_LIST) || probe.manifests.is_some()
        {
            return Ok(Document::Index(serde_json::from_slice(bytes).map_err(bad)?));
        }
        Ok(Document::Manifest(
            serde_json::from_slice(bytes).map_err(bad)?,
        ))
    }
}

/// The image configuration (only the parts a runner uses or a listing shows).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct ImageConfig {
    /// The image's architecture.
    #[serde(default)]
    pub architecture: String,
    /// The image's operating system.
    #[serde(default)]
    pub os: String,
    /// The container defaults.
    #[serde(default)]
    pub config: Option<ContainerConfig>,
    /// The uncompressed layer digests.
    pub rootfs: RootFs,
}

/// `config.config` of an image.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct ContainerConfig {
    /// The default user.
    #[serde(default)]
    pub user: Option<String>,
    /// `KEY=value` pairs.
    #[serde(default)]
    pub env: Option<Vec<String>>,
    /// The default working directory.
    #[serde(default)]
    pub working_dir: Option<String>,
}

/// `config.rootfs`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct RootFs {
    /// The sha256 of each layer uncompressed.
    #[serde(default)]
    pub diff_ids: Vec<String>,
}

impl ImageConfig {
    /// Parses a config blob.
    pub fn parse(bytes: &[u8]) -> Result<ImageConfig> {
        serde_json::from_slice(bytes)
            .map_err(|e| Error::Image(format!("malformed image config: {e}")))
    }
}

/// The host's architecture as images name it.
pub fn host_architecture() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

/// The entry of `index` for linux on the host's architecture, or an error listing what the
/// index offers.
pub fn select_platform<'a>(index: &'a Index, what: &str) -> Result<&'a Descriptor> {
    let arch = host_architecture();
    let matching = |d: &&Descriptor| {
        d.platform
            .as_ref()
            .is_some_and(|p| p.os == "linux" && p.architecture == arch)
    };
    if let Some(found) = index.manifests.iter().find(matching) {
        return Ok(found);
    }
    // Image layouts often have one entry without a platform: that is the image.
    let unlabelled: Vec<_> = index
        .manifests
        .iter()
        .filter(|d| d.platform.is_none())
        .collect();
    if let [only] = unlabelled.as_slice() {
        return Ok(only);
    }
    let offered: Vec<String> = index
        .manifests
        .iter()
        .filter_map(|d| {
            d.platform
                .as_ref()
                .map(|p| format!("{}/{}", p.os, p.architecture))
        })
        .collect();
    Err(Error::Image(format!(
        "{what} has no image for linux/{arch} (it offers: {})",
        if offered.is_empty() {
            "nothing".to_owned()
        } else {
            offered.join(", ")
        }
    )))
}

/// Checks a manifest against its config: as many layers as diff_ids, linux on this host.
pub fn check(manifest: &Manifest, config: &ImageConfig, what: &str) -> Result<()> {
    if manifest.layers.len() != config.rootfs.diff_ids.len() {
        return Err(Error::Image(format!(
            "{what}: {} layers but {} diff_ids",
            manifest.layers.len(),
            config.rootfs.diff_ids.len()
        )));
    }
    if !config.os.is_empty() && config.os != "linux" {
        return Err(Error::Image(format!(
            "{what} is for {}, not linux",
            config.os
        )));
    }
    if !config.architecture.is_empty() && config.architecture != host_architecture() {
        return Err(Error::Image(format!(
            "{what} is for {}, this host is {}",
            config.architecture,
            host_architecture()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_are_told_apart_and_platforms_chosen() {
        let arch = host_architecture();
        let index = format!(
            r#"{{"schemaVersion":2,"mediaType":"{DOCKER_LIST}","manifests":[
            {{"mediaType":"{DOCKER_MANIFEST}","digest":"sha256:{a}","size":1,"platform":{{"architecture":"s390x","os":"linux"}}}},
            {{"mediaType":"{DOCKER_MANIFEST}","digest":"sha256:{b}","size":2,"platform":{{"architecture":"{arch}","os":"linux"}}}},
            {{"mediaType":"{OCI_MANIFEST}","digest":"sha256:{a}","size":1,"platform":{{"architecture":"unknown","os":"unknown"}}}}]}}"#,
            a = "a".repeat(64),
            b = "b".repeat(64)
        );
        let Document::Index(index) = Document::parse(index.as_bytes(), None).unwrap() else {
            panic!("not an index")
        };
        assert_eq!(select_platform(&index, "x").unwrap().size, 2);
        let other = Index {
            manifests: vec![index.manifests[0].clone()],
        };
        assert_eq!(
            select_platform(&other, "img").unwrap_err().to_string(),
            format!("img has no image for linux/{arch} (it offers: linux/s390x)")
        );
        let schema1 = br#"{"schemaVersion":1,"name":"x"}"#;
        assert!(Document::parse(schema1, None).is_err());
        let manifest = format!(
            r#"{{"schemaVersion":2,"config":{{"digest":"sha256:{a}","size":3}},"layers":[]}}"#,
            a = "a".repeat(64)
        );
        assert!(matches!(
            Document::parse(manifest.as_bytes(), Some(OCI_MANIFEST)).unwrap(),
            Document::Manifest(_)
        ));
    }
}
