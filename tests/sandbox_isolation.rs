//! Isolation of sandbox runners from each other and from the host, images, and cleanup
//! (destroy, leftovers of a crashed server). Real sandboxes; skipped when not root.

mod support;

use std::{fs, path::Path, process::Stdio};

use poseidon_lite::{
    Error,
    executor::sandbox::SandboxExecutor,
    executor::{Executor, Outcome, RunnerSpec},
    id::{EnvironmentId, RunnerId},
};
use support::sandbox::*;

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
        "a\nb\n"
    );
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
        test.executor.check_image(EnvironmentId(1), "nope:latest"),
        Err(Error::UnknownImage(_))
    ));
    assert!(test.executor.check_image(EnvironmentId(1), "host").is_ok());
    let spec = RunnerSpec {
        environment: EnvironmentId(1),
        image: "nope".into(),
        cpu_limit: 0,
        memory_limit: 0,
        network_access: false,
        exposed_ports: Vec::new(),
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
        .check_image(EnvironmentId(1), "openhpi/co_execenv_test:1")
        .unwrap();
    let one = test.runner_with(|spec| spec.image = "openhpi/co_execenv_test:1".into());
    let two = test.runner_with(|spec| spec.image = "test-image".into());
    assert_eq!(run(&*one, "id -u; echo $HOME").stdout, "1001\n/home/user\n");
    // Image files are root's inside (idmapped), and root inside can change them privately.
    assert_eq!(
        run(&*one, "stat -c %u:%g /usr/bin/bash /etc/passwd").stdout,
        "0:0\n0:0\n"
    );
    let write = run_root(
        &*one,
        "echo changed > /etc/x && echo changed >> /etc/passwd && cat /etc/x",
    );
    assert_eq!(write.stdout, "changed\n", "{write:?}");
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

/// Reads the first of `files` that exists in the (only) runner's group of `controller` (v1:
/// `/sys/fs/cgroup/<controller>/<name>/<runner>`; v2: `/sys/fs/cgroup/<name>/<runner>`).
fn cgroup_file(test: &TestExecutor, controller: &str, files: &[&str]) -> String {
    for dir in test.cgroup_dirs() {
        let hierarchy = dir.parent().unwrap();
        if hierarchy != Path::new("/sys/fs/cgroup") && !hierarchy.ends_with(controller) {
            continue;
        }
        let group = fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .find(|e| e.path().is_dir())
            .unwrap();
        for file in files {
            if let Ok(text) = fs::read_to_string(group.path().join(file)) {
                return text.trim().to_owned();
            }
        }
    }
    panic!("no {files:?} for {controller}")
}

#[test]
fn limits_of_the_specification_reach_the_cgroup() {
    let Some(test) = TestExecutor::with(|config| {
        config.sandbox.cpu_hard_limit = true;
        config.sandbox.cpu_mhz = 2000;
        config.sandbox.pids_limit = 100;
    }) else {
        return;
    };
    let runner = test.runner_with(|spec| {
        spec.memory_limit = 64;
        spec.cpu_limit = 500;
    });
    let memory = cgroup_file(&test, "memory", &["memory.limit_in_bytes", "memory.max"]);
    assert_eq!(memory, (64u64 << 20).to_string());
    assert_eq!(cgroup_file(&test, "pids", &["pids.max"]), "100");
    let quota = cgroup_file(&test, "cpu", &["cpu.cfs_quota_us", "cpu.max"]);
    assert!(quota == "25000" || quota == "25000 100000", "{quota}");
    let weight = cgroup_file(&test, "cpu", &["cpu.shares", "cpu.weight"]);
    assert!(weight == "500" || weight == "20", "{weight}");
    runner.destroy();
    let defaulted = TestExecutor::with(|config| config.sandbox.default_memory_limit_mb = 128);
    let Some(defaulted) = defaulted else { return };
    let _runner = defaulted.runner();
    let memory = cgroup_file(
        &defaulted,
        "memory",
        &["memory.limit_in_bytes", "memory.max"],
    );
    assert_eq!(memory, (128u64 << 20).to_string());
}

#[test]
fn the_writable_layer_is_capped() {
    let Some(test) = TestExecutor::with(|config| config.sandbox.disk_limit_mb = 8) else {
        return;
    };
    let runner = test.runner();
    let full = run(&*runner, "head -c 20m /dev/zero > /tmp/big");
    assert_ne!(full.outcome, Outcome::Exited(0));
    assert!(full.stderr.contains("No space left on device"), "{full:?}");
    let workspace = run(&*runner, "rm /tmp/big; head -c 20m /dev/zero > big");
    assert!(
        workspace.stderr.contains("No space left on device"),
        "{workspace:?}"
    );
    assert_eq!(
        run(&*runner, "rm big; echo ok > small && cat small").stdout,
        "ok\n"
    );
}

#[test]
fn a_runner_without_a_memory_limit_gets_the_safe_default() {
    let Some(test) = TestExecutor::new() else {
        return;
    };
    let _runner = test.runner_with(|spec| spec.memory_limit = 0);
    let memory = cgroup_file(&test, "memory", &["memory.limit_in_bytes", "memory.max"]);
    let default = poseidon_lite::config::DEFAULT_MEMORY_LIMIT_MB;
    assert_eq!(memory, (default << 20).to_string());
}

#[test]
fn all_runners_together_have_a_process_limit() {
    let Some(test) = TestExecutor::new() else {
        return;
    };
    let pid_max: u64 = fs::read_to_string("/proc/sys/kernel/pid_max")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let pids_parent = test
        .cgroup_dirs()
        .into_iter()
        .find(|dir| dir.join("pids.max").exists())
        .expect("the executor's pids group");
    let total = fs::read_to_string(pids_parent.join("pids.max")).unwrap();
    assert_eq!(total.trim(), (pid_max / 2).to_string());
    drop(test);
    // A configured total holds for the runners together: two runners of 64 processes each
    // cannot have more than 40 between them.
    let Some(test) = TestExecutor::with(|config| {
        config.sandbox.pids_limit = 64;
        config.sandbox.total_pids_limit = 40;
    }) else {
        return;
    };
    let (one, two) = (test.runner(), test.runner());
    // perl's fork fails at once at the limit (bash's retries for half a minute).
    let hold = "perl -e 'for (1..30) { if (fork() == 0) { sleep 1000; exit } } \
                print qq(up\\n); sleep 1000'";
    let mut first = start(&*one, hold, false);
    first.wait_for_output("up");
    let count = "perl -e 'my $n = 0; for (1..30) { my $p = fork(); last unless defined $p; \
                 if ($p == 0) { sleep 1000; exit } $n++ } print $n'";
    let second = run(&*two, count);
    let started: u32 = second.stdout.trim().parse().unwrap_or(99);
    assert!(started < 30, "{second:?}");
    first.kill.kill();
}
