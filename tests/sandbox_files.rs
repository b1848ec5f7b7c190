//! File operations of sandbox runners: ownership and modes of copied files, errors, and
//! symlinks planted by learner code that must never lead to host files. Skipped when not root.

mod support;

use std::{fs, path::Path};

use poseidon_lite::{
    Error,
    executor::{FileEntry, FileUpdate, Outcome},
};
use serde_json::Value;
use support::sandbox::*;

#[test]
fn copied_files_are_root_owned_and_protected_from_the_user() {
    let Some(test) = TestExecutor::new() else {
        return;
    };
    let runner = test.runner();
    let entry = |path: &str, content: &[u8]| FileEntry {
        path: path.into(),
        content: content.to_vec(),
    };
    let update = FileUpdate {
        delete: vec!["./*".into()],
        copy: vec![
            entry("a.txt", b"hello"),
            entry("d/", b""),
            entry("d/b.txt", b"bee"),
        ],
    };
    runner.update_files(&update).unwrap();
    let files = listing(&*runner, "", false);
    let find = |name: &str| files.iter().find(|e| e["name"] == name).cloned().unwrap();
    let a = find("./a.txt");
    assert_eq!(
        (&a["entryType"], &a["permissions"], &a["owner"], &a["group"]),
        (
            &"-".into(),
            &"rwxr--r--".into(),
            &"root".into(),
            &"root".into()
        )
    );
    assert_eq!(a["size"], 5);
    let d = find("./d");
    assert_eq!(
        (&d["entryType"], &d["permissions"]),
        (&"d".into(), &"rwxrwxrwt".into())
    );
    assert_eq!(run(&*runner, "cat a.txt d/b.txt").stdout, "hellobee");
    for attempt in [
        "echo x > a.txt",
        "rm -f a.txt",
        "rm -f d/b.txt",
        "mv d/b.txt d/c.txt",
        "chmod 777 a.txt",
    ] {
        assert_ne!(
            run(&*runner, attempt).outcome,
            Outcome::Exited(0),
            "{attempt}"
        );
    }
    assert_eq!(
        run(&*runner, "echo new > d/new && cat d/new").stdout,
        "new\n"
    );
    assert_eq!(read(&*runner, "d/b.txt", false).unwrap(), "bee");
    runner
        .update_files(&FileUpdate {
            delete: vec!["./*".into()],
            copy: vec![],
        })
        .unwrap();
    assert!(listing(&*runner, "", false).is_empty());
}

#[test]
fn file_operations_report_missing_paths() {
    let Some(test) = TestExecutor::new() else {
        return;
    };
    let runner = test.runner();
    assert!(matches!(
        runner.list_files("missing", true, false),
        Err(Error::FileNotFound(_))
    ));
    assert!(matches!(
        runner.read_file("missing", false),
        Err(Error::FileNotFound(_))
    ));
    assert!(matches!(
        runner.read_file("/tmp", false),
        Err(Error::FileNotFound(_))
    ));
    let update = FileUpdate {
        delete: vec![],
        copy: vec![FileEntry {
            path: "/proc/1/environ".into(),
            content: b"x".to_vec(),
        }],
    };
    assert!(matches!(
        runner.update_files(&update),
        Err(Error::FileCopy(_))
    ));
}

#[test]
fn the_inits_environment_is_unreadable() {
    let Some(test) = TestExecutor::new() else {
        return;
    };
    let runner = test.runner();
    assert!(matches!(
        runner.read_file("/proc/1/environ", false),
        Err(Error::FileNotFound(_))
    ));
    assert!(matches!(
        runner.read_file("/proc/1/environ", true),
        Err(Error::FileNotFound(_))
    ));
    assert_ne!(
        run_root(&*runner, "cat /proc/1/environ").outcome,
        Outcome::Exited(0)
    );
}

#[test]
fn planted_symlinks_never_reach_host_files() {
    let Some(test) = TestExecutor::new() else {
        return;
    };
    let runner = test.runner();
    let name = unique("host-secret");
    let secret = Path::new("/tmp").join(&name);
    fs::write(&secret, "host secret").unwrap();
    let plant = format!(
        "ln -s {} s && ln -s / root && ln -s /etc/shadow shadow && ln -s /tmp t",
        secret.display()
    );
    assert_eq!(run(&*runner, &plant).outcome, Outcome::Exited(0));
    for path in [
        "s",
        "shadow",
        "root/etc/shadow",
        &format!("root/tmp/{name}"),
        &format!("t/{name}"),
        &format!("../../../tmp/{name}"),
    ] {
        for privileged in [false, true] {
            assert!(
                matches!(
                    read(&*runner, path, privileged),
                    Err(Error::FileNotFound(_))
                ),
                "{path}"
            );
        }
    }
    // Listings through the links show the runner's files, not the host's.
    let root: Vec<Value> = listing_with(&*runner, "root/", false, true);
    let names: Vec<&str> = root.iter().map(|e| e["name"].as_str().unwrap()).collect();
    assert!(
        names.contains(&"workspace") && names.contains(&"usr"),
        "{names:?}"
    );
    for host_only in [
        "work", "farm", "root", "var", "run", "opt", "srv", "mnt", "boot", "sys",
    ] {
        assert!(!names.contains(&host_only), "{names:?}");
    }
    assert!(
        !listing(&*runner, "t/", true)
            .iter()
            .any(|e| e["name"].as_str().unwrap().contains(&name))
    );
    // Writes and deletes through the links are refused (root-made changes never follow a link
    // in the workspace); the link `s` itself is replaced.
    let entry = |path: String| FileEntry {
        path,
        content: b"pwned".to_vec(),
    };
    let update = FileUpdate {
        delete: vec![format!("t/{name}"), format!("root/tmp/{name}")],
        copy: vec![
            entry("s".into()),
            entry(format!("t/{name}")),
            entry(format!("root/tmp/{name}-2")),
        ],
    };
    assert!(matches!(
        runner.update_files(&update),
        Err(Error::FileCopy(_))
    ));
    let escape = FileUpdate {
        delete: vec![],
        copy: vec![entry(format!("root/etc/{name}"))],
    };
    assert!(matches!(
        runner.update_files(&escape),
        Err(Error::FileCopy(_))
    ));
    assert_eq!(fs::read_to_string(&secret).unwrap(), "host secret");
    assert!(
        !Path::new(&format!("/tmp/{name}-2")).exists()
            && !Path::new(&format!("/etc/{name}")).exists()
    );
    // Nothing was written through the link into the runner's own /tmp either.
    assert!(read(&*runner, &format!("/tmp/{name}"), false).is_err());
    fs::remove_file(secret).unwrap();
}
