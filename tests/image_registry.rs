//! Pulling images from a real registry (Debian's `docker-registry` on loopback) into the store:
//! platform selection from an index, Docker and OCI manifests, a bearer-token challenge with
//! credentials from an auth file, Docker Hub names through a mirror, and the errors for a
//! missing image and an unreachable registry.

mod image_support;

use std::os::unix::fs::MetadataExt;

use image_support::{Image, Registry, build::busybox_layer, token::TokenFront};
use poseidon_lite::{
    Error,
    image::{
        Limits, Reference, Store, pull,
        registry::{Client, RegistryConfig},
    },
};

fn store() -> (tempfile::TempDir, Store) {
    let state = tempfile::tempdir().unwrap();
    let store = Store::open(state.path(), Limits::default()).unwrap();
    (state, store)
}

fn client(config: RegistryConfig) -> Client {
    Client::new(&config).unwrap()
}

#[test]
fn an_image_behind_an_index_is_pulled_once_and_unpacked() {
    let registry = Registry::start();
    let image = Image::new(vec![busybox_layer()], &["TERM=ansi", "PATH=/bin"]).with_index();
    registry.push("course/python", "3.8", &image);
    let (_state, store) = store();
    let client = client(RegistryConfig::default());
    let reference = Reference::parse(&format!("{}/course/python:3.8", registry.host)).unwrap();
    let mut steps = Vec::new();
    let stored = pull::pull(&store, &client, &reference, &mut |p| steps.push(p.clone())).unwrap();
    assert_eq!(stored.id.as_str(), image.config_digest);
    assert_eq!(stored.manifest.as_str(), image.manifest_digest);
    assert_eq!(stored.env, ["TERM=ansi", "PATH=/bin"]);
    assert_eq!(stored.working_dir, "/workspace");
    assert_eq!(stored.user.as_ref().map(|u| u.uid), Some(1001));
    assert!(
        steps.iter().any(|p| p.unpacked && p.layer == 1),
        "progress per layer"
    );
    let root = store.rootfs(&stored.id);
    assert_eq!(
        std::fs::read_to_string(root.join("etc/image-marker")).unwrap(),
        "from the registry\n"
    );
    assert_eq!(
        std::fs::metadata(root.join("workspace")).unwrap().mode() & 0o7777,
        0o1777
    );
    assert_eq!(
        std::fs::read_link(root.join("bin/sh")).unwrap().to_str(),
        Some("busybox")
    );
    let images_dir = store.dir();
    assert_eq!(std::fs::metadata(images_dir).unwrap().mode() & 0o777, 0o700);

    // Stored: a second pull unpacks nothing.
    let mut again = Vec::new();
    let second = pull::pull(&store, &client, &reference, &mut |p| again.push(p.clone())).unwrap();
    assert_eq!(second, stored);
    assert!(again.is_empty(), "a stored image is not downloaded again");
    let (entry, _) = store.lookup(&reference.to_string()).unwrap().unwrap();
    assert_eq!(entry.image, stored.id);
}

