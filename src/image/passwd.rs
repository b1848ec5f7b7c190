//! The image's own user database: `user`'s uid, gid and home from its `/etc/passwd`, read
//! in-root (never through a symlink, never a FIFO or device, size-capped) and parsed here,
//! never through the host's NSS.

use serde::{Deserialize, Serialize};

use super::inroot::{InPath, Root};

/// The user CodeOcean's images create for learner code.
pub const RUNNER_USER: &str = "user";
const MAX_PASSWD: u64 = 1 << 20;

/// A user of the image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    /// The login name.
    pub name: String,
    /// The uid (never 0 for the unprivileged user).
    pub uid: u32,
    /// The primary gid.
    pub gid: u32,
    /// The home directory.
    pub home: String,
}

/// Finds `name` in the image's `/etc/passwd`; `None` if the file or the entry is missing or
/// unusable.
pub fn lookup(root: &Root, name: &str) -> Option<User> {
    let path = InPath::parse(b"etc/passwd", 64).ok()?;
    let bytes = root.read_small(&path, MAX_PASSWD).ok()?;
    parse(&String::from_utf8_lossy(&bytes), name)
}

/// Parses passwd lines (`name:x:uid:gid:gecos:home:shell`), strictly: numeric fields must be
/// plain decimal u32.
pub fn parse(passwd: &str, name: &str) -> Option<User> {
    passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() < 7 || fields[0] != name {
            return None;
        }
        let number = |s: &str| {
            s.bytes()
                .all(|b| b.is_ascii_digit())
                .then(|| s.parse::<u32>().ok())
                .flatten()
        };
        Some(User {
            name: name.to_owned(),
            uid: number(fields[2])?,
            gid: number(fields[3])?,
            home: fields[5].to_owned(),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwd_lines_parse_strictly() {
        let passwd =
            "root:x:0:0:root:/root:/bin/bash\n# comment\nuser:x:1001:1001::/workspace:/bin/bash\n";
        assert_eq!(
            parse(passwd, "user"),
            Some(User {
                name: "user".into(),
                uid: 1001,
                gid: 1001,
                home: "/workspace".into()
            })
        );
        assert_eq!(parse("user:x:+1:1::/h:/bin/sh\n", "user"), None);
        assert_eq!(parse("user:x:4294967296:1::/h:/bin/sh\n", "user"), None);
        assert_eq!(parse("user:x:1\n", "user"), None);
        assert_eq!(parse(passwd, "nobody"), None);
    }
}
