//! `image import` of every archive kind into the store, and the `image` commands of the binary
//! on a state directory: import from stdin, ls, rm (refused while an environment uses the
//! image).

mod image_support;

use std::{
    io::Write,
    path::Path,
    process::{Command, Stdio},
};

use image_support::{
    Image, Layer,
    archives::{containerd_save, docker_save, docker_save_oci, gzip, oci_layout, tar_of, zstd},
    build::busybox_layer,
};
use poseidon_lite::image::{Limits, Store, import};
use serde_json::json;

fn image(marker: &str) -> Image {
    let extra = Layer::builder()
        .file("etc/image-marker", marker.as_bytes())
        .plain();
    Image::oci(vec![busybox_layer(), extra], &["FROM=import"])
}

fn store() -> (tempfile::TempDir, Store) {
    let state = tempfile::tempdir().unwrap();
    let store = Store::open(state.path(), Limits::default()).unwrap();
    (state, store)
}

fn marker(store: &Store, name: &str) -> String {
    let (entry, _) = store
        .lookup(name)
        .unwrap()
        .unwrap_or_else(|| panic!("{name} not stored"));
    std::fs::read_to_string(store.rootfs(&entry.image).join("etc/image-marker")).unwrap()
}

#[test]
fn oci_layouts_as_directories_tars_and_compressed_tars() {
    let files = tempfile::tempdir().unwrap();
    let layout = files.path().join("layout");
    oci_layout(
        &layout,
        &image("oci\n"),
        json!({"io.containerd.image.name": "docker.io/course/oci:1"}),
    );
    let tar = tar_of(&layout);
    let (plain, gz, zst) = (
        files.path().join("a.tar"),
        files.path().join("a.tar.gz"),
        files.path().join("a.tar.zst"),
    );
    std::fs::write(&plain, &tar).unwrap();
    std::fs::write(&gz, gzip(&tar)).unwrap();
    std::fs::write(&zst, zstd(&tar)).unwrap();
    for (input, name) in [
        (&layout, None),
        (&plain, Some("course/plain:1")),
        (&gz, Some("course/gz:1")),
        (&zst, Some("course/zst:1")),
    ] {
        let (_state, store) = store();
        let imported = import::import(&store, input, name, &mut |_| {}).unwrap();
        let expected = name.map_or("docker.io/course/oci:1".to_owned(), |n| {
            format!("docker.io/{n}")
        });
        assert_eq!(
            imported.names,
            std::slice::from_ref(&expected),
            "{}",
            input.display()
        );
        assert_eq!(marker(&store, &expected), "oci\n");
        assert_eq!(imported.image.env, ["FROM=import"]);
        assert_eq!(
            std::fs::read_dir(store.dir().join("tmp")).unwrap().count(),
            0,
            "spool removed"
        );
    }
}

#[test]
fn docker_save_archives_of_every_generation() {
    let files = tempfile::tempdir().unwrap();
    let docker25 = files.path().join("docker25");
    docker_save_oci(&docker25, &image("docker25\n"), "course/hybrid:2");
    let containerd = files.path().join("containerd");
    containerd_save(
        &containerd,
        &image("containerd\n"),
        "docker.io/course/multi:3",
    );
    let cases: Vec<(Vec<u8>, &str, &str)> = vec![
        (
            docker_save(&image("legacy\n"), &["course/legacy:1"], false),
            "docker.io/course/legacy:1",
            "legacy\n",
        ),
        (
            docker_save(&image("podman\n"), &["localhost/course/podman:1"], true),
            "localhost/course/podman:1",
            "podman\n",
        ),
        (
            gzip(&tar_of(&docker25)),
            "docker.io/course/hybrid:2",
            "docker25\n",
        ),
    ];
    for (bytes, name, content) in cases {
        let (_state, store) = store();
        let path = files.path().join("save.tar");
        std::fs::write(&path, &bytes).unwrap();
        let imported = import::import(&store, &path, None, &mut |_| {}).unwrap();
        assert!(
            imported.names.contains(&name.to_owned()),
            "{:?}",
            imported.names
        );
        assert_eq!(marker(&store, name), content);
    }
}

