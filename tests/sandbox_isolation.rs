//! Isolation of sandbox runners from each other and from the host, file operations that
//! cannot escape, and cleanup (destroy, leftovers of a crashed server). Skipped when not root.

mod sandbox_support;

use std::{fs, path::Path, process::Stdio};

use poseidon_lite::{
    Error,
    executor::{Executor, FileEntry, FileUpdate, Outcome, Runner, RunnerSpec},
    id::{EnvironmentId, RunnerId},
    sandbox::SandboxExecutor,
};
use sandbox_support::*;
use serde_json::Value;

/// A name no other test (or host file) uses.
fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    )
}

fn listing(runner: &dyn Runner, path: &str, privileged: bool) -> Vec<Value> {
    listing_with(runner, path, true, privileged)
}

fn listing_with(runner: &dyn Runner, path: &str, recursive: bool, privileged: bool) -> Vec<Value> {
    let mut body = String::new();
    runner
        .list_files(path, recursive, privileged)
        .unwrap()
        .read_to_string(&mut body)
        .unwrap();
    let value: Value = serde_json::from_str(&body).unwrap();
    value["files"].as_array().unwrap().clone()
}

fn read(runner: &dyn Runner, path: &str, privileged: bool) -> Result<String, Error> {
    let mut content = runner.read_file(path, privileged)?;
    let mut text = String::new();
    content.reader.read_to_string(&mut text).unwrap();
    assert_eq!(text.len() as u64, content.length);
    Ok(text)
}

use std::io::Read;

#[test]
fn runners_cannot_see_each_others_files_or_processes() {
    let Some(test) = TestExecutor::new() else {
        return;
    };
    let (one, two) = (test.runner(), test.runner());
    let name = unique("secret");
    assert_eq!(
        run(&*one, &format!("echo s > /tmp/{name}")).outcome,
        Outcome::Exited(0)
    );
    let mut sleeper = start(&*one, "echo up; exec sleep 1234", false);
    sleeper.wait_for_output("up");
    assert_ne!(
        run(&*two, &format!("cat /tmp/{name}")).outcome,
        Outcome::Exited(0)
    );
    let all = run_root(
        &*two,
        "cat /proc/[0-9]*/cmdline | tr '\\0' ' '; ls -d /proc/[0-9]*",
    );
    assert!(!all.stdout.contains("1234"), "{all:?}");
    assert!(
        !listing(&*two, "/tmp", true)
            .iter()
            .any(|e| e["name"].as_str().unwrap().contains(&name))
    );
    sleeper.kill.kill();
    assert_eq!(sleeper.wait(), Outcome::Lost);
}

#[test]
fn writes_outside_the_workspace_stay_in_the_runner() {
    let Some(test) = TestExecutor::new() else {
        return;
    };
    let (one, two) = (test.runner(), test.runner());
    let name = unique("leak");
    let user = run(&*one, &format!("echo a > /tmp/{name} && echo a > ~/{name}"));
    assert_eq!(user.outcome, Outcome::Exited(0), "{user:?}");
    let root = run_root(&*one, &format!("echo b > /{name} && mkdir /home/{name}"));
    assert_eq!(root.outcome, Outcome::Exited(0), "{root:?}");
    // The host image's /etc belongs to an unmapped uid: even root inside cannot write it.
    assert_ne!(
        run_root(&*one, &format!("echo c > /etc/{name}")).outcome,
        Outcome::Exited(0)
    );
    let paths = [
        format!("/tmp/{name}"),
        format!("/{name}"),
        format!("/home/{name}"),
        format!("/etc/{name}"),
    ];
    for path in &paths {
        assert!(!Path::new(path).exists(), "{path} leaked to the host");
        assert_ne!(
            run_root(&*two, &format!("test -e {path}")).outcome,
            Outcome::Exited(0),
            "{path}"
        );
    }
    assert_eq!(
        run(&*one, &format!("cat /tmp/{name} /{name}")).stdout,
        "a\r\nb\r\n"
    );
}

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
        "new\r\n"
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
    // Writes and deletes through the links stay inside too.
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
    runner.update_files(&update).unwrap();
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
    assert_eq!(
        read(&*runner, &format!("/tmp/{name}"), false).unwrap(),
        "pwned"
    );
    fs::remove_file(secret).unwrap();
}

