//! The retry policy every retrying loop shares: capped exponential backoff with jitter.
//!
//! Callers only classify (transient: wait [`Backoff::next_wait`] and try again; definite: stop
//! or dead-letter); how long to wait lives here, once. A success calls [`Backoff::reset`].
//!
//! ```text
//!   wait n = min(initial · 2ⁿ, max), then jittered into [wait/2, wait]
//! ```
//!
//! The jitter keeps a fleet of consumers (or a restarted producer and its peers) from retrying
//! against a recovering server in lock-step.

use std::time::Duration;

use rand::Rng;

/// Capped exponential backoff with jitter.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    /// Starts at `initial` and doubles up to `max` (`max` below `initial` is raised to it).
    pub fn new(initial: Duration, max: Duration) -> Self {
        let initial = initial.max(Duration::from_millis(1));
        Self {
            initial,
            max: max.max(initial),
            current: initial,
        }
    }

    /// How long to wait before the next attempt: the current step jittered into
    /// `[step/2, step]`; the step then doubles (up to the cap).
    pub fn next_wait(&mut self) -> Duration {
        let wait = jitter(self.current);
        self.current = (self.current * 2).min(self.max);
        wait
    }

    /// The step the next wait is drawn from, without jitter.
    #[cfg(test)]
    fn step(&self) -> Duration {
        self.current
    }

    /// After a success: the next failure waits `initial` again.
    pub fn reset(&mut self) {
        self.current = self.initial;
    }
}

/// `d` jittered into `[d/2, d]`.
fn jitter(d: Duration) -> Duration {
    let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(rand::thread_rng().gen_range(ms / 2..=ms.max(1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_and_stays_within_jitter() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(700));
        let steps: Vec<u64> = (0..6)
            .map(|_| {
                let step = b.step().as_millis() as u64;
                let wait = b.next_wait().as_millis() as u64;
                assert!(
                    wait >= step / 2 && wait <= step,
                    "wait {wait} outside [{}, {step}]",
                    step / 2
                );
                step
            })
            .collect();
        assert_eq!(steps, [100, 200, 400, 700, 700, 700]);
        b.reset();
        assert_eq!(b.step(), Duration::from_millis(100));
    }

    #[test]
    fn a_cap_below_the_start_is_raised() {
        let mut b = Backoff::new(Duration::from_secs(2), Duration::from_secs(1));
        b.next_wait();
        assert_eq!(b.step(), Duration::from_secs(2));
    }
}