#[test]
fn broken_archives_are_refused_clearly_and_store_nothing() {
    let files = tempfile::tempdir().unwrap();
    let (_state, store) = store();
    let junk = files.path().join("junk.tar");
    let mut builder = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_size(2);
    header.set_entry_type(tar::EntryType::Regular);
    builder
        .append_data(&mut header, "hello.txt", &b"hi"[..])
        .unwrap();
    std::fs::write(&junk, builder.into_inner().unwrap()).unwrap();
    let err = import::import(&store, &junk, Some("x:1"), &mut |_| {}).unwrap_err();
    assert!(
        err.to_string().contains("neither an OCI image layout"),
        "{err}"
    );
    assert!(err.to_string().contains("hello.txt"), "{err}");
    // A layer blob that does not match its digest.
    let layout = files.path().join("layout");
    let img = image("x\n");
    oci_layout(&layout, &img, json!({}));
    let blob = layout
        .join("blobs/sha256")
        .join(img.layers[1].digest.trim_start_matches("sha256:"));
    let mut bytes = std::fs::read(&blob).unwrap();
    bytes[600] ^= 1;
    std::fs::write(&blob, bytes).unwrap();
    let err = import::import(&store, &layout, Some("x:1"), &mut |_| {}).unwrap_err();
    assert!(err.to_string().contains("digest mismatch"), "{err}");
    let err = import::import(&store, &layout, None, &mut |_| {}).unwrap_err();
    assert!(
        err.to_string().contains("give --name") || err.to_string().contains("digest mismatch"),
        "{err}"
    );
    assert!(store.refs().unwrap().is_empty());
    assert_eq!(
        std::fs::read_dir(store.dir().join("rootfs"))
            .unwrap()
            .count(),
        0
    );
}

fn cli(state: &Path, args: &[&str], stdin: Option<&[u8]>) -> (bool, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_poseidon-lite"))
        .args(args)
        .arg("--state-dir")
        .arg(state)
        .env_clear()
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(bytes) = stdin {
        input.write_all(bytes).unwrap();
    }
    drop(input);
    let output = child.wait_with_output().unwrap();
    let text = |b: Vec<u8>| String::from_utf8_lossy(&b).into_owned();
    (
        output.status.success(),
        text(output.stdout),
        text(output.stderr),
    )
}

#[test]
fn the_image_commands_import_list_and_remove_unless_in_use() {
    let state = tempfile::tempdir().unwrap();
    let bytes = zstd(&docker_save(&image("cli\n"), &["course/cli:1"], false));
    let (ok, out, err) = cli(
        state.path(),
        &["image", "import", "-", "--name", "course/cli:7"],
        Some(&bytes),
    );
    assert!(ok, "{out}{err}");
    assert!(
        out.contains("imported") && out.contains("course/cli:7"),
        "{out}"
    );
    let (ok, out, _) = cli(state.path(), &["image", "ls"], None);
    assert!(ok);
    assert!(
        out.contains("course/cli:7") && out.contains("user(1001)"),
        "{out}"
    );
    // An environment (as the server writes it) naming the image keeps it.
    std::fs::create_dir_all(state.path().join("environments")).unwrap();
    let env = json!({"id": 4, "image": "docker.io/course/cli:7", "prewarmingPoolSize": 1, "cpuLimit": 0,
                     "memoryLimit": 0, "networkAccess": false, "exposedPorts": []});
    std::fs::write(state.path().join("environments/4.json"), env.to_string()).unwrap();
    let (ok, _, err) = cli(state.path(), &["image", "rm", "course/cli:7"], None);
    assert!(!ok);
    assert!(err.contains("used by environment(s) 4"), "{err}");
    std::fs::remove_file(state.path().join("environments/4.json")).unwrap();
    let (ok, out, err) = cli(state.path(), &["image", "rm", "course/cli:7"], None);
    assert!(ok, "{err}");
    assert!(out.contains("removed"));
    assert_eq!(
        std::fs::read_dir(state.path().join("images/rootfs"))
            .unwrap()
            .count(),
        0,
        "the image's files are gone"
    );
    let (ok, _, err) = cli(state.path(), &["image", "rm", "course/cli:7"], None);
    assert!(!ok && err.contains("no image course/cli:7"), "{err}");
}
