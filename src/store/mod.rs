//! The state directory: environments and claimed runners persisted as one JSON file each.
//!
//! Every file is replaced atomically (temporary file, rename), so after a crash it holds
//! either its old or its complete new content. At start-up nothing is changed until every
//! file has been read: a file that cannot be read or parsed makes [`Store::load`] fail with
//! its name, and the server refuses to start rather than lose the data it describes. Files
//! the operator moved into `quarantine/` are ignored, but runners named there keep their
//! workspaces.

mod records;

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

pub use records::{MAX_QUEUED, RecordWriter, wait_for};

use crate::{
    dto::Environment,
    id::{EnvironmentId, RunnerId},
};

/// A claimed runner as persisted: enough to take it back after a restart. Nothing derived
/// from the environment is copied in (its definition is in the environment's own file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunnerRecord {
    /// The runner; its environment is the id's prefix.
    pub id: RunnerId,
    /// Its inactivity timeout in seconds (0 = none).
    pub inactivity_timeout: u64,
}

/// What the state directory holds, as read at start-up.
#[derive(Debug, Default)]
pub struct Contents {
    /// Every environment.
    pub environments: Vec<Environment>,
    /// Every runner record.
    pub runners: Vec<RunnerRecord>,
    /// Runners whose records the operator moved into `quarantine/`: their files are kept.
    pub quarantined: Vec<RunnerId>,
}

/// A state file that cannot be used; the server refuses to start.
#[derive(Debug)]
pub struct Damaged {
    /// The file.
    pub path: PathBuf,
    /// What is wrong with it.
    pub reason: String,
    /// Where the operator moves it to start without it.
    pub quarantine: PathBuf,
}

impl std::fmt::Display for Damaged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the state file {} is damaged ({}); nothing was changed. Repair it, or move it \
             into {} and start again (no workspace named by a file there is ever removed)",
            self.path.display(),
            self.reason,
            self.quarantine.display()
        )
    }
}

/// Files under the state directory.
#[derive(Debug)]
pub struct Store {
    environments: PathBuf,
    runners: PathBuf,
    quarantine: PathBuf,
    /// Whether runner records are synced to the disk before a claim is answered.
    sync_runners: bool,
}

impl Store {
    /// Opens (creating) the state directory.
    pub fn open(dir: &Path) -> io::Result<Store> {
        let store = Store {
            environments: dir.join("environments"),
            runners: dir.join("runners"),
            quarantine: dir.join("quarantine"),
            sync_runners: false,
        };
        fs::create_dir_all(&store.environments)?;
        fs::create_dir_all(&store.runners)?;
        Ok(store)
    }

    /// Syncs runner records to the disk before claims are answered (`state.sync`).
    pub fn sync_runners(mut self, sync: bool) -> Store {
        self.sync_runners = sync;
        self
    }

    /// Writes an environment durably (synced to disk before this returns). On failure the
    /// previous file, if any, is unchanged.
    pub fn save_environment(&self, environment: &Environment) -> io::Result<()> {
        let path = self.environments.join(format!("{}.json", environment.id));
        write_atomically(&path, &serde_json::to_vec_pretty(environment)?, true)?;
        sync_dir(&self.environments)
    }

    /// Removes an environment durably.
    pub fn remove_environment(&self, id: EnvironmentId) -> io::Result<()> {
        remove_file(&self.environments.join(format!("{id}.json")))?;
        sync_dir(&self.environments)
    }

    /// Reads everything; the first file that cannot be used is an error and nothing is
    /// changed. Afterwards, temporary files of interrupted writes are removed.
    pub fn load(&self) -> Result<Contents, Damaged> {
        let environments: Vec<(String, Environment)> = self.read_all(&self.environments)?;
        for (stem, environment) in &environments {
            if *stem != environment.id.to_string() {
                return Err(self.damaged(
                    &self.environments.join(format!("{stem}.json")),
                    format!("it describes environment {}", environment.id),
                ));
            }
        }
        let runners: Vec<(String, RunnerRecord)> = self.read_all(&self.runners)?;
        for (stem, record) in &runners {
            if RunnerId::parse(record.id.as_str()).is_none() || *stem != record.id.as_str() {
                return Err(self.damaged(
                    &self.runners.join(format!("{stem}.json")),
                    format!("it describes runner {:?}", record.id.as_str()),
                ));
            }
        }
        remove_temporaries(&self.environments);
        remove_temporaries(&self.runners);
        Ok(Contents {
            environments: environments.into_iter().map(|(_, env)| env).collect(),
            runners: runners.into_iter().map(|(_, record)| record).collect(),
            quarantined: self.quarantined(),
        })
    }

