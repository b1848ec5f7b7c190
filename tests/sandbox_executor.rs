//! The sandbox executor driven through the executor traits: executions (terminal, stderr,
//! exit codes, users, limits, killing). Real sandboxes, no mocks; skipped when not root.

mod support;

use std::{
    io::ErrorKind,
    net::TcpListener,
    os::{linux::net::SocketAddrExt, unix::net::UnixListener},
};

use poseidon_lite::{
    Error,
    executor::{Command, Outcome},
};
use support::sandbox::*;

#[test]
fn true_exits_zero() {
    let Some(test) = TestExecutor::new() else {
        return;
    };
    let runner = test.runner();
    let done = run(&*runner, "true");
    assert_eq!(done.outcome, Outcome::Exited(0), "{done:?}");
}

#[test]
fn input_is_echoed_and_read_through_the_terminal() {
    let Some(test) = TestExecutor::new() else {
        return;
    };
    let runner = test.runner();
    let head = run_with(&*runner, "head -n 1", false, b"Hello World!\n");
    assert_eq!(head.outcome, Outcome::Exited(0));
    assert_eq!(head.stdout.matches("Hello World!\n").count(), 2, "{head:?}");
    let tty = run(
        &*runner,
        "test -t 0 && test -t 1 && ! test -t 2 && echo tty",
    );
    assert_eq!(tty.stdout, "tty\n");
}

#[test]
fn stderr_is_separate_from_stdout() {
    let Some(test) = TestExecutor::new() else {
        return;
    };
    let runner = test.runner();
    let both = run(&*runner, "echo out; echo err >&2");
    assert_eq!(
        (both.stdout.as_str(), both.stderr.as_str()),
        ("out\n", "err\n")
    );
}

#[test]
fn exit_codes_and_signals_are_reported() {
    let Some(test) = TestExecutor::new() else {
        return;
    };
    let runner = test.runner();
    assert_eq!(run(&*runner, "exit 42").outcome, Outcome::Exited(42));
    assert_eq!(run(&*runner, "kill -TERM $$").outcome, Outcome::Exited(143));
    // Without an OOM kill, SIGKILL is just 137.
    assert_eq!(run(&*runner, "kill -KILL $$").outcome, Outcome::Exited(137));
}

#[test]
fn commands_get_a_clean_environment_and_argv() {
    let Some(test) = TestExecutor::new() else {
        return;
    };
    let runner = test.runner();
    let command = Command {
        command: "echo \"$CODEOCEAN $GREETING $PWD $LANG\"\nprintf '%s\\n' \"tab\there\"".into(),
        environment: vec![("GREETING".into(), "hi there".into())],
        privileged: false,
    };
    let mut process = runner.execute(&command).unwrap();
    let stdout = read_all(std::fs::File::from(process.pty));
    assert!(wait_readable(process.exit.fd(), TIMEOUT));
    assert_eq!(process.exit.outcome().unwrap(), Some(Outcome::Exited(0)));
    let stdout = stdout.recv_timeout(TIMEOUT).unwrap();
    assert_eq!(stdout, "true hi there /workspace C.UTF-8\ntab\there\n");
    let env = run(&*runner, "env").stdout;
    assert!(!env.contains("POSEIDON") && !env.contains("CARGO"), "{env}");
}

#[test]
fn commands_run_as_the_unprivileged_user_unless_privileged() {
    let Some(test) = TestExecutor::new() else {
        return;
    };
    let runner = test.runner();
    assert_eq!(
        run(&*runner, "id -u; echo $HOME").stdout,
        "1000\n/home/user\n"
    );
    assert_eq!(run_root(&*runner, "id -u; echo $HOME").stdout, "0\n/root\n");
    // On the host, no process of the runner is root: not the command, the agent or its
    // launcher, also while a privileged command runs.
    let mut sleeping = start(&*runner, "echo started; exec sleep 1000", true);
    sleeping.wait_for_output("started");
    let pids = test.runner_pids();
    assert!(
        pids.len() >= 3,
        "launcher, init, reaper and command: {pids:?}"
    );
    for pid in pids {
        let uids = host_uids(pid);
        assert!(
            !uids.is_empty() && !uids.contains(&0),
            "pid {pid} has host uids {uids:?}"
        );
    }
    sleeping.kill.kill();
    assert_eq!(sleeping.wait(), Outcome::Lost);
}

