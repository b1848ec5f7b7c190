//! The command child of an execution: it takes the terminal as its controlling terminal, the
//! terminal and the stderr pipe as its standard streams, the workspace as working directory,
//! the identity, limits and environment of a learner command, and execs `bash -c <command>`
//! (`sh -c` where the image has no bash). The seccomp filter and the OOM score are inherited
//! from the reaper.

use std::{ffi::CString, io, os::fd::OwnedFd};

use rustix::{
    fs::Mode,
    process::{Resource, Rlimit},
};

use super::{Context, rootfs};
use crate::{executor, sys::sandbox as sys};

/// Everything the command child needs, prepared by the reaper before it forks.
#[derive(Debug)]
pub(super) struct Launch {
    uid: u32,
    gid: u32,
    bash: Vec<CString>,
    sh: Vec<CString>,
    env: Vec<CString>,
}

impl Launch {
    /// The argument vectors and environment of `command`, run as root inside or as the user.
    pub fn new(
        command: &str,
        environment: &[(String, String)],
        privileged: bool,
        context: &Context,
    ) -> io::Result<Launch> {
        let user = &context.user;
        let (uid, gid, name, home) = if privileged {
            (0, 0, "root", "/root")
        } else {
            (user.uid, user.gid, "user", user.home.as_str())
        };
        let argv = |shell: &str| -> io::Result<Vec<CString>> {
            [shell, "-c", command].into_iter().map(cstring).collect()
        };
        let env = environment_of(home, name, &context.image_env, environment);
        Ok(Launch {
            uid,
            gid,
            bash: argv("bash")?,
            sh: argv("sh")?,
            env,
        })
    }

    /// In the command child: prepares the process and execs the shell. Returns only on failure.
    pub fn exec(&self, slave: &OwnedFd, err_write: &OwnedFd) -> io::Error {
        if let Err(err) = self.prepare(slave, err_write) {
            return err;
        }
        match sys::execve(c"/bin/bash", &self.bash, &self.env) {
            err if err.kind() == io::ErrorKind::NotFound => {
                sys::execve(c"/bin/sh", &self.sh, &self.env)
            }
            err => err,
        }
    }

    fn prepare(&self, slave: &OwnedFd, err_write: &OwnedFd) -> io::Result<()> {
        sys::reset_signals();
        rustix::process::setsid()?;
        rustix::process::ioctl_tiocsctty(slave)?;
        // Let the user reopen its terminal (e.g. /dev/stdin); best effort.
        let owner = (
            rustix::process::Uid::from_raw(self.uid),
            rustix::process::Gid::from_raw(self.gid),
        );
        let _ = rustix::fs::fchown(slave, Some(owner.0), Some(owner.1));
        rustix::stdio::dup2_stdin(slave)?;
        rustix::stdio::dup2_stdout(slave)?;
        rustix::stdio::dup2_stderr(err_write)?;
        if std::env::set_current_dir("/workspace").is_err() {
            std::env::set_current_dir("/")?;
        }
        let no_core = Rlimit {
            current: Some(0),
            maximum: Some(0),
        };
        rustix::process::setrlimit(Resource::Core, no_core)?;
        executor::lower_file_limit()?;
        rustix::process::umask(Mode::from_raw_mode(0o022));
        rootfs::become_user(self.uid, self.gid)?;
        rustix::thread::set_no_new_privs(true)?;
        Ok(())
    }
}

/// The command's environment: a fixed base, the image's `Env` (as `docker exec` inherits it),
/// the user's identity, then the request's variables (which override all of it); nothing of the
/// server's environment.
fn environment_of(
    home: &str,
    name: &str,
    image: &[(String, String)],
    extra: &[(String, String)],
) -> Vec<CString> {
    let pairs = |list: &[(&str, &str)]| -> Vec<(String, String)> {
        list.iter()
            .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
            .collect()
    };
    let mut vars = pairs(&[
        ("PATH", executor::PATH),
        ("LANG", "C.UTF-8"),
        ("TERM", "xterm"),
        ("CODEOCEAN", "true"),
    ]);
    let identity = pairs(&[("HOME", home), ("USER", name), ("LOGNAME", name)]);
    for (name, value) in image.iter().chain(&identity).chain(extra) {
        vars.retain(|(existing, _)| existing != name);
        vars.push((name.clone(), value.clone()));
    }
    vars.into_iter()
        .filter_map(|(name, value)| cstring(&format!("{name}={value}")).ok())
        .collect()
}

fn cstring(text: &str) -> io::Result<CString> {
    CString::new(text).map_err(|_| io::Error::other("NUL byte in the command or environment"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_variables_override_the_base_environment() {
        let extra = [
            ("LANG".to_owned(), "de_DE.UTF-8".to_owned()),
            ("X".to_owned(), "1".to_owned()),
        ];
        let image = [
            ("TERM".to_owned(), "ansi".to_owned()),
            ("X".to_owned(), "image".to_owned()),
        ];
        let env: Vec<String> = environment_of("/home/user", "user", &image, &extra)
            .into_iter()
            .map(|var| var.into_string().unwrap())
            .collect();
        assert!(env.contains(&"LANG=de_DE.UTF-8".to_owned()) && env.contains(&"X=1".to_owned()));
        assert!(
            env.contains(&"TERM=ansi".to_owned()),
            "the image's Env beats the base"
        );
        assert_eq!(env.iter().filter(|var| var.starts_with("X=")).count(), 1);
        assert!(env.contains(&"CODEOCEAN=true".to_owned()));
        assert_eq!(env.iter().filter(|var| var.starts_with("LANG=")).count(), 1);
    }
}
