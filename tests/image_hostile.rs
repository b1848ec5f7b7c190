//! Hostile layers: unpacking never creates, changes or reveals anything outside the image's
//! own directory, and bombs hit the configured bounds with a clear error. Each case runs against
//! a fresh root beside a host "canary" directory whose listing must not change.

mod image_support;

use std::{
    collections::BTreeMap,
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
};

use image_support::{Layer, build::LayerBuilder};
use poseidon_lite::image::{Digest, Limits, inroot::Root, unpack::Unpacker};
use tar::EntryType;

struct Host {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    outside: PathBuf,
}

impl Host {
    fn new() -> Host {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        let outside = tmp.path().join("outside");
        std::fs::create_dir(&root).unwrap();
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("canary"), "host file\n").unwrap();
        std::fs::set_permissions(&outside, std::fs::Permissions::from_mode(0o755)).unwrap();
        Host {
            _tmp: tmp,
            root,
            outside,
        }
    }

    /// Everything about the outside tree that an escape could change.
    fn listing(&self) -> BTreeMap<PathBuf, (u32, u64, i64, u64, Vec<u8>)> {
        let mut out = BTreeMap::new();
        let mut stack = vec![self.outside.clone()];
        while let Some(dir) = stack.pop() {
            let meta = std::fs::symlink_metadata(&dir).unwrap();
            out.insert(
                dir.clone(),
                (
                    meta.mode(),
                    meta.len(),
                    meta.mtime(),
                    meta.nlink(),
                    Vec::new(),
                ),
            );
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                let meta = std::fs::symlink_metadata(&path).unwrap();
                if meta.is_dir() {
                    stack.push(path);
                } else {
                    let content = std::fs::read(&path).unwrap_or_default();
                    out.insert(
                        path,
                        (meta.mode(), meta.len(), meta.mtime(), meta.nlink(), content),
                    );
                }
            }
        }
        out
    }

    fn apply(&self, layers: &[Layer], limits: &Limits) -> Result<(), String> {
        let root = Root::open(&self.root).unwrap();
        let mut unpacker = Unpacker::new(&root, limits);
        for layer in layers {
            let diff_id = Digest::parse(&layer.diff_id).unwrap();
            unpacker
                .apply(&layer.blob[..], &diff_id, "layer")
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Applies `layers` and checks that the outside is untouched; returns the outcome.
    fn check(&self, layers: &[Layer]) -> Result<(), String> {
        self.check_with(layers, &Limits::default())
    }

    fn check_with(&self, layers: &[Layer], limits: &Limits) -> Result<(), String> {
        let before = self.listing();
        let result = self.apply(layers, limits);
        assert_eq!(
            self.listing(),
            before,
            "the host outside the root changed: {result:?}"
        );
        result
    }

    fn out(&self) -> &str {
        self.outside.to_str().unwrap()
    }

    /// `../` enough times to climb from the root to `/`, then the outside path.
    fn relative_out(&self) -> String {
        let depth = self.root.components().count();
        format!(
            "{}{}",
            "../".repeat(depth + 2),
            self.out().trim_start_matches('/')
        )
    }
}

fn layer() -> LayerBuilder {
    Layer::builder()
}

#[test]
fn dotdot_names_are_refused_and_absolute_names_stay_inside() {
    let host = Host::new();
    let err = host
        .check(&[layer().file("../../outside/pwned", b"x").gzip()])
        .unwrap_err();
    assert!(err.contains("contains .."), "{err}");
    let absolute = format!("{}/pwned", host.out());
    host.check(&[layer().file(&absolute, b"x").gzip()]).unwrap();
    assert!(
        host.root.join(absolute.trim_start_matches('/')).is_file(),
        "created inside the root"
    );
}

#[test]
fn writes_through_planted_symlinks_stay_inside() {
    let host = Host::new();
    for target in [host.out().to_owned(), host.relative_out()] {
        // Same layer.
        let result = host.check(&[layer()
            .symlink("esc", &target)
            .file("esc/pwned", b"x")
            .gzip()]);
        assert!(result.is_err() || !host.outside.join("pwned").exists());
        // Across layers, also as a directory.
        let first = layer().symlink("esc2", &target).gzip();
        let second = layer()
            .file("esc2/pwned", b"x")
            .dir("esc2/sub/", 0o777)
            .gzip();
        let _ = host.check(&[first, second]);
        // A symlink to a host file, then a regular file of that name: the link is replaced.
        host.check(&[
            layer()
                .symlink("victim", &format!("{target}/canary"))
                .gzip(),
            layer().file("victim", b"image file").gzip(),
        ])
        .unwrap();
        assert_eq!(
            std::fs::read(host.root.join("victim")).unwrap(),
            b"image file"
        );
        // Symlink-directory collision: a directory entry replaces the link, never chmods the host.
        host.check(&[layer().symlink("vd", &target).dir("vd/", 0o777).gzip()])
            .unwrap();
        assert!(
            std::fs::symlink_metadata(host.root.join("vd"))
                .unwrap()
                .is_dir()
        );
    }
}

#[test]
fn hardlinks_never_reach_outside() {
    let host = Host::new();
    let err = host
        .check(&[layer().hardlink("hl", "../../outside/canary").gzip()])
        .unwrap_err();
    assert!(err.contains("contains .."), "{err}");
    host.check(&[layer()
        .hardlink("hl", &format!("{}/canary", host.out()))
        .gzip()])
        .unwrap_err();
    host.check(&[layer()
        .symlink("s", host.out())
        .hardlink("hl", "s/canary")
        .gzip()])
        .unwrap_err();
    assert_eq!(
        std::fs::metadata(host.outside.join("canary"))
            .unwrap()
            .nlink(),
        1
    );
    // A link to a file of the image works, also across layers.
    host.check(&[
        layer().file("a", b"1").gzip(),
        layer().hardlink("b", "a").gzip(),
    ])
    .unwrap();
    assert_eq!(std::fs::metadata(host.root.join("b")).unwrap().nlink(), 2);
}

#[test]
fn device_nodes_are_skipped() {
    let host = Host::new();
    host.check(&[layer()
        .dir("dev/", 0o755)
        .entry(EntryType::Char, "dev/mem", 0o666, (0, 0), "", b"")
        .entry(EntryType::Block, "dev/sda", 0o666, (0, 0), "", b"")
        .gzip()])
        .unwrap();
    assert!(!host.root.join("dev/mem").exists());
    assert!(!host.root.join("dev/sda").exists());
}

#[test]
fn whiteouts_cannot_reach_outside_and_honour_layers() {
    let host = Host::new();
    let err = host
        .check(&[layer().file(".wh...", b"").gzip()])
        .unwrap_err();
    assert!(err.contains("invalid whiteout"), "{err}");
    host.check(&[layer().file("etc/.wh.", b"").gzip()])
        .unwrap_err();
    host.check(&[layer()
        .symlink("s2", host.out())
        .file("s2/.wh.canary", b"")
        .gzip()])
        .unwrap();
    // Whiteouts and opaque directories remove lower content only.
    host.check(&[
        layer()
            .file("d/old", b"1")
            .file("d/keep", b"1")
            .file("gone", b"1")
            .file("o/lower", b"1")
            .gzip(),
        layer()
            .file("d/.wh.old", b"")
            .file(".wh.gone", b"")
            .file("o/new", b"2")
            .file("o/.wh..wh..opq", b"")
            .gzip(),
    ])
    .unwrap();
    assert!(!host.root.join("d/old").exists());
    assert!(host.root.join("d/keep").exists());
    assert!(!host.root.join("gone").exists());
    assert!(!host.root.join("o/lower").exists());
    assert!(
        host.root.join("o/new").exists(),
        "an opaque marker keeps this layer's own entries"
    );
}

#[test]
fn the_root_entry_must_be_a_directory() {
    let host = Host::new();
    let err = host
        .check(&[layer().symlink(".", host.out()).file("pwned", b"x").gzip()])
        .unwrap_err();
    assert!(err.contains("the root entry is not a directory"), "{err}");
    host.check(&[layer().dir("./", 0o755).file("fine", b"x").gzip()])
        .unwrap();
}

#[test]
fn bombs_hit_the_bounds_with_clear_errors() {
    let host = Host::new();
    let small = Limits {
        max_unpacked_bytes: 1 << 20,
        max_entries: 10,
        max_path: 200,
        max_header: 4096,
    };

    let bomb = layer().file("zeros", &vec![0; 4 << 20]).gzip();
    assert!(bomb.blob.len() < 64 << 10, "a real bomb: small compressed");
    let err = host.check_with(&[bomb], &small).unwrap_err();
    assert!(
        err.contains("unpacked image size exceeds the limit of 1048576 bytes"),
        "{err}"
    );

    let mut many = layer();
    for i in 0..20 {
        many = many.file(&format!("f{i}"), b"");
    }
    let err = host.check_with(&[many.gzip()], &small).unwrap_err();
    assert!(err.contains("more than 10 entries"), "{err}");

    let err = host
        .check_with(
            &[layer()
                .file(&"a/".repeat(49).to_string(), b"")
                .file(&format!("{}x", "b".repeat(99)), b"")
                .gzip()],
            &Limits {
                max_path: 50,
                ..small.clone()
            },
        )
        .unwrap_err();
    assert!(err.contains("exceeds the limit of 50"), "{err}");

    // A GNU sparse entry claiming an enormous real size.
    let mut sparse = tar::Header::new_gnu();
    sparse.set_path("sparse").unwrap();
    sparse.set_entry_type(EntryType::GNUSparse);
    sparse.set_size(0);
    let gnu = sparse.as_gnu_mut().unwrap();
    gnu.set_real_size(1 << 50);
    gnu.sparse[0].set_offset(1 << 50);
    gnu.sparse[0].set_length(0);
    sparse.set_cksum();
    let err = host
        .check_with(&[layer().raw(sparse.as_bytes()).gzip()], &small)
        .unwrap_err();
    assert!(err.contains("unsupported tar entry type"), "{err}");

    // An endless PAX header: 1 GiB announced, a few kilobytes compressed.
    for kind in [EntryType::XHeader, EntryType::GNULongName] {
        let mut pax = tar::Header::new_ustar();
        pax.set_path("PaxHeaders/x").unwrap();
        pax.set_entry_type(kind);
        pax.set_size(1 << 30);
        pax.set_cksum();
        let endless = layer().raw(pax.as_bytes()).raw(&vec![b'a'; 1 << 20]).gzip();
        let err = host.check_with(&[endless], &small).unwrap_err();
        assert!(
            err.contains(
                "tar extension header of 1073741824 bytes exceeds the limit of 4096 bytes"
            ),
            "{err}"
        );
    }
}

#[test]
fn owners_modes_and_setuid_survive() {
    let host = Host::new();
    host.check(&[layer()
        .file_owned("bin/su", b"x", 0o4755, (0, 0))
        .file_owned("home/user/f", b"x", 0o600, (1001, 1001))
        .file_owned("huge-id", b"x", 0o644, (70000, 70000))
        .gzip()])
        .unwrap();
    let meta = |p: &str| std::fs::metadata(host.root.join(p)).unwrap();
    assert_eq!(meta("bin/su").mode() & 0o7777, 0o4755);
    assert_eq!(
        (meta("home/user/f").uid(), meta("home/user/f").gid()),
        (1001, 1001)
    );
    assert_eq!(meta("huge-id").uid(), 65534);
    assert!(Path::new(&host.root).join("bin").is_dir());
}
