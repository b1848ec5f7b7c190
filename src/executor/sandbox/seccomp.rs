//! The seccomp filter every learner command runs under: it refuses (EPERM) the system calls
//! learner code never needs and that widen the kernel surface or could undo the sandbox
//! (mounting, namespaces, tracing, keyrings, BPF, modules, ...). `clone3` answers ENOSYS so
//! that libc falls back to `clone`, whose namespace flags are checked; so do calls newer than
//! this list. Calls of another
//! architecture (i386, x32) kill the process, so the deny list cannot be bypassed through them.
//! `socket` is refused for `AF_VSOCK` (not namespaced: it reaches the hypervisor host whatever
//! the network namespace, as Docker's default profile knows) and for kernel device events
//! (`AF_NETLINK` with `NETLINK_KOBJECT_UEVENT`, which show the host's devices); other netlink
//! protocols (`NETLINK_ROUTE` for `ip`) stay allowed.
//! A hand-written BPF program, because a filter needs the x32 range check and the `clone`
//! flag test that rule-based builders do not express directly.

use libc::{
    BPF_ABS, BPF_JA, BPF_JEQ, BPF_JGE, BPF_JMP, BPF_JSET, BPF_K, BPF_LD, BPF_RET, BPF_W,
    sock_filter,
};

#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xC000_003E;
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xC000_00B7;

/// System call numbers of the x32 ABI have this bit set; they never match the list below.
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

/// The first system call number newer than every one this filter was written against
/// (`mseal`): newer calls answer ENOSYS until they have been looked at, so that a kernel
/// update cannot open something the deny list would have had to name.
const FIRST_UNKNOWN: u32 = libc::SYS_mseal as u32 + 1;

/// `clone` flags that create namespaces.
const NAMESPACE_FLAGS: u32 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWCGROUP) as u32;

/// Offsets into `struct seccomp_data`.
const NR_OFFSET: u32 = 0;
const ARCH_OFFSET: u32 = 4;
const ARG0_OFFSET: u32 = 16;
const ARG2_OFFSET: u32 = 32;

/// `NETLINK_KOBJECT_UEVENT`: the netlink protocol of kernel device events.
const NETLINK_KOBJECT_UEVENT: u32 = 15;

/// System calls refused with EPERM.
const DENIED: &[libc::c_long] = &[
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_chroot,
    libc::SYS_open_tree,
    libc::SYS_move_mount,
    libc::SYS_fsopen,
    libc::SYS_fsconfig,
    libc::SYS_fsmount,
    libc::SYS_fspick,
    libc::SYS_mount_setattr,
    libc::SYS_unshare,
    libc::SYS_setns,
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_kcmp,
    libc::SYS_pidfd_getfd,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_userfaultfd,
    libc::SYS_open_by_handle_at,
    libc::SYS_name_to_handle_at,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_reboot,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_acct,
    libc::SYS_quotactl,
    libc::SYS_quotactl_fd,
    libc::SYS_syslog,
    libc::SYS_settimeofday,
    libc::SYS_clock_settime,
    libc::SYS_clock_adjtime,
    libc::SYS_adjtimex,
    libc::SYS_fanotify_init,
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    libc::SYS_vhangup,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_iopl,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_ioperm,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_uselib,
];

/// Where a jump goes.
#[derive(Clone, Copy)]
enum Target {
    Next,
    Label(usize),
    Allow,
    CloneCheck,
    SocketCheck,
    Deny,
    NoSys,
    Kill,
}

/// One instruction with symbolic jump targets: (code, k, true target, false target); for an
/// unconditional jump the true target is where it goes.
type Insn = (u32, u32, Target, Target);

const LD: u32 = BPF_LD | BPF_W | BPF_ABS;
const RET: u32 = BPF_RET | BPF_K;
const JA: u32 = BPF_JMP | BPF_JA;
const JEQ: u32 = BPF_JMP | BPF_JEQ | BPF_K;
const JGE: u32 = BPF_JMP | BPF_JGE | BPF_K;
const JSET: u32 = BPF_JMP | BPF_JSET | BPF_K;

/// Where the shared parts of the program start.
struct Layout {
    labels: Vec<usize>,
    allow: usize,
    clone_check: usize,
    socket_check: usize,
    returns: usize,
}

