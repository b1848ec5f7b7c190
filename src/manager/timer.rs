//! The inactivity timer: one thread with a min-heap of deadlines. Arming a runner again gives it
//! a new generation; entries of older generations stay in the heap and are skipped when they
//! come due. When a deadline passes, the thread sends `(runner id, generation)` over a channel.

use std::{
    cmp::Reverse,
    collections::{BinaryHeap, HashMap},
    thread,
    time::Instant,
};

use crossbeam_channel::{Receiver, Sender, never, select};

use super::state::TimerCommand;
use crate::id::RunnerId;

/// A due runner: `(id, generation)`.
pub(super) type Expiry = (RunnerId, u64);

/// The timer's state, separate from the thread so that it is tested with explicit instants.
#[derive(Debug, Default)]
pub(super) struct TimerHeap {
    heap: BinaryHeap<Reverse<(Instant, u64, RunnerId)>>,
    current: HashMap<RunnerId, u64>,
}

impl TimerHeap {
    /// Applies a command.
    pub fn apply(&mut self, command: TimerCommand) {
        match command {
            TimerCommand::Arm {
                id,
                deadline,
                generation,
            } => {
                // Commands are sent after the manager's lock is released, so two armings of
                // one runner can arrive out of order: an older generation never replaces a
                // newer one.
                if self
                    .current
                    .get(&id)
                    .is_some_and(|&current| current > generation)
                {
                    return;
                }
                self.current.insert(id.clone(), generation);
                self.heap.push(Reverse((deadline, generation, id)));
            }
            TimerCommand::Disarm(id) => {
                self.current.remove(&id);
            }
        }
        self.drop_stale_top();
    }

    /// The earliest live deadline.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse((deadline, _, _))| *deadline)
    }

    /// Removes and returns every live entry due at `now`.
    pub fn pop_due(&mut self, now: Instant) -> Vec<Expiry> {
        let mut due = Vec::new();
        while let Some(Reverse((deadline, _, _))) = self.heap.peek() {
            if *deadline > now {
                break;
            }
            let Some(Reverse((_, generation, id))) = self.heap.pop() else {
                break;
            };
            if self.current.get(&id) == Some(&generation) {
                self.current.remove(&id);
                due.push((id, generation));
            }
        }
        self.drop_stale_top();
        due
    }

    /// Stale entries are dropped lazily; keeping the top live keeps `next_deadline` exact and
    /// the heap from growing with re-armed runners.
    fn drop_stale_top(&mut self) {
        while let Some(Reverse((_, generation, id))) = self.heap.peek() {
            if self.current.get(id) == Some(generation) {
                break;
            }
            self.heap.pop();
        }
        if self.heap.len() > 64 && self.heap.len() > 4 * self.current.len() {
            let current = &self.current;
            self.heap
                .retain(|Reverse((_, generation, id))| current.get(id) == Some(generation));
        }
    }

    /// Number of armed runners.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.current.len()
    }

    /// Whether no runner is armed.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.current.is_empty()
    }
}

