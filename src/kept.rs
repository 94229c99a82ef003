//! Connections kept between pushes: each parked under a key until its time
//! is up, taken back by the next push to the same destination, or closed by
//! one thread for all of them (started with the first), which sleeps until
//! the nearest deadline. Dropping the set closes what it still holds.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub struct Kept<T: Send + 'static> {
    shared: Arc<Shared<T>>,
    closer: Mutex<Option<JoinHandle<()>>>,
}

struct Shared<T> {
    state: Mutex<State<T>>,
    /// Signalled when something is parked (its deadline may be the nearest)
    /// and when the set is dropped.
    changed: Condvar,
    close: fn(T),
}

struct State<T> {
    parked: HashMap<String, (Instant, T)>,
    ending: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A poisoned lock only means a holder panicked; the data stays usable.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl<T: Send + 'static> Kept<T> {
    /// An empty set whose values are ended with `close`.
    pub fn new(close: fn(T)) -> Kept<T> {
        Kept {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    parked: HashMap::new(),
                    ending: false,
                }),
                changed: Condvar::new(),
                close,
            }),
            closer: Mutex::new(None),
        }
    }

    /// Keeps `value` under `key` for `time`; what was kept there before is
    /// closed.
    pub fn park(&self, key: String, time: Duration, value: T) {
        if let Err(e) = self.start_closer() {
            // Nothing would close it when its time is up: close it now.
            tracing::warn!(error = %e, "cannot start the thread that closes kept connections");
            (self.shared.close)(value);
            return;
        }
        let replaced = lock(&self.shared.state)
            .parked
            .insert(key, (Instant::now() + time, value));
        self.shared.changed.notify_one();
        if let Some((_, old)) = replaced {
            (self.shared.close)(old);
        }
    }

    /// Takes back what is kept under `key`.
    pub fn take(&self, key: &str) -> Option<T> {
        lock(&self.shared.state)
            .parked
            .remove(key)
            .map(|(_, value)| value)
    }

    fn start_closer(&self) -> std::io::Result<()> {
        let mut closer = lock(&self.closer);
        if closer.is_none() {
            let shared = self.shared.clone();
            *closer = Some(
                std::thread::Builder::new()
                    .name("ferry-kept".into())
                    .spawn(move || close_when_due(&shared))?,
            );
        }
        Ok(())
    }
}

/// The closer's loop: closes what is due, then sleeps until the nearest
/// deadline or a change; closes everything once the set is dropped.
fn close_when_due<T>(shared: &Shared<T>) {
    let mut state = lock(&shared.state);
    loop {
        let now = Instant::now();
        let ending = state.ending;
        let due: Vec<String> = state
            .parked
            .iter()
            .filter(|(_, (until, _))| ending || *until <= now)
            .map(|(key, _)| key.clone())
            .collect();
        let closing: Vec<T> = due
            .iter()
            .filter_map(|key| state.parked.remove(key))
            .map(|(_, value)| value)
            .collect();
        if !closing.is_empty() {
            // Closed without the lock: a push taking another connection
            // does not wait for these.
            drop(state);
            closing.into_iter().for_each(shared.close);
            state = lock(&shared.state);
            continue;
        }
        if ending {
            return;
        }
        let nearest = state.parked.values().map(|(until, _)| *until).min();
        state = match nearest {
            Some(until) => {
                let wait = until.saturating_duration_since(now);
                let woken = shared.changed.wait_timeout(state, wait);
                woken.unwrap_or_else(|p| p.into_inner()).0
            }
            None => shared
                .changed
                .wait(state)
                .unwrap_or_else(|p| p.into_inner()),
        };
    }
}

impl<T: Send + 'static> Drop for Kept<T> {
    fn drop(&mut self) {
        lock(&self.shared.state).ending = true;
        self.shared.changed.notify_one();
        if let Some(closer) = lock(&self.closer).take() {
            let _ = closer.join();
        }
        // Without a closer nothing was ever parked.
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use super::*;

    /// Where the values closed by the tests go (each test's values carry
    /// their own channel).
    fn close(value: (u32, mpsc::Sender<u32>)) {
        let _ = value.1.send(value.0);
    }

    #[test]
    fn each_is_closed_when_its_time_is_up_unless_taken_back() {
        let (tx, closed) = mpsc::channel();
        let kept = Kept::new(close);
        kept.park("late".into(), Duration::from_millis(300), (1, tx.clone()));
        kept.park("soon".into(), Duration::from_millis(50), (2, tx.clone()));
        kept.park("taken".into(), Duration::from_millis(50), (3, tx.clone()));
        assert_eq!(kept.take("taken").map(|v| v.0), Some(3));
        let wait = Duration::from_secs(20);
        // The nearest deadline first, though parked after the other.
        assert_eq!(closed.recv_timeout(wait), Ok(2));
        assert_eq!(closed.recv_timeout(wait), Ok(1));
        assert_eq!(kept.take("late").map(|v| v.0), None);
        drop(kept);
        drop(tx);
        assert_eq!(closed.recv().ok(), None, "the taken one was not closed");
    }

    #[test]
    fn parking_under_a_used_key_closes_the_earlier_and_dropping_closes_the_rest() {
        let (tx, closed) = mpsc::channel();
        let kept = Kept::new(close);
        let hour = Duration::from_secs(3600);
        kept.park("k".into(), hour, (1, tx.clone()));
        kept.park("k".into(), hour, (2, tx.clone()));
        assert_eq!(closed.try_recv(), Ok(1));
        kept.park("other".into(), hour, (3, tx.clone()));
        drop(kept);
        let mut rest: Vec<u32> = closed.try_iter().collect();
        rest.sort();
        assert_eq!(rest, [2, 3]);
    }
}
