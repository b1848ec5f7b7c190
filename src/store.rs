//! The state directory: environments and claimed runners persisted as one JSON file each,
//! written atomically (temporary file, fsync, rename), so that a restart loses nothing.

use std::{
    fs, io,
    path::{Path, PathBuf},
    sync::Arc,
    thread,
};

use crossbeam_channel::Sender;

use serde::{Deserialize, Serialize};

use crate::{
    dto::Environment,
    id::{EnvironmentId, RunnerId},
};

/// A claimed runner as persisted: enough to take it back after a restart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunnerRecord {
    /// The runner.
    pub id: RunnerId,
    /// Its inactivity timeout in seconds (0 = none).
    pub inactivity_timeout: u64,
    /// The environment definition it was built from.
    pub environment: Environment,
}

/// Files under the state directory.
#[derive(Debug)]
pub struct Store {
    environments: PathBuf,
    runners: PathBuf,
}

impl Store {
    /// Opens (creating) the state directory.
    pub fn open(dir: &Path) -> io::Result<Store> {
        let store = Store {
            environments: dir.join("environments"),
            runners: dir.join("runners"),
        };
        fs::create_dir_all(&store.environments)?;
        fs::create_dir_all(&store.runners)?;
        Ok(store)
    }

    /// Writes an environment.
    pub fn save_environment(&self, environment: &Environment) -> io::Result<()> {
        let path = self.environments.join(format!("{}.json", environment.id));
        write_atomically(&path, &serde_json::to_vec_pretty(environment)?, true)
    }

    /// Removes an environment.
    pub fn remove_environment(&self, id: EnvironmentId) -> io::Result<()> {
        remove_file(&self.environments.join(format!("{id}.json")))
    }

    /// Reads every environment; unreadable files are logged and skipped.
    pub fn environments(&self) -> Vec<Environment> {
        read_all(&self.environments)
    }

    /// Writes a runner record. Not fsynced: it only needs to survive a crash of the server,
    /// and claims must stay fast.
    pub fn save_runner(&self, record: &RunnerRecord) -> io::Result<()> {
        let path = self.runners.join(format!("{}.json", record.id));
        write_atomically(&path, &serde_json::to_vec(record)?, false)
    }

    /// Removes a runner record.
    pub fn remove_runner(&self, id: &RunnerId) -> io::Result<()> {
        remove_file(&self.runners.join(format!("{id}.json")))
    }

    /// Reads every runner record.
    pub fn runners(&self) -> Vec<RunnerRecord> {
        read_all(&self.runners)
    }
}

/// What the record writer is asked to do.
#[derive(Debug)]
enum RecordOp {
    Save(Box<RunnerRecord>),
    Remove(RunnerId),
    Flush(Sender<()>),
}

/// Writes runner records on a thread of its own, in the order they were asked for, so that
/// claiming and destroying runners never wait for the file system.
#[derive(Debug, Clone)]
pub struct RecordWriter {
    ops: Sender<RecordOp>,
}

impl RecordWriter {
    /// Starts the writer; it ends when the last clone is dropped.
    pub fn spawn(store: Arc<Store>) -> io::Result<RecordWriter> {
        let (ops, queue) = crossbeam_channel::unbounded();
        thread::Builder::new()
            .name("records".into())
            .spawn(move || {
                for op in queue {
                    let result = match op {
                        RecordOp::Save(record) => store.save_runner(&record),
                        RecordOp::Remove(id) => store.remove_runner(&id),
                        RecordOp::Flush(done) => {
                            let _ = done.send(());
                            Ok(())
                        }
                    };
                    if let Err(err) = result {
                        log::warn!("cannot update a runner record: {err}");
                    }
                }
            })?;
        Ok(RecordWriter { ops })
    }

    /// Records a claimed runner.
    pub fn save(&self, record: RunnerRecord) {
        let _ = self.ops.send(RecordOp::Save(Box::new(record)));
    }

    /// Forgets a runner.
    pub fn remove(&self, id: RunnerId) {
        let _ = self.ops.send(RecordOp::Remove(id));
    }

    /// Waits until everything asked for so far is written.
    pub fn flush(&self) {
        let (done, flushed) = crossbeam_channel::bounded(1);
        if self.ops.send(RecordOp::Flush(done)).is_ok() {
            let _ = flushed.recv();
        }
    }
}

fn remove_file(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

fn write_atomically(path: &Path, content: &[u8], durable: bool) -> io::Result<()> {
    let temporary = path.with_extension("tmp");
    {
        let mut file = fs::File::create(&temporary)?;
        io::Write::write_all(&mut file, content)?;
        if durable {
            file.sync_all()?;
        }
    }
    fs::rename(&temporary, path)?;
    if durable && let Some(dir) = path.parent() {
        fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

fn read_all<T: serde::de::DeserializeOwned>(dir: &Path) -> Vec<T> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut values = Vec::new();
    for path in entries.flatten().map(|entry| entry.path()) {
        if path.extension().is_none_or(|ext| ext != "json") {
            continue;
        }
        match fs::read(&path).map(|bytes| serde_json::from_slice(&bytes)) {
            Ok(Ok(value)) => values.push(value),
            Ok(Err(err)) => log::warn!("skipping {}: {err}", path.display()),
            Err(err) => log::warn!("skipping {}: {err}", path.display()),
        }
    }
    values
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn environments_and_runners_survive_reopening() {
        let dir =
            std::env::temp_dir().join(format!("poseidon-lite-store-{}", uuid::Uuid::new_v4()));
        let store = Store::open(&dir).unwrap();
        let env = Environment {
            image: "i".into(),
            prewarming_pool_size: 2,
            id: 5,
            ..Default::default()
        };
        store.save_environment(&env).unwrap();
        let record = RunnerRecord {
            id: RunnerId::new(EnvironmentId(5)),
            inactivity_timeout: 60,
            environment: env.clone(),
        };
        store.save_runner(&record).unwrap();
        let reopened = Store::open(&dir).unwrap();
        assert_eq!(reopened.environments(), vec![env]);
        assert_eq!(reopened.runners(), vec![record.clone()]);
        reopened.remove_environment(EnvironmentId(5)).unwrap();
        reopened.remove_runner(&record.id).unwrap();
        reopened.remove_runner(&record.id).unwrap();
        assert!(reopened.environments().is_empty() && reopened.runners().is_empty());
        fs::remove_dir_all(dir).unwrap();
    }
}
