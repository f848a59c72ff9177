//! Token buckets that cap a device's bytes and operations per second.
//!
//! Each bucket holds at most its burst and refills at its rate. A request
//! goes through only if every bucket has enough for it, and then takes
//! from each; otherwise nothing is taken, the device stops serving (the
//! request stays on its queue) and the limiter's timer is armed for when
//! the buckets will have refilled enough. The timer is one of the device's
//! host descriptors, so its expiry wakes the device on the guest's I/O
//! thread, which serves on. A request larger than a bucket's burst goes
//! through once the bucket is full, and leaves it in debt: a limit is kept
//! on average without ever wedging the queue.

use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use vmm_sys_util::timerfd::TimerFd;

use crate::config::RateLimit;

/// One bucket: tokens in nanoseconds' worth of refill, so refills stay exact.
struct Bucket {
    rate: u64,
    burst: u64,
    /// Tokens now; negative after a request larger than the burst.
    tokens: i128,
    last: Instant,
}

impl Bucket {
    fn new(rate: u64, burst: Option<u64>, now: Instant) -> Bucket {
        let burst = burst.unwrap_or(rate).max(1);
        Bucket { rate, burst, tokens: i128::from(burst), last: now }
    }

    fn refill(&mut self, now: Instant) {
        let ns = now.saturating_duration_since(self.last).as_nanos() as i128;
        // Whole tokens only; the time toward the next one stays, unless the
        // bucket is full.
        let add = ns * i128::from(self.rate) / 1_000_000_000;
        if add > 0 {
            self.tokens += add;
            if self.tokens >= i128::from(self.burst) {
                self.tokens = i128::from(self.burst);
                self.last = now;
            } else {
                self.last += Duration::from_nanos((add * 1_000_000_000 / i128::from(self.rate)) as u64);
            }
        }
    }

    /// How long until `n` can go (0: now).
    fn wait_for(&self, n: u64) -> Duration {
        let needed = i128::from(n.min(self.burst)) - self.tokens;
        if needed <= 0 {
            return Duration::ZERO;
        }
        Duration::from_nanos((needed * 1_000_000_000 / i128::from(self.rate) + 1) as u64)
    }
}

pub struct RateLimiter {
    bytes: Option<Bucket>,
    ops: Option<Bucket>,
    timer: TimerFd,
    /// Requests held back so far.
    pub throttled: u64,
}

impl RateLimiter {
    pub fn new(limit: &RateLimit) -> std::io::Result<RateLimiter> {
        let now = Instant::now();
        Ok(RateLimiter {
            bytes: limit.bytes_per_s.map(|r| Bucket::new(r, limit.bytes_burst, now)),
            ops: limit.ops_per_s.map(|r| Bucket::new(r, limit.ops_burst, now)),
            timer: TimerFd::new()?,
            throttled: 0,
        })
    }

    /// Takes one operation of `bytes` if the buckets allow it now; else
    /// takes nothing, arms the timer for when they will, and says no.
    pub fn consume(&mut self, bytes: u64) -> bool {
        self.consume_at(bytes, Instant::now())
    }

    fn consume_at(&mut self, bytes: u64, now: Instant) -> bool {
        let mut wait = Duration::ZERO;
        for (bucket, n) in [(&mut self.bytes, bytes), (&mut self.ops, 1)] {
            if let Some(b) = bucket {
                b.refill(now);
                wait = wait.max(b.wait_for(n));
            }
        }
        if wait > Duration::ZERO {
            self.throttled += 1;
            if let Err(e) = self.timer.reset(wait, None) {
                log::warn!("rate limiter: cannot arm its timer: {e}");
            }
            return false;
        }
        for (bucket, n) in [(&mut self.bytes, bytes), (&mut self.ops, 1)] {
            if let Some(b) = bucket {
                b.tokens -= i128::from(n);
            }
        }
        true
    }

    /// The timer fired: clears it (the device then serves again).
    pub fn timer_fired(&mut self) {
        let _ = self.timer.wait();
    }

    pub fn timer_fd(&self) -> RawFd {
        self.timer.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_hold_a_rate_on_average_and_never_wedge() {
        let limit = RateLimit { bytes_per_s: Some(1000), ops_per_s: Some(10), ..Default::default() };
        let mut l = RateLimiter::new(&limit).unwrap();
        let t0 = l.bytes.as_ref().unwrap().last;
        // A second's burst: ten 100-byte operations, then no more.
        for _ in 0..10 {
            assert!(l.consume_at(100, t0));
        }
        assert!(!l.consume_at(1, t0));
        assert_eq!(l.throttled, 1);
        // 100 ms later: 100 bytes and one operation back.
        let t1 = t0 + Duration::from_millis(100);
        assert!(l.consume_at(100, t1));
        assert!(!l.consume_at(1, t1));
        // A request larger than the burst goes once the bucket is full, and
        // the bucket is in debt for it.
        let t2 = t1 + Duration::from_secs(5);
        assert!(l.consume_at(5000, t2));
        assert!(!l.consume_at(1, t2 + Duration::from_secs(3)));
        assert!(l.consume_at(1, t2 + Duration::from_millis(4100)));
        // The timer is armed for when the buckets will allow the request.
        assert!(l.timer.is_armed().unwrap());
    }

    #[test]
    fn limits_parse_and_nonsense_is_refused() {
        let l = RateLimit::parse_cli("bytes=10M,ops=1000,bytes-burst=64K").unwrap();
        assert_eq!(
            (l.bytes_per_s, l.ops_per_s, l.bytes_burst, l.ops_burst),
            (Some(10 << 20), Some(1000), Some(65536), None)
        );
        for bad in
            ["", "bytes", "bytes=0", "bytes=x", "colour=1", "ops-burst=5", "bytes=99999999999G", "bytes-burst=1K"]
        {
            assert!(RateLimit::parse_cli(bad).is_err(), "{bad:?} was taken");
        }
    }
}