/// Builds the filter program. Classic BPF only jumps forward, so the layout is: checks, a
/// binary search over the sorted deny list (the kernel evaluates the filter once per system
/// call number when it is installed, so a short path matters), "allow", the `clone` flag
/// check, the `socket` family check, then the shared returns.
pub fn program() -> Vec<sock_filter> {
    let next = Target::Next;
    let mut code: Vec<Insn> = vec![
        (LD, ARCH_OFFSET, next, next),
        (JEQ, AUDIT_ARCH, next, Target::Kill),
        (LD, NR_OFFSET, next, next),
        (JGE, X32_SYSCALL_BIT, Target::Kill, next),
        (JGE, FIRST_UNKNOWN, Target::NoSys, next),
        (JEQ, libc::SYS_clone3 as u32, Target::NoSys, next),
        (JEQ, libc::SYS_clone as u32, Target::CloneCheck, next),
        (JEQ, libc::SYS_socket as u32, Target::SocketCheck, next),
    ];
    let mut denied: Vec<u32> = DENIED.iter().map(|&nr| nr as u32).collect();
    denied.sort_unstable();
    let mut labels = Vec::new();
    search(&mut code, &mut labels, &denied);
    let allow = code.len();
    code.push((RET, libc::SECCOMP_RET_ALLOW, next, next));
    let clone_check = code.len();
    // The flags are the low half of argument 0; namespace flags are refused.
    code.push((LD, ARG0_OFFSET, next, next));
    code.push((JSET, NAMESPACE_FLAGS, Target::Deny, next));
    code.push((RET, libc::SECCOMP_RET_ALLOW, next, next));
    let socket_check = code.len();
    // The domain is argument 0, the protocol argument 2 (both ints: the low halves).
    code.push((LD, ARG0_OFFSET, next, next));
    code.push((JEQ, libc::AF_VSOCK as u32, Target::Deny, next));
    // Jumps only go forward: this check ends in an "allow" of its own.
    let socket_allow = labels.len();
    labels.push(0);
    code.push((
        JEQ,
        libc::AF_NETLINK as u32,
        next,
        Target::Label(socket_allow),
    ));
    code.push((LD, ARG2_OFFSET, next, next));
    code.push((JEQ, NETLINK_KOBJECT_UEVENT, Target::Deny, next));
    labels[socket_allow] = code.len();
    code.push((RET, libc::SECCOMP_RET_ALLOW, next, next));
    let returns = code.len();
    for action in [
        libc::SECCOMP_RET_ERRNO | libc::EPERM as u32,
        libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32,
        libc::SECCOMP_RET_KILL_PROCESS,
    ] {
        code.push((RET, action, next, next));
    }
    let layout = Layout {
        labels,
        allow,
        clone_check,
        socket_check,
        returns,
    };
    code.into_iter()
        .enumerate()
        .map(|(at, insn)| layout.resolve(insn, at))
        .collect()
}

impl Layout {
    fn absolute(&self, target: Target, at: usize) -> usize {
        match target {
            Target::Next => at + 1,
            Target::Label(label) => self.labels[label],
            Target::Allow => self.allow,
            Target::CloneCheck => self.clone_check,
            Target::SocketCheck => self.socket_check,
            Target::Deny => self.returns,
            Target::NoSys => self.returns + 1,
            Target::Kill => self.returns + 2,
        }
    }

    /// The instruction at `at` with its jumps as offsets.
    fn resolve(&self, (op, k, jt, jf): Insn, at: usize) -> sock_filter {
        if op == JA {
            let k = (self.absolute(jt, at) - at - 1) as u32;
            return sock_filter {
                code: op as u16,
                jt: 0,
                jf: 0,
                k,
            };
        }
        // Conditional jumps reach at most 255 instructions ahead; the program is far shorter.
        let offset = |target| {
            u8::try_from(self.absolute(target, at) - at - 1).expect("seccomp jump too far")
        };
        sock_filter {
            code: op as u16,
            jt: offset(jt),
            jf: offset(jf),
            k,
        }
    }
}

