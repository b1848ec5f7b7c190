//! Registry images through the API with the sandbox executor: an environment PUT names an
//! image of a real registry (on loopback, in a network namespace of the test's own) and the
//! pool fills; commands see the image's files, its `Env` and its user; the image an environment
//! runs on survives restarts; missing images and unreachable registries are the PUT's error.

mod image_support;
mod support;

use std::time::Duration;

use image_support::{
    Image, Layer, Registry,
    archives::{docker_save, oci_layout, tar_of, zstd},
    build::busybox_layer,
    token::TokenFront,
};
use poseidon_lite::config::ExecutorKind;
use serde_json::json;
use support::TestServer;

fn server_in(
    state: tempfile::TempDir,
    adjust: impl FnOnce(&mut poseidon_lite::Config),
) -> TestServer {
    TestServer::start_in(state, |config| {
        config.runner.executor = ExecutorKind::Sandbox;
        config.images.offline = false;
        adjust(config);
    })
}

fn server(adjust: impl FnOnce(&mut poseidon_lite::Config)) -> TestServer {
    server_in(tempfile::tempdir().unwrap(), adjust)
}

fn put(server: &TestServer, id: u64, image: &str, pool: u32) -> support::Answer {
    let body = json!({"id": id, "image": image, "prewarmingPoolSize": pool, "cpuLimit": 20,
                      "memoryLimit": 256, "networkAccess": false, "exposedPorts": []});
    server.send("PUT", &format!("/execution-environments/{id}"), &body)
}

fn course_image(marker: &str) -> Image {
    let extra = Layer::builder()
        .file("etc/image-marker", marker.as_bytes())
        .gzip();
    Image::new(
        vec![busybox_layer(), extra],
        &["TERM=ansi", "IMAGE_VAR=from-image", "PATH=/bin"],
    )
    .with_index()
}

#[test]
fn a_registry_image_fills_the_pool_and_commands_see_its_files_env_and_user() {
    if !image_support::isolate_network() {
        return;
    }
    let registry = Registry::start();
    registry.push("openhpi/co_execenv_busybox", "1", &course_image("one\n"));
    let name = format!("{}/openhpi/co_execenv_busybox:1", registry.host);
    let server = server(|_| {});
    let answer = put(&server, 1, &name, 2);
    assert_eq!(answer.status, 201, "{}", answer.text());
    server.wait_idle(1, 2);
    let runner = server.runner(1, 0);
    let seen = server
        .run(
            &runner,
            "cat /etc/image-marker; echo $IMAGE_VAR $TERM; id -u; pwd",
        )
        .stdout;
    assert_eq!(seen, "one\r\nfrom-image ansi\r\n1001\r\n/workspace\r\n");
    let url = server.execute_with(
        &runner,
        &json!({"command": "id -u; echo $IMAGE_VAR", "privilegedExecution": true,
                                                   "environment": {"IMAGE_VAR": "from-request"}}),
    );
    assert_eq!(
        server.connect(&url).transcript().stdout,
        "0\r\nfrom-request\r\n"
    );
}

#[test]
fn layers_download_in_the_background_and_a_claim_waits_for_them() {
    if !image_support::isolate_network() {
        return;
    }
    let registry = Registry::start();
    let image = course_image("slow\n");
    registry.push("course/slow", "1", &image);
    let layers = image
        .layers
        .iter()
        .map(|layer| layer.digest.clone())
        .collect();
    let mut front = TokenFront::gated(registry.url(), layers);
    let name = format!("{}/course/slow:1", front.host);
    let server = server(|_| {});
    let answer = put(&server, 1, &name, 1);
    assert_eq!(
        answer.status,
        201,
        "the manifest resolves while the layers are held: {}",
        answer.text()
    );
    let stats = server.get("/statistics/execution-environments").json();
    assert_eq!(stats["1"]["idleRunners"], json!(0), "{stats}");
    std::thread::scope(|scope| {
        let claim = scope.spawn(|| server.runner(1, 0));
        // The claim is waiting for the image; let the layers through.
        std::thread::sleep(Duration::from_millis(200));
        assert!(
            !claim.is_finished(),
            "a claim waits for the image rather than failing"
        );
        front.open();
        let runner = claim.join().unwrap();
        assert_eq!(
            server.run(&runner, "cat /etc/image-marker").stdout,
            "slow\r\n"
        );
    });
    server.wait_idle(1, 1);
}