#[test]
fn the_network_is_unreachable() {
    let Some(test) = TestExecutor::new() else {
        return;
    };
    let runner = test.runner();
    let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
    tcp.set_nonblocking(true).unwrap();
    let port = tcp.local_addr().unwrap().port();
    let tcp_run = run(&*runner, &format!("echo hi > /dev/tcp/127.0.0.1/{port}"));
    assert_ne!(tcp_run.outcome, Outcome::Exited(0), "{tcp_run:?}");
    assert_eq!(tcp.accept().unwrap_err().kind(), ErrorKind::WouldBlock);
    // An abstract unix socket of the host: reachable from the host, not from the runner.
    let name = format!("poseidon-lite-test-{}", std::process::id());
    let address = std::os::unix::net::SocketAddr::from_abstract_name(&name).unwrap();
    let _unix = UnixListener::bind_addr(&address).unwrap();
    std::os::unix::net::UnixStream::connect_addr(&address).unwrap();
    let connect = format!(
        "perl -e 'use Socket; socket(S, PF_UNIX, SOCK_STREAM, 0) or exit 2; \
         connect(S, pack_sockaddr_un(\"\\0{name}\")) or exit 3; exit 0'"
    );
    assert_eq!(run_root(&*runner, &connect).outcome, Outcome::Exited(3));
    assert_eq!(
        run(
            &*runner,
            "ls /sys/class/net 2>/dev/null; cat /proc/net/dev | grep -c :"
        )
        .stdout,
        "1\n"
    );
}

#[test]
fn exceeding_the_memory_limit_is_an_oom_kill_and_the_runner_survives() {
    let Some(test) = TestExecutor::new() else {
        return;
    };
    let runner = test.runner_with(|spec| spec.memory_limit = 64);
    let hog = run(&*runner, "head -c 512m /dev/zero | tail");
    assert_eq!(hog.outcome, Outcome::OomKilled, "{hog:?}");
    assert_eq!(
        run_with(&*runner, "true", false, b"").outcome,
        Outcome::Exited(0)
    );
}

#[test]
fn a_fork_bomb_is_contained() {
    let Some(test) = TestExecutor::with(|config| config.sandbox.pids_limit = 64) else {
        return;
    };
    let runner = test.runner();
    let other = test.runner();
    // Every process forks forever (the foreground call recurses), bounded only by the limit.
    let mut bomb = start(
        &*runner,
        "bomb() { bomb & bomb; }; echo bombed; bomb",
        false,
    );
    bomb.wait_for_output("bombed");
    // The bomb reaches the limit; other runners are not affected.
    assert!(
        eventually(|| test.runner_pids().len() >= 64),
        "the bomb never filled its limit"
    );
    assert_eq!(run(&*other, "true").outcome, Outcome::Exited(0));
    bomb.kill.kill();
    assert_eq!(bomb.wait(), Outcome::Lost);
    // Once the bomb's processes are gone, its runner works again.
    assert!(eventually(|| {
        runner
            .execute(&Command {
                command: "true".into(),
                environment: vec![],
                privileged: false,
            })
            .is_ok()
    }));
    assert_eq!(run(&*runner, "true").outcome, Outcome::Exited(0));
}

/// Runner processes (host pids) running `sleep`.
fn sleepers(test: &TestExecutor) -> Vec<u32> {
    let cmdline = |pid: u32| std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    test.runner_pids()
        .into_iter()
        .filter(|&pid| cmdline(pid).starts_with(b"sleep\0"))
        .collect()
}

#[test]
fn killing_an_execution_ends_its_daemons() {
    let Some(test) = TestExecutor::new() else {
        return;
    };
    let runner = test.runner();
    let command = "setsid sleep 1000 & (trap '' HUP; sleep 1000 &); echo up; exec sleep 1000";
    let mut daemons = start(&*runner, command, false);
    daemons.wait_for_output("up");
    assert!(
        eventually(|| sleepers(&test).len() == 3),
        "{:?}",
        sleepers(&test)
    );
    daemons.kill.kill();
    assert_eq!(daemons.wait(), Outcome::Lost);
    assert!(
        eventually(|| sleepers(&test).is_empty()),
        "{:?}",
        sleepers(&test)
    );
    // A command that exits leaves nothing behind either.
    assert_eq!(
        run(&*runner, "setsid sleep 1000 & exit 0").outcome,
        Outcome::Exited(0)
    );
    assert!(
        eventually(|| sleepers(&test).is_empty()),
        "{:?}",
        sleepers(&test)
    );
}