/// Emits a binary search for the system call number in `sorted`: found means "deny", not
/// found jumps to "allow".
fn search(code: &mut Vec<Insn>, labels: &mut Vec<usize>, sorted: &[u32]) {
    if sorted.len() <= 3 {
        code.extend(
            sorted
                .iter()
                .map(|&nr| (JEQ, nr, Target::Deny, Target::Next)),
        );
        code.push((JA, 0, Target::Allow, Target::Allow));
        return;
    }
    let middle = sorted.len() / 2;
    let upper = labels.len();
    labels.push(0);
    code.push((JGE, sorted[middle], Target::Label(upper), Target::Next));
    search(code, labels, &sorted[..middle]);
    labels[upper] = code.len();
    search(code, labels, &sorted[middle..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the program like the kernel's classic BPF interpreter does for what it uses.
    fn evaluate(program: &[sock_filter], arch: u32, nr: u32, arg0: u32) -> u32 {
        evaluate_with(program, arch, nr, arg0, 0)
    }

    fn evaluate_with(program: &[sock_filter], arch: u32, nr: u32, arg0: u32, arg2: u32) -> u32 {
        let (mut pc, mut acc) = (0, 0);
        loop {
            let insn = program[pc];
            pc += 1;
            match u32::from(insn.code) {
                LD => {
                    acc = match insn.k {
                        NR_OFFSET => nr,
                        ARCH_OFFSET => arch,
                        ARG0_OFFSET => arg0,
                        ARG2_OFFSET => arg2,
                        other => panic!("load of offset {other}"),
                    }
                }
                RET => return insn.k,
                JA => pc += insn.k as usize,
                op => {
                    let taken = match op {
                        JEQ => acc == insn.k,
                        JGE => acc >= insn.k,
                        JSET => acc & insn.k != 0,
                        other => panic!("opcode {other:#x}"),
                    };
                    pc += usize::from(if taken { insn.jt } else { insn.jf });
                }
            }
        }
    }

    #[test]
    fn the_filter_denies_exactly_the_list() {
        let program = program();
        let run = |nr: libc::c_long| evaluate(&program, AUDIT_ARCH, nr as u32, 0);
        let eperm = libc::SECCOMP_RET_ERRNO | libc::EPERM as u32;
        for &nr in DENIED {
            assert_eq!(run(nr), eperm, "system call {nr}");
        }
        let enosys = libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32;
        for nr in 0..600 {
            if nr >= libc::c_long::from(FIRST_UNKNOWN) {
                assert_eq!(run(nr), enosys, "system call {nr} is newer than the list");
            } else if !DENIED.contains(&nr) && nr != libc::SYS_clone3 && nr != libc::SYS_socket {
                assert_eq!(run(nr), libc::SECCOMP_RET_ALLOW, "system call {nr}");
            }
        }
        assert_eq!(
            run(libc::SYS_clone3),
            libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32
        );
        let clone = |flags: libc::c_int| {
            evaluate(&program, AUDIT_ARCH, libc::SYS_clone as u32, flags as u32)
        };
        assert_eq!(clone(libc::SIGCHLD | libc::CLONE_NEWUSER), eperm);
        assert_eq!(
            clone(libc::SIGCHLD | libc::CLONE_VM),
            libc::SECCOMP_RET_ALLOW
        );
        let socket = |domain: libc::c_int, protocol: u32| {
            let nr = libc::SYS_socket as u32;
            evaluate_with(&program, AUDIT_ARCH, nr, domain as u32, protocol)
        };
        assert_eq!(socket(libc::AF_VSOCK, 0), eperm);
        assert_eq!(socket(libc::AF_NETLINK, NETLINK_KOBJECT_UEVENT), eperm);
        assert_eq!(socket(libc::AF_NETLINK, 0), libc::SECCOMP_RET_ALLOW);
        assert_eq!(socket(libc::AF_INET, 15), libc::SECCOMP_RET_ALLOW);
        assert_eq!(socket(libc::AF_UNIX, 0), libc::SECCOMP_RET_ALLOW);
        let kill = libc::SECCOMP_RET_KILL_PROCESS;
        assert_eq!(evaluate(&program, 0x4000_0003, 0, 0), kill);
        assert_eq!(evaluate(&program, AUDIT_ARCH, X32_SYSCALL_BIT | 1, 0), kill);
    }
}
