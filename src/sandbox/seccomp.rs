//! The seccomp filter every learner command runs under: it refuses (EPERM) the system calls
//! learner code never needs and that widen the kernel surface or could undo the sandbox
//! (mounting, namespaces, tracing, keyrings, BPF, modules, ...). `clone3` answers ENOSYS so
//! that libc falls back to `clone`, whose namespace flags are checked. Calls of another
//! architecture (i386, x32) kill the process, so the deny list cannot be bypassed through them.
//! A hand-written BPF program, because a filter needs the x32 range check and the `clone`
//! flag test that rule-based builders do not express directly.

use libc::{
    BPF_ABS, BPF_JEQ, BPF_JGE, BPF_JMP, BPF_JSET, BPF_K, BPF_LD, BPF_RET, BPF_W, sock_filter,
};

#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xC000_003E;
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xC000_00B7;

/// System call numbers of the x32 ABI have this bit set; they never match the list below.
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

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
    CloneCheck,
    Deny,
    NoSys,
    Kill,
}

/// One instruction with symbolic jump targets.
type Insn = (u32, u32, Target, Target);

/// Builds the filter program. Classic BPF only jumps forward, so the layout is: checks, the
/// deny list, "allow" for everything else, the `clone` flag check, then the shared returns.
pub fn program() -> Vec<sock_filter> {
    let (ld, ret) = (BPF_LD | BPF_W | BPF_ABS, BPF_RET | BPF_K);
    let (jeq, jge, jset) = (
        BPF_JMP | BPF_JEQ | BPF_K,
        BPF_JMP | BPF_JGE | BPF_K,
        BPF_JMP | BPF_JSET | BPF_K,
    );
    let next = Target::Next;
    let mut code: Vec<Insn> = vec![
        (ld, ARCH_OFFSET, next, next),
        (jeq, AUDIT_ARCH, next, Target::Kill),
        (ld, NR_OFFSET, next, next),
        (jge, X32_SYSCALL_BIT, Target::Kill, next),
        (jeq, libc::SYS_clone3 as u32, Target::NoSys, next),
        (jeq, libc::SYS_clone as u32, Target::CloneCheck, next),
    ];
    code.extend(
        DENIED
            .iter()
            .map(|&nr| (jeq, nr as u32, Target::Deny, next)),
    );
    code.push((ret, libc::SECCOMP_RET_ALLOW, next, next));
    let clone_check = code.len();
    // The flags are the low half of argument 0; namespace flags are refused.
    code.push((ld, ARG0_OFFSET, next, next));
    code.push((jset, NAMESPACE_FLAGS, Target::Deny, next));
    code.push((ret, libc::SECCOMP_RET_ALLOW, next, next));
    let returns = code.len();
    code.push((
        ret,
        libc::SECCOMP_RET_ERRNO | libc::EPERM as u32,
        next,
        next,
    ));
    code.push((
        ret,
        libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32,
        next,
        next,
    ));
    code.push((ret, libc::SECCOMP_RET_KILL_PROCESS, next, next));
    let index = |target: Target, at: usize| -> u8 {
        let absolute = match target {
            Target::Next => at + 1,
            Target::CloneCheck => clone_check,
            Target::Deny => returns,
            Target::NoSys => returns + 1,
            Target::Kill => returns + 2,
        };
        // Every target lies ahead by fewer than 256 instructions: the list is short.
        u8::try_from(absolute - at - 1).expect("seccomp jump out of range")
    };
    code.iter()
        .enumerate()
        .map(|(at, &(op, k, jt, jf))| sock_filter {
            code: op as u16,
            jt: index(jt, at),
            jf: index(jf, at),
            k,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_jump_stays_inside_the_program() {
        let program = program();
        let jumps = program
            .iter()
            .enumerate()
            .filter(|(_, insn)| insn.code as u32 & 0x07 == BPF_JMP);
        for (at, insn) in jumps {
            assert!(at + 1 + (insn.jt as usize) < program.len());
            assert!(at + 1 + (insn.jf as usize) < program.len());
        }
        let last = program.last().unwrap();
        assert_eq!(last.k, libc::SECCOMP_RET_KILL_PROCESS);
    }
}