#[test]
fn destroy_leaves_no_processes_cgroups_or_directories() {
    let Some(test) = TestExecutor::new() else {
        return;
    };
    let runner = test.runner();
    let mut daemon = start(&*runner, "setsid sleep 1000 & echo up; sleep 1000", true);
    daemon.wait_for_output("up");
    assert!(!test.leftovers().is_empty() && !test.processes_in_uid_ranges().is_empty());
    runner.destroy();
    assert_eq!(test.leftovers(), Vec::<String>::new());
    assert_eq!(test.processes_in_uid_ranges(), Vec::<u32>::new());
    assert_eq!(daemon.wait(), Outcome::Lost);
}

#[test]
fn leftovers_of_a_crashed_server_are_removed() {
    let Some(test) = TestExecutor::new() else {
        return;
    };
    // A runner whose server "crashed": its launcher is killed, nothing is destroyed.
    let crashed = test.runner();
    let mut sleeper = start(&*crashed, "echo up; sleep 1000", false);
    sleeper.wait_for_output("up");
    let me = std::process::id().to_string();
    let launcher = test.runner_pids().into_iter().find(|pid| {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        stat.rsplit(')')
            .next()
            .and_then(|rest| rest.split_whitespace().nth(1))
            == Some(me.as_str())
    });
    std::mem::forget(crashed);
    let launcher = rustix::process::Pid::from_raw(launcher.unwrap() as i32).unwrap();
    rustix::process::kill_process(launcher, rustix::process::Signal::KILL).unwrap();
    // Reaped here as init would reap it after a real crash.
    rustix::process::waitpid(Some(launcher), rustix::process::WaitOptions::empty()).unwrap();
    // The runner's processes die with their launcher (parent death signal).
    assert_eq!(sleeper.wait(), Outcome::Lost);
    // A group with a live process in it and a directory, as a crash might leave them.
    let fake = RunnerId::new(EnvironmentId(9));
    let mut stray = std::process::Command::new("sleep")
        .arg("1000")
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    for dir in test.cgroup_dirs() {
        fs::create_dir(dir.join(fake.as_str())).unwrap();
        fs::write(
            dir.join(fake.as_str()).join("cgroup.procs"),
            stray.id().to_string(),
        )
        .unwrap();
    }
    fs::create_dir(test.state.join("sandbox").join(fake.as_str())).unwrap();
    assert!(test.leftovers().len() >= 2 * (test.cgroup_dirs().len() + 1) - 1);
    // A new server removes them all.
    let restarted = SandboxExecutor::new(&test.config).unwrap();
    restarted.remove_leftovers(&[]);
    assert_eq!(test.leftovers(), Vec::<String>::new());
    assert!(
        stray.wait().unwrap().code().is_none(),
        "the stray process was killed"
    );
    assert!(eventually(|| test.processes_in_uid_ranges().is_empty()));
}

#[test]
fn unknown_images_are_refused() {
    let Some(test) = TestExecutor::new() else {
        return;
    };
    assert!(matches!(
        test.executor.check_image("nope:latest"),
        Err(Error::UnknownImage(_))
    ));
    assert!(test.executor.check_image("host").is_ok());
    let spec = RunnerSpec {
        environment: EnvironmentId(1),
        image: "nope".into(),
        cpu_limit: 0,
        memory_limit: 0,
        network_access: false,
    };
    assert!(matches!(
        test.executor
            .create(&RunnerId::new(EnvironmentId(1)), &spec),
        Err(Error::UnknownImage(_))
    ));
    assert_eq!(test.leftovers(), Vec::<String>::new());
}

