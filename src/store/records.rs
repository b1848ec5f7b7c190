//! Runner records, written by one thread in the order they were asked for.
//!
//! A claim queues its record under the manager's lock and answers only once the writer has
//! written it: the record reaches the kernel before the client hears of the runner, so a
//! crash of the server never loses an answered claim, and a record that cannot be written
//! (full disk) fails the claim. Removals queued later (runner deleted, environment deleted)
//! are written later, so a deleted runner's record never reappears.
//!
//! With `state.sync` the writer also syncs every batch to the disk before answering (group
//! commit: the claims that arrived while one batch was synced share the next sync), so that
//! answered claims also survive a crash of the machine.

use std::{io, sync::Arc, thread};

use crossbeam_channel::{Receiver, Sender, TrySendError};

use super::{RunnerRecord, Store, remove_file, sync_dir, write_atomically};
use crate::id::RunnerId;

/// Records queued at most; a claim beyond it fails at once rather than wait under a lock.
/// Every queued operation waits for its answer, so the queue holds at most one record per
/// request in flight plus one removal per runner.
pub const MAX_QUEUED: usize = 4096;

/// Records written (and synced) together at most.
const MAX_BATCH: usize = 256;

impl Store {
    /// Writes a runner record atomically (synced to disk if `durable`).
    pub fn save_runner(&self, record: &RunnerRecord, durable: bool) -> io::Result<()> {
        let path = self.runners.join(format!("{}.json", record.id));
        write_atomically(&path, &serde_json::to_vec(record)?, durable)
    }

    /// Removes a runner record.
    pub fn remove_runner(&self, id: &RunnerId) -> io::Result<()> {
        remove_file(&self.runners.join(format!("{id}.json")))
    }

    /// Removes every runner record (and temporary file); how many records there were.
    pub fn remove_all_runners(&self) -> io::Result<usize> {
        let mut removed = 0;
        for entry in std::fs::read_dir(&self.runners)? {
            let path = entry?.path();
            if path
                .extension()
                .is_some_and(|ext| ext == "json" || ext == "tmp")
            {
                remove_file(&path)?;
                removed += usize::from(path.extension().is_some_and(|ext| ext == "json"));
            }
        }
        sync_dir(&self.runners)?;
        Ok(removed)
    }
}

/// What the record writer is asked to do.
#[derive(Debug)]
enum RecordOp {
    Save(RunnerRecord),
    Remove(RunnerId),
    /// Nothing; answered once everything queued before it is written.
    Barrier,
}

/// The answer to one queued operation.
pub type Done = Receiver<io::Result<()>>;

/// Writes runner records on a thread of its own; see the module docs.
#[derive(Debug, Clone)]
pub struct RecordWriter {
    ops: Sender<(RecordOp, Sender<io::Result<()>>)>,
}

impl RecordWriter {
    /// Starts the writer; it ends when the last clone is dropped.
    pub fn spawn(store: Arc<Store>) -> io::Result<RecordWriter> {
        let sync = store.sync_runners;
        let (ops, queue) = crossbeam_channel::bounded(MAX_QUEUED);
        thread::Builder::new()
            .name("records".into())
            .spawn(move || write_batches(&store, sync, &queue))?;
        Ok(RecordWriter { ops })
    }

    /// Queues a claimed runner's record without waiting; fails at once if the queue is full.
    /// Call under the manager's lock, so that the order of records is the order of claims.
    pub fn queue_save(&self, record: RunnerRecord) -> io::Result<Done> {
        let (done, answer) = crossbeam_channel::bounded(1);
        match self.ops.try_send((RecordOp::Save(record), done)) {
            Ok(()) => Ok(answer),
            Err(TrySendError::Full(_)) => Err(io::Error::other("too many records queued")),
            Err(TrySendError::Disconnected(_)) => Err(io::Error::other("record writer gone")),
        }
    }

    /// Removes runners' records and waits until that is written.
    pub fn remove(&self, ids: Vec<RunnerId>) -> io::Result<()> {
        let answers: Vec<Done> = ids
            .into_iter()
            .map(|id| self.send(RecordOp::Remove(id)))
            .collect();
        answers.iter().try_for_each(wait_for)
    }

    /// Waits until everything queued so far is written.
    pub fn flush(&self) -> io::Result<()> {
        wait_for(&self.send(RecordOp::Barrier))
    }

    fn send(&self, op: RecordOp) -> Done {
        let (done, answer) = crossbeam_channel::bounded(1);
        if let Err(err) = self.ops.send((op, done)) {
            let _ = err
                .into_inner()
                .1
                .send(Err(io::Error::other("record writer gone")));
        }
        answer
    }
}

/// Waits for a queued operation's answer.
pub fn wait_for(done: &Done) -> io::Result<()> {
    done.recv()
        .unwrap_or_else(|_| Err(io::Error::other("record writer gone")))
}

/// The writer thread: takes what is queued, writes it, syncs once, answers.
fn write_batches(store: &Store, sync: bool, queue: &Receiver<(RecordOp, Sender<io::Result<()>>)>) {
    while let Ok(first) = queue.recv() {
        let mut batch = vec![first];
        batch.extend(queue.try_iter().take(MAX_BATCH - 1));
        let mut results: Vec<io::Result<()>> = batch
            .iter()
            .map(|(op, _)| match op {
                RecordOp::Save(record) => store.save_runner(record, sync),
                RecordOp::Remove(id) => store.remove_runner(id),
                RecordOp::Barrier => Ok(()),
            })
            .collect();
        if sync && let Err(err) = sync_dir(&store.runners) {
            let message = format!("cannot sync {}: {err}", store.runners.display());
            results = results
                .into_iter()
                .map(|result| result.and(Err(io::Error::other(message.clone()))))
                .collect();
        }
        for ((op, done), result) in batch.into_iter().zip(results) {
            if let Err(err) = &result {
                log::error!("cannot update a runner record ({op:?}): {err}");
            }
            let _ = done.send(result);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::EnvironmentId;
    use std::fs;

    #[test]
    fn saves_are_answered_once_written_and_removals_follow_them() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap().sync_runners(true));
        let writer = RecordWriter::spawn(Arc::clone(&store)).unwrap();
        let record = RunnerRecord {
            id: RunnerId::new(EnvironmentId(1)),
            inactivity_timeout: 5,
        };
        wait_for(&writer.queue_save(record.clone()).unwrap()).unwrap();
        assert_eq!(store.load().unwrap().runners, vec![record.clone()]);
        let queued = writer.queue_save(record.clone()).unwrap();
        writer.remove(vec![record.id.clone()]).unwrap();
        wait_for(&queued).unwrap();
        assert!(store.load().unwrap().runners.is_empty());
        writer.flush().unwrap();
    }

    #[test]
    fn a_record_that_cannot_be_written_is_an_error_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let writer = RecordWriter::spawn(Arc::clone(&store)).unwrap();
        fs::remove_dir(dir.path().join("runners")).unwrap();
        let record = RunnerRecord {
            id: RunnerId::new(EnvironmentId(1)),
            inactivity_timeout: 5,
        };
        assert!(wait_for(&writer.queue_save(record).unwrap()).is_err());
    }
}