/// Starts the timer thread. It ends when `stop` or `commands` is disconnected or `expired` is
/// dropped.
pub(super) fn spawn(
    commands: Receiver<TimerCommand>,
    expired: Sender<Expiry>,
    stop: Receiver<()>,
) -> std::io::Result<thread::JoinHandle<()>> {
    thread::Builder::new().name("timer".into()).spawn(move || {
        let mut heap = TimerHeap::default();
        loop {
            let wake = heap
                .next_deadline()
                .map_or_else(never, crossbeam_channel::at);
            select! {
                recv(commands) -> command => match command {
                    Ok(command) => heap.apply(command),
                    Err(_) => return,
                },
                recv(stop) -> _ => return,
                recv(wake) -> _ => {
                    for expiry in heap.pop_due(Instant::now()) {
                        if expired.send(expiry).is_err() {
                            return;
                        }
                    }
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::id::EnvironmentId;

    fn arm(heap: &mut TimerHeap, id: &RunnerId, at: Instant, generation: u64) {
        heap.apply(TimerCommand::Arm {
            id: id.clone(),
            deadline: at,
            generation,
        });
    }

    #[test]
    fn due_runners_come_out_in_deadline_order() {
        let now = Instant::now();
        let (a, b) = (
            RunnerId::new(EnvironmentId(1)),
            RunnerId::new(EnvironmentId(1)),
        );
        let mut heap = TimerHeap::default();
        arm(&mut heap, &a, now + Duration::from_secs(2), 1);
        arm(&mut heap, &b, now + Duration::from_secs(1), 1);
        assert_eq!(heap.next_deadline(), Some(now + Duration::from_secs(1)));
        assert!(heap.pop_due(now).is_empty());
        assert_eq!(
            heap.pop_due(now + Duration::from_secs(5)),
            vec![(b, 1), (a, 1)]
        );
        assert!(heap.is_empty());
    }

    #[test]
    fn rearming_skips_the_stale_generation() {
        let now = Instant::now();
        let id = RunnerId::new(EnvironmentId(1));
        let mut heap = TimerHeap::default();
        arm(&mut heap, &id, now + Duration::from_secs(1), 1);
        arm(&mut heap, &id, now + Duration::from_secs(10), 2);
        assert_eq!(heap.next_deadline(), Some(now + Duration::from_secs(10)));
        assert!(heap.pop_due(now + Duration::from_secs(5)).is_empty());
        assert_eq!(heap.pop_due(now + Duration::from_secs(10)), vec![(id, 2)]);
    }

    #[test]
    fn an_older_arming_arriving_late_is_ignored() {
        let now = Instant::now();
        let id = RunnerId::new(EnvironmentId(1));
        let mut heap = TimerHeap::default();
        arm(&mut heap, &id, now + Duration::from_secs(10), 3);
        arm(&mut heap, &id, now + Duration::from_secs(5), 2);
        assert!(heap.pop_due(now + Duration::from_secs(6)).is_empty());
        assert_eq!(heap.pop_due(now + Duration::from_secs(10)), vec![(id, 3)]);
    }

    #[test]
    fn disarmed_runners_never_expire() {
        let now = Instant::now();
        let id = RunnerId::new(EnvironmentId(1));
        let mut heap = TimerHeap::default();
        arm(&mut heap, &id, now, 1);
        heap.apply(TimerCommand::Disarm(id));
        assert_eq!(heap.next_deadline(), None);
        assert!(heap.pop_due(now + Duration::from_secs(1)).is_empty());
    }

    #[test]
    fn heap_stays_small_when_one_runner_is_rearmed_often() {
        let now = Instant::now();
        let id = RunnerId::new(EnvironmentId(1));
        let mut heap = TimerHeap::default();
        for generation in 0..10_000 {
            arm(
                &mut heap,
                &id,
                now + Duration::from_secs(100 - generation % 50),
                generation,
            );
        }
        assert!(heap.heap.len() <= 256, "heap grew to {}", heap.heap.len());
        assert_eq!(heap.len(), 1);
    }

    #[test]
    fn the_thread_reports_expiries_and_stops_when_disconnected() {
        let (commands, rx) = crossbeam_channel::unbounded();
        let (tx, expired) = crossbeam_channel::unbounded();
        let (_stop, stop) = crossbeam_channel::bounded(0);
        let thread = spawn(rx, tx, stop).unwrap();
        let id = RunnerId::new(EnvironmentId(3));
        let deadline = Instant::now();
        commands
            .send(TimerCommand::Arm {
                id: id.clone(),
                deadline,
                generation: 7,
            })
            .unwrap();
        assert_eq!(expired.recv_timeout(Duration::from_secs(5)), Ok((id, 7)));
        drop(commands);
        thread.join().unwrap();
    }
}
