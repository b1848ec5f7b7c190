//! User and group names from `passwd` and `group` files, read directly (no NSS), so that a
//! runner's listing shows the names of its own image.

use std::{collections::HashMap, io::Read, os::fd::AsFd};

use rustix::fs::OFlags;

/// Largest `passwd`/`group` file read.
const MAX_DATABASE_BYTES: u64 = 1 << 20;

/// One line of a `passwd` file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasswdEntry {
    /// Login name.
    pub name: String,
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Home directory.
    pub home: String,
}

/// Maps uids and gids to names; unknown ids print as numbers, as `ls` does.
#[derive(Debug, Default, Clone)]
pub struct Names {
    users: HashMap<u32, String>,
    groups: HashMap<u32, String>,
}

impl Names {
    /// Reads the host's databases.
    pub fn load_host() -> Names {
        let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
        Names::parse(&read("/etc/passwd"), &read("/etc/group"))
    }

    /// Reads the databases inside a root directory.
    pub fn load_in(root: &impl AsFd) -> Names {
        Names::parse(&read_in(root, "/etc/passwd"), &read_in(root, "/etc/group"))
    }

    /// Builds the maps from the files' text.
    pub fn parse(passwd: &str, group: &str) -> Names {
        let users = parse_passwd(passwd)
            .map(|entry| (entry.uid, entry.name))
            .collect();
        let groups = group
            .lines()
            .filter_map(|line| {
                let mut fields = line.split(':');
                let name = fields.next()?;
                let gid = fields.nth(1)?.parse().ok()?;
                Some((gid, name.to_owned()))
            })
            .collect();
        Names { users, groups }
    }

    /// The name of a user id.
    pub fn user(&self, uid: u32) -> String {
        self.users
            .get(&uid)
            .cloned()
            .unwrap_or_else(|| uid.to_string())
    }

    /// The name of a group id.
    pub fn group(&self, gid: u32) -> String {
        self.groups
            .get(&gid)
            .cloned()
            .unwrap_or_else(|| gid.to_string())
    }
}

/// Reads a small text file inside a root; empty when missing or unreadable.
pub(crate) fn read_in(root: &impl AsFd, path: &str) -> String {
    let Ok(fd) = super::resolve(root, path, OFlags::RDONLY | OFlags::NONBLOCK) else {
        return String::new();
    };
    let mut text = String::new();
    let _ = std::fs::File::from(fd)
        .take(MAX_DATABASE_BYTES)
        .read_to_string(&mut text);
    text
}

/// The entries of a `passwd` file, skipping malformed lines.
pub fn parse_passwd(text: &str) -> impl Iterator<Item = PasswdEntry> + '_ {
    text.lines().filter_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() < 6 {
            return None;
        }
        Some(PasswdEntry {
            name: fields[0].to_owned(),
            uid: fields[2].parse().ok()?,
            gid: fields[3].parse().ok()?,
            home: fields[5].to_owned(),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_come_from_the_databases_and_fall_back_to_numbers() {
        let names = Names::parse(
            "root:x:0:0:root:/root:/bin/bash\nuser:x:1001:1001::/home/user:/bin/bash\nbroken\n",
            "root:x:0:\nuser:x:1001:\n",
        );
        assert_eq!(names.user(1001), "user");
        assert_eq!(names.group(0), "root");
        assert_eq!(names.user(4242), "4242");
    }

    #[test]
    fn passwd_entries_carry_ids_and_home() {
        let entry = parse_passwd("user:x:1001:1002::/home/user:/bin/sh")
            .next()
            .unwrap();
        assert_eq!(
            entry,
            PasswdEntry {
                name: "user".into(),
                uid: 1001,
                gid: 1002,
                home: "/home/user".into()
            }
        );
    }
}