    /// Runner ids named by files in the quarantine directory (at any depth).
    fn quarantined(&self) -> Vec<RunnerId> {
        let mut ids = Vec::new();
        let mut dirs = vec![self.quarantine.clone()];
        while let Some(dir) = dirs.pop() {
            for entry in fs::read_dir(&dir).into_iter().flatten().flatten() {
                let path = entry.path();
                if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
                    dirs.push(path);
                } else if let Some(id) = path
                    .file_stem()
                    .and_then(|stem| RunnerId::parse(&stem.to_string_lossy()))
                {
                    ids.push(id);
                }
            }
        }
        ids
    }

    fn damaged(&self, path: &Path, reason: String) -> Damaged {
        Damaged {
            path: path.to_owned(),
            reason,
            quarantine: self.quarantine.clone(),
        }
    }

    /// Every `*.json` file of `dir` with its name without extension.
    fn read_all<T: serde::de::DeserializeOwned>(
        &self,
        dir: &Path,
    ) -> Result<Vec<(String, T)>, Damaged> {
        let entries = fs::read_dir(dir).map_err(|err| self.damaged(dir, err.to_string()))?;
        let mut values = Vec::new();
        for entry in entries {
            let path = entry
                .map_err(|err| self.damaged(dir, err.to_string()))?
                .path();
            if path.extension().is_none_or(|ext| ext != "json") {
                continue;
            }
            let stem = path
                .file_stem()
                .map(|stem| stem.to_string_lossy().into_owned())
                .unwrap_or_default();
            let bytes = fs::read(&path).map_err(|err| self.damaged(&path, err.to_string()))?;
            let value = serde_json::from_slice(&bytes)
                .map_err(|err| self.damaged(&path, err.to_string()))?;
            values.push((stem, value));
        }
        Ok(values)
    }
}

fn remove_file(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// The temporary name of `path` while it is being written.
fn temporary(path: &Path) -> PathBuf {
    path.with_extension("tmp")
}

/// Replaces `path` with `content`: written to a temporary file (synced if `durable`), then
/// renamed over it. A failed write removes the temporary file and leaves `path` as it was.
fn write_atomically(path: &Path, content: &[u8], durable: bool) -> io::Result<()> {
    let temporary = temporary(path);
    let written = (|| {
        let mut file = fs::File::create(&temporary)?;
        io::Write::write_all(&mut file, content)?;
        if durable {
            file.sync_data()?;
        }
        fs::rename(&temporary, path)
    })();
    if written.is_err() {
        let _ = fs::remove_file(&temporary);
    }
    written
}

/// Makes renames and removals in `dir` durable.
fn sync_dir(dir: &Path) -> io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

/// Removes what interrupted writes left behind.
fn remove_temporaries(dir: &Path) {
    for path in fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "tmp"))
    {
        match fs::remove_file(&path) {
            Ok(()) => log::info!("removed {} left by an interrupted write", path.display()),
            Err(err) => log::warn!("cannot remove {}: {err}", path.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn environment(id: u64) -> Environment {
        Environment {
            image: "i".into(),
            prewarming_pool_size: 2,
            id,
            ..Default::default()
        }
    }

    #[test]
    fn environments_and_runners_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let env = environment(5);
        store.save_environment(&env).unwrap();
        let record = RunnerRecord {
            id: RunnerId::new(EnvironmentId(5)),
            inactivity_timeout: 60,
        };
        store.save_runner(&record, false).unwrap();
        let reopened = Store::open(dir.path()).unwrap();
        let contents = reopened.load().unwrap();
        assert_eq!(contents.environments, vec![env]);
        assert_eq!(contents.runners, vec![record.clone()]);
        reopened.remove_environment(EnvironmentId(5)).unwrap();
        reopened.remove_runner(&record.id).unwrap();
        reopened.remove_runner(&record.id).unwrap();
        let contents = reopened.load().unwrap();
        assert!(contents.environments.is_empty() && contents.runners.is_empty());
    }

    #[test]
    fn a_damaged_file_is_named_and_nothing_is_changed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.save_environment(&environment(1)).unwrap();
        let damaged = dir.path().join("environments/2.json");
        fs::write(&damaged, b"{\"id\": 2, \"ima").unwrap();
        let leftover = dir.path().join("environments/3.tmp");
        fs::write(&leftover, b"half").unwrap();
        let err = store.load().unwrap_err();
        assert_eq!(err.path, damaged);
        assert!(err.to_string().contains("quarantine"), "{err}");
        assert!(
            leftover.exists(),
            "nothing changes before everything was read"
        );
        fs::create_dir_all(dir.path().join("quarantine")).unwrap();
        fs::rename(&damaged, dir.path().join("quarantine/2.json")).unwrap();
        assert_eq!(store.load().unwrap().environments, vec![environment(1)]);
        assert!(
            !leftover.exists(),
            "temporary files are removed once loaded"
        );
    }

    #[test]
    fn records_must_name_their_own_runner_and_quarantined_ones_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let id = RunnerId::new(EnvironmentId(1));
        let other = RunnerId::new(EnvironmentId(1));
        let record = RunnerRecord {
            id: id.clone(),
            inactivity_timeout: 0,
        };
        let misplaced = dir.path().join(format!("runners/{other}.json"));
        fs::write(&misplaced, serde_json::to_vec(&record).unwrap()).unwrap();
        assert_eq!(store.load().unwrap_err().path, misplaced);
        fs::create_dir_all(dir.path().join("quarantine/runners")).unwrap();
        fs::rename(
            &misplaced,
            dir.path().join(format!("quarantine/runners/{other}.json")),
        )
        .unwrap();
        assert_eq!(store.load().unwrap().quarantined, vec![other]);
    }

    #[test]
    fn records_of_earlier_versions_still_load() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let id = RunnerId::new(EnvironmentId(4));
        let old = serde_json::json!({
            "id": id, "inactivity_timeout": 9, "environment": environment(4)
        });
        fs::write(
            dir.path().join(format!("runners/{id}.json")),
            old.to_string(),
        )
        .unwrap();
        assert_eq!(
            store.load().unwrap().runners,
            vec![RunnerRecord {
                id,
                inactivity_timeout: 9
            }]
        );
    }
}
