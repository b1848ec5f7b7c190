//! Image archives as the tools write them: OCI image layouts (directory or tar, as skopeo,
//! podman and Docker ≥ 25 write them) and `docker save` archives of the older format (Docker <
//! 25, and podman's with `<id>/layer.tar` linked to `../<diff id>.tar`).

use std::path::Path;

use serde_json::json;

use super::{Image, build::sha256};

fn hex(digest: &str) -> &str {
    digest.trim_start_matches("sha256:")
}

/// Writes `image` as an OCI image layout into `dir`; `annotations` go on its index entry.
pub fn oci_layout(dir: &Path, image: &Image, annotations: serde_json::Value) {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let put = |digest: &str, bytes: &[u8]| std::fs::write(blobs.join(hex(digest)), bytes).unwrap();
    put(&image.config_digest, &image.config);
    put(&image.manifest_digest, &image.manifest);
    for layer in &image.layers {
        put(&layer.digest, &layer.blob);
    }
    let index = json!({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": image.manifest_digest, "size": image.manifest.len(), "annotations": annotations}]});
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
}

/// A tar of every file under `dir` (names relative to it).
pub fn tar_of(dir: &Path) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    builder.append_dir_all(".", dir).unwrap();
    builder.into_inner().unwrap()
}

fn append(builder: &mut tar::Builder<Vec<u8>>, name: &str, bytes: &[u8]) {
    let mut header = tar::Header::new_gnu();
    header.set_size(bytes.len() as u64);
    header.set_mode(0o644);
    header.set_entry_type(tar::EntryType::Regular);
    builder.append_data(&mut header, name, bytes).unwrap();
}

fn append_link(builder: &mut tar::Builder<Vec<u8>>, name: &str, target: &str) {
    let mut header = tar::Header::new_gnu();
    header.set_size(0);
    header.set_mode(0o777);
    header.set_entry_type(tar::EntryType::Symlink);
    builder.append_link(&mut header, name, target).unwrap();
}

/// A `docker save` archive of the older format with uncompressed layers; `podman` links each
/// `<id>/layer.tar` to `../<diff id>.tar` as podman does.
pub fn docker_save(image: &Image, tags: &[&str], podman: bool) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    let mut layer_paths = Vec::new();
    for (i, layer) in image.layers.iter().enumerate() {
        let id = sha256(format!("layer-{i}").as_bytes());
        let path = format!("{}/layer.tar", hex(&id));
        append(&mut builder, &format!("{}/VERSION", hex(&id)), b"1.0");
        if podman {
            let file = format!("{}.tar", hex(&layer.diff_id));
            append(&mut builder, &file, &layer.tar);
            append_link(&mut builder, &path, &format!("../{file}"));
        } else {
            append(&mut builder, &path, &layer.tar);
        }
        layer_paths.push(path);
    }
    let config = format!("{}.json", hex(&image.config_digest));
    append(&mut builder, &config, &image.config);
    let manifest = json!([{"Config": config, "RepoTags": tags, "Layers": layer_paths}]);
    append(
        &mut builder,
        "manifest.json",
        &serde_json::to_vec(&manifest).unwrap(),
    );
    append(&mut builder, "repositories", b"{}");
    builder.into_inner().unwrap()
}

/// What Docker ≥ 25 writes: an OCI layout with uncompressed layers plus `manifest.json`.
pub fn docker_save_oci(dir: &Path, image: &Image, tag: &str) {
    oci_layout(
        dir,
        image,
        json!({"io.containerd.image.name": format!("docker.io/{tag}"), "org.opencontainers.image.ref.name": tag.rsplit(':').next().unwrap()}),
    );
    let layers: Vec<String> = image
        .layers
        .iter()
        .map(|l| format!("blobs/sha256/{}", hex(&l.digest)))
        .collect();
    let manifest = json!([{"Config": format!("blobs/sha256/{}", hex(&image.config_digest)), "RepoTags": [tag], "Layers": layers}]);
    std::fs::write(
        dir.join("manifest.json"),
        serde_json::to_vec(&manifest).unwrap(),
    )
    .unwrap();
}

/// gzip of `bytes`.
pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

/// zstd of `bytes`.
pub fn zstd(bytes: &[u8]) -> Vec<u8> {
    ruzstd::encoding::compress_to_vec(bytes, ruzstd::encoding::CompressionLevel::Fastest)
}

/// What Docker with the containerd image store writes: an index naming the image whose entry
/// is a nested index over all platforms, of which only this host's was saved.
pub fn containerd_save(dir: &Path, image: &Image, name: &str) {
    oci_layout(dir, image, json!({}));
    let nested = serde_json::to_vec(&json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": sha256(b"absent s390x"), "size": 12,
             "platform": {"architecture": "s390x", "os": "linux"}},
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": image.manifest_digest, "size": image.manifest.len(),
             "platform": {"architecture": super::build::arch(), "os": "linux"}},
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": sha256(b"absent attestation"), "size": 18,
             "platform": {"architecture": "unknown", "os": "unknown"}}]}))
    .unwrap();
    let digest = sha256(&nested);
    std::fs::write(dir.join("blobs/sha256").join(hex(&digest)), &nested).unwrap();
    let index = json!({"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.index.v1+json",
        "digest": digest, "size": nested.len(), "annotations": {"io.containerd.image.name": name}}]});
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
}