#[test]
fn oci_manifests_pull_too() {
    let registry = Registry::start();
    let image = Image::oci(vec![busybox_layer()], &["A=1"]);
    registry.push("oci/img", "latest", &image);
    let (_state, store) = store();
    let reference = Reference::parse(&format!("{}/oci/img", registry.host)).unwrap();
    let stored = pull::pull(
        &store,
        &client(RegistryConfig::default()),
        &reference,
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(stored.env, ["A=1"]);
}

#[test]
fn a_missing_image_names_itself_and_an_unreachable_registry_names_the_registry() {
    let registry = Registry::start();
    let client = client(RegistryConfig::default());
    let missing = Reference::parse(&format!("{}/no/such:tag", registry.host)).unwrap();
    let err = pull::resolve(&client, &missing).unwrap_err();
    assert!(matches!(err, Error::Image(_)), "{err:?}");
    assert_eq!(err.status(), 400);
    assert!(err.to_string().contains("no/such/manifests/tag"), "{err}");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let nowhere = Reference::parse(&format!("127.0.0.1:{port}/x/y:1")).unwrap();
    let err = pull::resolve(&client, &nowhere).unwrap_err();
    assert!(matches!(err, Error::Registry(_)), "{err:?}");
    assert!(
        err.to_string().contains(&format!(
            "registry http://127.0.0.1:{port} cannot be reached"
        )),
        "{err}"
    );
}

#[test]
fn a_bearer_token_challenge_is_answered_with_the_auth_file_credentials() {
    let registry = Registry::start();
    let image = Image::new(vec![busybox_layer()], &[]);
    registry.push("private/img", "1", &image);
    let front = TokenFront::start(registry.url());
    let reference = Reference::parse(&format!("{}/private/img:1", front.host)).unwrap();

    let (_state, store) = store();
    let err = pull::pull(
        &store,
        &client(RegistryConfig::default()),
        &reference,
        &mut |_| {},
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("refused access to private/img"),
        "{err}"
    );

    let auth = tempfile::NamedTempFile::new().unwrap();
    let encoded = poseidon_lite_base64(&format!(
        "{}:{}",
        image_support::token::USER,
        image_support::token::PASSWORD
    ));
    std::fs::write(
        auth.path(),
        format!(r#"{{"auths":{{"{}":{{"auth":"{encoded}"}}}}}}"#, front.host),
    )
    .unwrap();
    let client = client(RegistryConfig {
        auth_file: Some(auth.path().to_owned()),
        ..RegistryConfig::default()
    });
    let stored = pull::pull(&store, &client, &reference, &mut |_| {}).unwrap();
    assert_eq!(stored.id.as_str(), image.config_digest);
    assert!(front.challenges.load(std::sync::atomic::Ordering::SeqCst) >= 1);
    assert_eq!(
        front.tokens.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "one token, reused for every blob"
    );
}

#[test]
fn docker_hub_names_are_fetched_from_a_mirror() {
    // Should the mirror fail, Docker Hub would be next: not from this test's namespace.
    if !image_support::isolate_network() {
        return;
    }
    let registry = Registry::start();
    let image = Image::new(vec![busybox_layer()], &["FROM_MIRROR=1"]);
    registry.push("openhpi/co_execenv_python", "3.8", &image);
    registry.push("library/busybox", "latest", &image);
    let (_state, store) = store();
    let client = client(RegistryConfig {
        mirrors: vec![registry.url()],
        ..RegistryConfig::default()
    });
    for name in ["openhpi/co_execenv_python:3.8", "busybox"] {
        let reference = Reference::parse(name).unwrap();
        let stored = pull::pull(&store, &client, &reference, &mut |_| {}).unwrap();
        assert_eq!(stored.env, ["FROM_MIRROR=1"]);
    }
    assert!(
        store
            .lookup("docker.io/library/busybox:latest")
            .unwrap()
            .is_some()
    );
}

#[test]
fn a_tampered_layer_is_refused_and_nothing_is_stored() {
    let registry = Registry::start();
    let mut image = Image::new(vec![busybox_layer()], &[]);
    // The config promises a different uncompressed layer than the blob holds.
    let other = image_support::Layer::builder().file("x", b"y").gzip();
    image = Image::new(
        vec![image_support::Layer {
            diff_id: other.diff_id.clone(),
            ..image.layers[0].clone()
        }],
        &[],
    );
    registry.push("bad/img", "1", &image);
    let (_state, store) = store();
    let reference = Reference::parse(&format!("{}/bad/img:1", registry.host)).unwrap();
    let err = pull::pull(
        &store,
        &client(RegistryConfig::default()),
        &reference,
        &mut |_| {},
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("(uncompressed): digest mismatch"),
        "{err}"
    );
    assert!(store.refs().unwrap().is_empty());
    assert_eq!(
        std::fs::read_dir(store.dir().join("rootfs"))
            .unwrap()
            .count(),
        0
    );
    assert_eq!(
        std::fs::read_dir(store.dir().join("tmp")).unwrap().count(),
        0
    );
}

fn poseidon_lite_base64(text: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(text)
}

#[test]
fn transient_failures_are_retried_and_blob_redirects_followed() {
    let registry = Registry::start();
    let image = Image::new(vec![busybox_layer()], &["FLAKY=1"]).with_index();
    registry.push("flaky/img", "1", &image);
    let front = TokenFront::flaky(registry.url());
    let (_state, store) = store();
    let reference = Reference::parse(&format!("{}/flaky/img:1", front.host)).unwrap();
    let stored = pull::pull(
        &store,
        &client(RegistryConfig::default()),
        &reference,
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(stored.env, ["FLAKY=1"]);
    let load = |n: &std::sync::atomic::AtomicU32| n.load(std::sync::atomic::Ordering::SeqCst);
    assert!(load(&front.failures) >= 3, "503s were answered and retried");
    assert!(
        load(&front.redirects) >= 2,
        "the config and the layer came through redirects"
    );
}

#[test]
fn https_registries_are_trusted_through_the_ca_file() {
    // The mirror is the only place the image is; Docker Hub would be next.
    if !image_support::isolate_network() {
        return;
    }
    let (registry, cert) = Registry::start_tls();
    assert!(registry.url().starts_with("https://"));
    registry.push(
        "course/tls",
        "1",
        &Image::new(vec![busybox_layer()], &["TLS=1"]),
    );
    let reference = Reference::parse("course/tls:1").unwrap();
    let mirrors = vec![registry.url()];
    let (_state, store) = store();
    let untrusted = client(RegistryConfig {
        mirrors: mirrors.clone(),
        ..RegistryConfig::default()
    });
    let err = pull::resolve(&untrusted, &reference).unwrap_err();
    assert!(
        matches!(err, Error::Registry(_)),
        "an unknown certificate is refused: {err:?}"
    );
    let trusted = client(RegistryConfig {
        mirrors,
        ca_file: Some(cert),
        ..RegistryConfig::default()
    });
    let stored = pull::pull(&store, &trusted, &reference, &mut |_| {}).unwrap();
    assert_eq!(stored.env, ["TLS=1"]);
}

#[test]
fn an_anonymous_token_challenge_is_answered_without_credentials() {
    let registry = Registry::start();
    registry.push(
        "public/img",
        "1",
        &Image::new(vec![busybox_layer()], &["PUBLIC=1"]),
    );
    let front = TokenFront::anonymous(registry.url());
    let (_state, store) = store();
    let reference = Reference::parse(&format!("{}/public/img:1", front.host)).unwrap();
    let stored = pull::pull(
        &store,
        &client(RegistryConfig::default()),
        &reference,
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(stored.env, ["PUBLIC=1"]);
    assert_eq!(front.tokens.load(std::sync::atomic::Ordering::SeqCst), 1);
}