#[test]
fn missing_images_and_unreachable_registries_are_the_puts_error() {
    if !image_support::isolate_network() {
        return;
    }
    let registry = Registry::start();
    let server = server(|_| {});
    let answer = put(&server, 1, &format!("{}/no/such:1", registry.host), 1);
    assert_eq!(answer.status, 400, "{}", answer.text());
    assert!(
        answer.message().contains("no/such/manifests/1"),
        "{}",
        answer.message()
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let answer = put(&server, 2, &format!("127.0.0.1:{port}/x/y:1"), 1);
    assert_eq!(answer.status, 502, "{}", answer.text());
    assert!(
        answer.message().contains(&format!(
            "registry http://127.0.0.1:{port} cannot be reached"
        )),
        "{}",
        answer.message()
    );
    assert_eq!(
        server.get("/execution-environments/1").status,
        404,
        "nothing was created"
    );
    // Still healthy.
    assert_eq!(server.get("/health").status, 204);
}

#[test]
fn docker_hub_names_come_through_a_mirror_and_the_image_survives_restarts() {
    if !image_support::isolate_network() {
        return;
    }
    let registry = Registry::start();
    registry.push("openhpi/co_execenv_java", "17", &course_image("first\n"));
    let mirror = registry.url();
    let server = server(|config| config.images.registry_mirrors = vec![mirror.clone()]);
    assert_eq!(put(&server, 1, "openhpi/co_execenv_java:17", 1).status, 201);
    server.wait_idle(1, 1);
    let runner = server.runner(1, 0);
    assert_eq!(
        server.run(&runner, "cat /etc/image-marker").stdout,
        "first\r\n"
    );
    // The tag moves on; the environment keeps the image it was created with.
    registry.push("openhpi/co_execenv_java", "17", &course_image("second\n"));
    let state = server.stop();
    let server = server_in(state, |config| {
        config.images.registry_mirrors = vec![mirror.clone()]
    });
    server.wait_idle(1, 1);
    let runner = server.runner(1, 0);
    assert_eq!(
        server.run(&runner, "cat /etc/image-marker").stdout,
        "first\r\n"
    );
}

#[test]
fn an_image_home_symlink_cannot_make_the_server_create_host_directories() {
    if !image_support::isolate_network() {
        return;
    }
    let host = tempfile::tempdir().unwrap();
    let target = host.path().to_str().unwrap().to_owned();
    let hostile = Layer::builder()
        .file(
            "etc/passwd",
            b"root:x:0:0:root:/root:/bin/sh\nuser:x:1001:1001::/home/user:/bin/sh\n",
        )
        .symlink("home", &target)
        .symlink("workspace-link", &target)
        .gzip();
    let registry = Registry::start();
    registry.push(
        "evil/home",
        "1",
        &Image::new(vec![busybox_layer(), hostile], &[]),
    );
    let server = server(|_| {});
    assert_eq!(
        put(&server, 1, &format!("{}/evil/home:1", registry.host), 1).status,
        201
    );
    let runner = server.runner(1, 0);
    assert_eq!(server.run(&runner, "id -u").stdout, "1001\r\n");
    assert_eq!(
        std::fs::read_dir(host.path()).unwrap().count(),
        0,
        "nothing created on the host"
    );
}

#[test]
fn imported_images_are_used_by_name_on_an_offline_server() {
    if !image_support::isolate_network() {
        return;
    }
    let files = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let store = || {
        poseidon_lite::image::Store::open(state.path(), poseidon_lite::image::Limits::default())
            .unwrap()
    };
    // An OCI archive, imported before the server starts.
    let layout = files.path().join("layout");
    oci_layout(&layout, &course_image("oci archive\n"), json!({}));
    let archive = files.path().join("oci.tar");
    std::fs::write(&archive, tar_of(&layout)).unwrap();
    poseidon_lite::image::import::import(
        &store(),
        &archive,
        Some("openhpi/co_execenv_oci:1"),
        &mut |_| {},
    )
    .unwrap();
    let server = server_in(state, |config| config.images.offline = true);
    assert_eq!(put(&server, 1, "openhpi/co_execenv_oci:1", 1).status, 201);
    // A docker save archive, imported while the server runs.
    let saved = files.path().join("saved.tar.zst");
    std::fs::write(
        &saved,
        zstd(&docker_save(
            &course_image("docker save\n"),
            &["openhpi/co_execenv_saved:1"],
            false,
        )),
    )
    .unwrap();
    let store = poseidon_lite::image::Store::open(
        server.state.path(),
        poseidon_lite::image::Limits::default(),
    )
    .unwrap();
    poseidon_lite::image::import::import(&store, &saved, None, &mut |_| {}).unwrap();
    assert_eq!(put(&server, 2, "openhpi/co_execenv_saved:1", 1).status, 201);
    let unknown = put(&server, 3, "openhpi/co_execenv_missing:1", 1);
    assert_eq!(
        unknown.status, 400,
        "offline: an image not in the store is unknown"
    );
    for (env, content) in [(1, "oci archive"), (2, "docker save")] {
        server.wait_idle(env, 1);
        let runner = server.runner(env, 0);
        let seen = server
            .run(&runner, "cat /etc/image-marker; echo $IMAGE_VAR; id -u")
            .stdout;
        assert_eq!(seen, format!("{content}\r\nfrom-image\r\n1001\r\n"));
    }
}

#[test]
fn a_private_registry_behind_a_bearer_token_challenge_works_with_the_auth_file() {
    if !image_support::isolate_network() {
        return;
    }
    let registry = Registry::start();
    registry.push("private/course", "1", &course_image("private\n"));
    let front = TokenFront::start(registry.url());
    let auth = tempfile::NamedTempFile::new().unwrap();
    let credentials = format!(
        "{}:{}",
        image_support::token::USER,
        image_support::token::PASSWORD
    );
    let encoded = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, credentials);
    std::fs::write(
        auth.path(),
        format!(r#"{{"auths":{{"{}":{{"auth":"{encoded}"}}}}}}"#, front.host),
    )
    .unwrap();
    let name = format!("{}/private/course:1", front.host);
    let anonymous = server(|_| {});
    let refused = put(&anonymous, 1, &name, 1);
    assert_eq!(refused.status, 400, "{}", refused.text());
    assert!(
        refused
            .message()
            .contains("refused access to private/course"),
        "{}",
        refused.message()
    );
    let path = auth.path().to_owned();
    let server = server(move |config| config.images.auth_file = Some(path));
    assert_eq!(put(&server, 1, &name, 1).status, 201);
    server.wait_idle(1, 1);
    let runner = server.runner(1, 0);
    assert_eq!(
        server.run(&runner, "cat /etc/image-marker").stdout,
        "private\r\n"
    );
}

#[test]
fn a_hostile_image_fails_its_pull_and_leaves_the_host_and_the_server_alone() {
    if !image_support::isolate_network() {
        return;
    }
    let host = tempfile::tempdir().unwrap();
    std::fs::write(host.path().join("canary"), "host\n").unwrap();
    let target = host.path().to_str().unwrap().to_owned();
    // A symlink to the host, then a write through it in the next layer, then `..`.
    let first = Layer::builder().symlink("escape", &target).gzip();
    let second = Layer::builder()
        .file("escape/canary", b"pwned\n")
        .file("escape/new", b"x")
        .gzip();
    let third = Layer::builder()
        .file("../../../../../../tmp/pwned", b"x")
        .gzip();
    let registry = Registry::start();
    registry.push(
        "evil/escape",
        "1",
        &Image::new(vec![busybox_layer(), first, second, third], &[]),
    );
    let server = server(|_| {});
    let answer = put(&server, 1, &format!("{}/evil/escape:1", registry.host), 1);
    assert_eq!(
        answer.status,
        201,
        "the manifest is fine: {}",
        answer.text()
    );
    let claim = server.send(
        "POST",
        "/runners",
        &json!({"executionEnvironmentId": 1, "inactivityTimeout": 0}),
    );
    assert_eq!(claim.status, 400, "the pull failed: {}", claim.text());
    // The write through the planted link fails inside the image (its target does not exist
    // there); the `..` layer would have been refused.
    assert!(
        claim.message().contains("layer 3 of 4"),
        "{}",
        claim.message()
    );
    let stats = server.get("/statistics/execution-environments").json();
    assert_eq!(stats["1"]["idleRunners"], json!(0));
    assert_eq!(
        std::fs::read_to_string(host.path().join("canary")).unwrap(),
        "host\n"
    );
    assert_eq!(
        std::fs::read_dir(host.path()).unwrap().count(),
        1,
        "nothing created on the host"
    );
    assert!(!std::path::Path::new("/tmp/pwned").exists());
    assert_eq!(server.get("/health").status, 204);
    let images = server.state.path().join("images");
    assert_eq!(std::fs::read_dir(images.join("rootfs")).unwrap().count(), 0);
    assert_eq!(
        std::fs::read_dir(images.join("tmp")).unwrap().count(),
        0,
        "the staging directory is gone"
    );
}
