//! One direction of a link: holds chunks or datagrams until their release time, drawn from the
//! faults' delay and jitter (and, for datagrams, duplication) with the lane's own seeded generator.

use std::collections::BTreeMap;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::time::{sleep_until, Instant};

use super::Faults;

/// One direction of a link: holds items until their release time.
#[derive(Debug)]
pub(super) struct Lane<T> {
    faults: Faults,
    /// Never release an item before one that arrived earlier.
    ordered: bool,
    rng: StdRng,
    /// Keyed by release time, then arrival number, so equal times leave in arrival order.
    held: BTreeMap<(Instant, u64), T>,
    arrivals: u64,
    last_release: Option<Instant>,
}

impl<T> Lane<T> {
    pub(super) fn new(faults: Faults, ordered: bool, seed: u64) -> Self {
        Lane {
            faults,
            ordered,
            rng: StdRng::seed_from_u64(seed),
            held: BTreeMap::new(),
            arrivals: 0,
            last_release: None,
        }
    }

    pub(super) fn hold(&mut self, arrived: Instant, item: T) {
        let jitter = self.rng.gen_range(Duration::ZERO..=self.faults.jitter);
        let mut release = arrived + self.faults.delay + jitter;
        if let Some(last) = self.last_release.filter(|_| self.ordered) {
            release = release.max(last);
        }
        self.last_release = Some(release);
        self.held.insert((release, self.arrivals), item);
        self.arrivals += 1;
    }

    pub(super) fn next_release(&self) -> Option<Instant> {
        self.held.first_key_value().map(|(&(release, _), _)| release)
    }

    /// Takes the item with the earliest release time, whether or not that time has come.
    pub(super) fn pop_next(&mut self) -> Option<T> {
        self.held.pop_first().map(|(_, item)| item)
    }

    pub(super) fn len(&self) -> usize {
        self.held.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// Draws whether the next datagram is sent twice, from the lane's own generator.
    pub(super) fn draw_duplicate(&mut self) -> bool {
        self.rng.gen_bool(self.faults.duplicate)
    }
}

/// Sleeps until `deadline`, or forever when there is none.
pub(super) async fn sleep_until_some(deadline: Option<Instant>) {
    match deadline {
        // Tokio rounds a timer up to its next millisecond tick, which would add about a
        // millisecond to every hop of an undelayed link.
        Some(deadline) if deadline <= Instant::now() => {}
        Some(deadline) => sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::testing::delayed;

    #[test]
    fn ordered_lane_releases_in_arrival_order_within_the_delay() {
        let faults = delayed(10, 50);
        let mut lane = Lane::new(faults, true, 8);
        let start = Instant::now();
        for i in 0..100 {
            lane.hold(start + Duration::from_micros(i * 100), i);
        }
        let mut released = Vec::new();
        while let (Some(release), Some(item)) = (lane.next_release(), lane.pop_next()) {
            assert!(release >= start + faults.delay, "item {item} released before the delay");
            released.push(item);
        }
        assert_eq!(released, (0..100).collect::<Vec<_>>());
    }

    #[test]
    fn unordered_lane_reorders_and_repeats_its_choices_for_the_same_seed() {
        let releases = |seed| {
            let mut lane = Lane::new(delayed(10, 50), false, seed);
            let start = Instant::now();
            for i in 0..100 {
                lane.hold(start + Duration::from_micros(i * 100), i);
            }
            std::iter::from_fn(|| lane.pop_next()).collect::<Vec<u64>>()
        };
        let first = releases(9);
        assert_ne!(first, (0..100).collect::<Vec<_>>(), "jitter reordered nothing");
        assert_eq!(first, releases(9), "the same seed chose differently");
    }
}
