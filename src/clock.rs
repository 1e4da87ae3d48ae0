//! Points in time that can be written out and read back: [`Time`], an instant on the monotonic clock.
//!
//! The daemon's state keeps its deadlines as [`Time`]s, not as `Instant`s (which have no value outside the
//! process): CLOCK_MONOTONIC runs on across an exec of baton, so a deadline read back after one still
//! means the same moment. [`Time::now`] follows tokio's clock, so a paused test clock moves it too.
//! Nothing here sleeps.

use std::sync::OnceLock;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// A moment on CLOCK_MONOTONIC, as the time since the clock's origin (the boot, on Linux).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
pub struct Time(Duration);

/// The same moment on both clocks, taken once: tokio's `Instant` and CLOCK_MONOTONIC.
fn anchor() -> (Instant, Duration) {
    static ANCHOR: OnceLock<(Instant, Duration)> = OnceLock::new();
    *ANCHOR.get_or_init(|| (Instant::now(), monotonic()))
}

/// CLOCK_MONOTONIC, read from the kernel.
fn monotonic() -> Duration {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(Duration::from)
        .unwrap_or_default()
}

impl Time {
    /// The moment `since` after the clock's origin.
    pub const fn from_origin(since: Duration) -> Time {
        Time(since)
    }

    /// The time since the clock's origin.
    pub const fn since_origin(self) -> Duration {
        self.0
    }

    /// Now, on tokio's clock.
    pub fn now() -> Time {
        Time::of(Instant::now())
    }

    /// The moment `instant` stands for.
    pub fn of(instant: Instant) -> Time {
        let (base, origin) = anchor();
        match instant.checked_duration_since(base) {
            Some(after) => Time(origin + after),
            None => Time(origin.saturating_sub(base - instant)),
        }
    }

    /// This moment as a tokio `Instant`, to sleep until.
    pub fn instant(self) -> Instant {
        let (base, origin) = anchor();
        match self.0.checked_sub(origin) {
            Some(after) => base + after,
            None => base.checked_sub(origin - self.0).unwrap_or(base),
        }
    }

    /// The time from `earlier` to this moment; zero if `earlier` is later.
    pub fn since(self, earlier: Time) -> Duration {
        self.0.saturating_sub(earlier.0)
    }

    /// The time from this moment until `later`; zero if it has passed.
    pub fn until(self, later: Time) -> Duration {
        later.0.saturating_sub(self.0)
    }
}

impl std::ops::Add<Duration> for Time {
    type Output = Time;
    fn add(self, duration: Duration) -> Time {
        Time(self.0.saturating_add(duration))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn time_follows_a_paused_clock_and_converts_back() {
        let start = Time::now();
        tokio::time::advance(Duration::from_secs(5)).await;
        let later = Time::now();
        assert_eq!(later.since(start), Duration::from_secs(5));
        assert_eq!(Time::of(later.instant()), later);
        assert_eq!(start.until(later), Duration::from_secs(5));
        assert_eq!(later.until(start), Duration::ZERO);
    }

    #[test]
    fn a_time_before_the_anchor_converts_back_too() {
        let now = Instant::now();
        let earlier = now - Duration::from_millis(10);
        let (base, _) = anchor();
        let earlier = earlier.min(base - Duration::from_millis(1));
        assert_eq!(Time::of(earlier).instant(), earlier);
    }

    #[test]
    fn time_is_the_monotonic_clock() {
        let ours = Time::now().since_origin();
        let kernel = monotonic();
        let gap = ours.abs_diff(kernel);
        assert!(gap < Duration::from_secs(1), "{ours:?} against {kernel:?}");
    }
}