#[test]
fn executions_run_concurrently_and_end_independently() {
    let Some(test) = TestExecutor::new() else {
        return;
    };
    let runner = test.runner();
    let mut first = start(&*runner, "echo one; sleep 1000", false);
    let mut second = start(&*runner, "echo two; read line; echo got $line", false);
    first.wait_for_output("one");
    second.wait_for_output("two");
    first.kill.kill();
    assert_eq!(first.wait(), Outcome::Lost);
    use std::io::Write;
    second.pty.write_all(b"it\n").unwrap();
    second.wait_for_output("got it");
    assert_eq!(second.wait(), Outcome::Exited(0));
}

#[test]
fn a_destroyed_runner_refuses_work_and_destroy_is_idempotent() {
    let Some(test) = TestExecutor::new() else {
        return;
    };
    let runner = test.runner();
    runner.destroy();
    runner.destroy();
    let command = Command {
        command: "true".into(),
        environment: vec![],
        privileged: false,
    };
    assert!(matches!(
        runner.execute(&command),
        Err(Error::UnknownRunner(_))
    ));
}

#[test]
fn start_up_failures_name_what_is_missing() {
    if !rustix::process::geteuid().is_root() {
        return;
    }
    let state = std::env::temp_dir().join(format!("poseidon-lite-startup-{}", std::process::id()));
    let mut config = poseidon_lite::Config::ephemeral(&state);
    config.sandbox.agent = Some("/nonexistent/agent".into());
    config.sandbox.cgroup_name = format!("poseidon-lite-startup-{}", std::process::id());
    let err = poseidon_lite::executor::sandbox::SandboxExecutor::new(&config)
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        "agent binary /nonexistent/agent not found; choose --executor process"
    );
    assert!(!state.exists());
}

#[test]
fn the_seccomp_filter_refuses_what_learner_code_never_needs() {
    let Some(test) = TestExecutor::new() else {
        return;
    };
    let runner = test.runner();
    let status = run(
        &*runner,
        "grep -E '^(Seccomp|NoNewPrivs):' /proc/self/status",
    );
    assert_eq!(status.stdout, "NoNewPrivs:\t1\nSeccomp:\t2\n");
    // Learner processes are also the first the OOM killer picks.
    assert_eq!(
        run(&*runner, "cat /proc/self/oom_score_adj").stdout,
        "1000\n"
    );
    for refused in [
        "unshare -U true",
        "unshare -n true",
        "mount -t tmpfs none /tmp",
        "chroot / true",
    ] {
        let attempt = run_root(&*runner, refused);
        assert_ne!(
            attempt.outcome,
            Outcome::Exited(0),
            "{refused}: {attempt:?}"
        );
        let message = attempt.stderr.to_lowercase();
        let refused_message = message.contains("not permitted") || message.contains("denied");
        assert!(refused_message, "{refused}: {attempt:?}");
    }
    // Ordinary process creation still works (clone without namespace flags).
    assert_eq!(
        run(&*runner, "(true) && echo $(echo nested)").stdout,
        "nested\n"
    );
}

#[test]
fn orphans_are_reaped_so_they_do_not_fill_the_process_limit() {
    let Some(test) = TestExecutor::with(|config| config.sandbox.pids_limit = 64) else {
        return;
    };
    let runner = test.runner();
    // Each subshell's background child is orphaned at once; 300 of them exceed the limit of
    // 64 processes unless the execution's reaper reaps them.
    let orphans = run(
        &*runner,
        "for i in $(seq 300); do (true &); done; echo survived",
    );
    assert_eq!(orphans.stdout, "survived\n", "{orphans:?}");
    assert_eq!(orphans.outcome, Outcome::Exited(0));
}

#[test]
fn vsock_and_kernel_event_sockets_are_refused_but_route_netlink_works() {
    let Some(test) = TestExecutor::new() else {
        return;
    };
    let runner = test.runner();
    // errno of socket(domain, type, protocol), 0 when it worked (perl: no Python on every host).
    let errno = |domain: u32, kind: u32, protocol: u32| {
        let script = format!(
            "perl -e 'if (socket(S, {domain}, {kind}, {protocol})) {{ print 0 }} else {{ print $!+0 }}'"
        );
        run_root(&*runner, &script).stdout
    };
    let eperm = libc::EPERM.to_string();
    // AF_VSOCK (40), SOCK_STREAM.
    assert_eq!(errno(40, 1, 0), eperm, "vsock");
    // AF_NETLINK (16), SOCK_RAW, NETLINK_KOBJECT_UEVENT (15).
    assert_eq!(errno(16, 3, 15), eperm, "kernel device events");
    // NETLINK_ROUTE (0) is what `ip` uses.
    assert_eq!(errno(16, 3, 0), "0", "route netlink");
}