/// Builds a small root file system image from host binaries (hard links) and their libraries,
/// with its own `/etc/passwd` whose `user` has uid 1001.
fn build_image(dir: &Path) {
    for link in ["bin", "sbin", "lib", "lib64"] {
        std::os::unix::fs::symlink(format!("usr/{link}"), dir.join(link)).unwrap();
    }
    fs::create_dir_all(dir.join("etc")).unwrap();
    fs::write(
        dir.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/bash\nuser:x:1001:1001::/home/user:/bin/bash\n",
    )
    .unwrap();
    fs::write(dir.join("etc/group"), "root:x:0:\nuser:x:1001:\n").unwrap();
    for tool in [
        "bash", "sh", "id", "cat", "ls", "echo", "touch", "true", "stat", "rm", "mkdir", "sleep",
        "env", "test",
    ] {
        let path = Path::new("/usr/bin").join(tool);
        install(dir, &path);
        let ldd = std::process::Command::new("ldd")
            .arg(&path)
            .output()
            .unwrap();
        for line in String::from_utf8_lossy(&ldd.stdout).lines() {
            if let Some(lib) = line.split_whitespace().find(|word| word.starts_with('/')) {
                install(dir, Path::new(lib));
            }
        }
    }
}

/// Copies a host path into the image: directories created, symlinks recreated (and followed),
/// files hard-linked.
fn install(image: &Path, path: &Path) {
    let mut current = std::path::PathBuf::from("/");
    let components: Vec<_> = path.components().skip(1).collect();
    for (index, component) in components.iter().enumerate() {
        current.push(component);
        let dest = image.join(current.strip_prefix("/").unwrap());
        let meta = fs::symlink_metadata(&current).unwrap();
        if meta.file_type().is_symlink() {
            let target = fs::read_link(&current).unwrap();
            if fs::symlink_metadata(&dest).is_err() {
                fs::create_dir_all(dest.parent().unwrap()).unwrap();
                std::os::unix::fs::symlink(&target, &dest).unwrap();
            }
            let mut resolved = current.parent().unwrap().join(target);
            resolved.extend(&components[index + 1..]);
            return install(image, &resolved);
        } else if meta.is_dir() {
            fs::create_dir_all(&dest).unwrap();
        } else if fs::symlink_metadata(&dest).is_err() {
            fs::hard_link(&current, &dest).unwrap();
        }
    }
}

#[test]
fn directory_images_are_idmapped_and_their_layer_is_private() {
    let images = std::env::temp_dir().join(unique("images"));
    let image = images.join("test-image");
    let Some(test) = TestExecutor::with(|config| {
        config.sandbox.images_dir = Some(images.clone());
        config
            .sandbox
            .images
            .insert("openhpi/co_execenv_test:1".into(), "test-image".into());
    }) else {
        return;
    };
    fs::create_dir_all(&image).unwrap();
    build_image(&image);
    test.executor
        .check_image("openhpi/co_execenv_test:1")
        .unwrap();
    let one = test.runner_with(|spec| spec.image = "openhpi/co_execenv_test:1".into());
    let two = test.runner_with(|spec| spec.image = "test-image".into());
    assert_eq!(
        run(&*one, "id -u; echo $HOME").stdout,
        "1001\r\n/home/user\r\n"
    );
    // Image files are root's inside (idmapped), and root inside can change them privately.
    assert_eq!(
        run(&*one, "stat -c %u:%g /usr/bin/bash /etc/passwd").stdout,
        "0:0\r\n0:0\r\n"
    );
    let write = run_root(
        &*one,
        "echo changed > /etc/x && echo changed >> /etc/passwd && cat /etc/x",
    );
    assert_eq!(write.stdout, "changed\r\n", "{write:?}");
    assert_ne!(run(&*one, "echo user > /etc/y").outcome, Outcome::Exited(0));
    assert_ne!(
        run_root(&*two, "test -e /etc/x").outcome,
        Outcome::Exited(0)
    );
    assert!(!image.join("etc/x").exists() && !Path::new("/etc/x").exists());
    assert!(
        !fs::read_to_string(image.join("etc/passwd"))
            .unwrap()
            .contains("changed")
    );
    drop((one, two));
    drop(test);
    fs::remove_dir_all(images).unwrap();
}
