//! The memory governor: guests may be given more RAM than the host (or the
//! cgroup the supervisor runs in) has, and page sharing is what makes it
//! fit. But guests fill their memory faster than any scanner merges it,
//! and at the wall the kernel's OOM killer ends whatever it picks. The
//! governor keeps them off the wall, every [`TICK`] near it ([`SLOW_TICK`]
//! while room is plentiful and no guest is held):
//!
//! - **The wall.** Room is the tightest of host `MemAvailable` and, for our
//!   cgroup and each of its ancestors with a limit, that limit less the
//!   level's working set (`cgroup::OwnCgroup`). The reserve is a share of
//!   the smaller of host RAM and the tightest limit
//!   (`--memory-reserve`, 5% by default), at least [`MIN_RESERVE`].
//! - **Reclaim first.** Near the wall (room under twice the reserve, and
//!   what the guests growing now will add), guests with a balloon whose
//!   driver says they hold free memory are asked to give it back: their
//!   balloon's target is raised by that free memory less a margin
//!   ([`GuestMemory::spare`]), a guest at most every [`RECLAIM_EVERY`]
//!   (its statistics must catch up first). Balloons take seconds, so the
//!   throttles below still hold the wall meanwhile. Once room is
//!   plentiful again, with no guest held, the balloons it filled are
//!   emptied, one guest per [`SETTLE`].
//! - **Backpressure.** While room is under the reserve (less what the
//!   guests growing now will add in the next [`LOOKAHEAD`] at the rate they
//!   grow), every running guest whose memory grew since the last tick is
//!   throttled: its vCPUs held
//!   through the same gate as a pause (a pause of its own, so the user's
//!   pause and resume stay the user's), and page sharing is asked to merge
//!   it first; and in turn every [`MERGE_EVERY`] one guest is merged at
//!   once, not at the scanner's pace. Once room is back above twice the
//!   reserve, throttled guests
//!   go again, first in first out, one per [`SETTLE`], so they do not all
//!   fill at once again.
//! - **Waves.** `vmm run` starts a guest only once its whole RAM fits in
//!   the room above the reserve and above what the guests still filling
//!   (or just let in) may yet take, or once no guest is growing or
//!   throttled. A guest started through the API that does not fit so
//!   starts held, and goes with the others held.
//! - **Urgency.** Page sharing yields to the guests while room is
//!   plentiful (its scanner runs at `--scan-nice`, below the vCPUs): the
//!   memory it would free is not needed yet, and the CPU is. From the moment
//!   room is no longer plentiful (less than four times the reserve and what
//!   the guests filling now may still take) until it is again, the scanner
//!   runs at [`URGENT_NICE`], ahead of the vCPUs.
//! - **The last resort.** When room has stayed under the reserve (or
//!   under twice it with a guest held) for [`STUCK`] without growing (sharing cannot give back more: the guests
//!   really hold that much unique memory), one guest is ended, with "not
//!   enough memory" as its reason: the largest of those throttled (asking
//!   for memory now), else the largest of all. Never the supervisor, and
//!   never by the kernel.
//!
//! [`Governor`] decides from what it is shown; the manager measures,
//! applies the decisions and keeps the books (throttled time per guest).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::memory::{host_available_memory, host_total_memory, MIB};
use crate::supervisor::cgroup::OwnCgroup;

/// How often the governor looks: a guest filling its RAM at a few hundred
/// MiB/s grows only a few MiB in between.
pub const TICK: Duration = Duration::from_millis(10);
/// How often it looks while room is over four times the reserve beyond
/// what guests may still fill: reading every guest's cgroup 100 times a
/// second cost 6% of a core with 50 guests.
pub const SLOW_TICK: Duration = Duration::from_millis(100);
/// How far ahead growth is counted against the reserve: a throttle takes a
/// few milliseconds to land, and guests fill at hundreds of MiB/s.
pub const LOOKAHEAD: Duration = Duration::from_millis(100);
/// The least reserve, whatever share of a small wall the percentage is.
pub const MIN_RESERVE: u64 = 64 * MIB;
/// Least time between letting two throttled guests go.
pub const SETTLE: Duration = Duration::from_millis(250);
/// How long room may stay under the reserve without growing before a guest
/// is ended for memory.
pub const STUCK: Duration = Duration::from_secs(5);
/// Growth in a [`TICK`] below this is noise (copy-on-write breaks of a few
/// pages), not a guest filling its memory (scaled to the time between
/// looks).
const GROWTH: u64 = 256 * 1024;
/// Room that grows by less than this in a squeeze is not progress.
const PROGRESS: u64 = 4 * MIB;
/// A guest counts as growing for this long after it last grew (waves).
const QUIET: Duration = Duration::from_secs(1);
/// In a squeeze, one guest is asked to be merged at once this often.
const MERGE_EVERY: Duration = Duration::from_millis(250);
/// The scanner's nice value while room is short: ahead of the vCPUs, whose
/// memory it is freeing.
pub const URGENT_NICE: i32 = -10;
/// Least time between two reclaims from one guest: its balloon's
/// statistics (every 5 s by default) must show what the last one took.
pub const RECLAIM_EVERY: Duration = Duration::from_secs(6);
/// Free memory below this is not worth a balloon request.
pub const MIN_RECLAIM: u64 = 8 * MIB;

/// Where the wall is.
pub struct Wall {
    cgroup: Option<OwnCgroup>,
}

impl Wall {
    pub fn find() -> Wall {
        Wall { cgroup: OwnCgroup::find() }
    }

    /// Bytes that may still be used before the wall.
    pub fn room(&self) -> u64 {
        let host = host_available_memory().unwrap_or(u64::MAX);
        self.cgroup.as_ref().and_then(OwnCgroup::room).map_or(host, |c| c.min(host))
    }

    /// What there is in all: host RAM, or our cgroup's limit if smaller.
    pub fn size(&self) -> u64 {
        let host = host_total_memory().unwrap_or(u64::MAX);
        self.cgroup.as_ref().and_then(OwnCgroup::limit).map_or(host, |l| l.min(host))
    }

    pub fn describe(&self) -> String {
        match self.cgroup.as_ref().and_then(OwnCgroup::limit) {
            Some(limit) => format!("host MemAvailable and the memory cgroup limits (the tightest {} MiB)", limit / MIB),
            None => "host MemAvailable".into(),
        }
    }
}

/// One guest as the governor sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct GuestMemory {
    pub id: usize,
    /// Host memory its process holds now.
    pub bytes: u64,
    /// Its RAM: the most it may fill.
    pub size: u64,
    /// Its vCPUs may run (started, not paused by the user, not ending).
    pub running: bool,
    /// What its balloon could give back now: the free memory its driver
    /// last reported, less a margin for the guest (0 without a balloon
    /// driver).
    pub spare: u64,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    Throttle(usize),
    Release(usize),
    /// Have page sharing merge this guest now, not at the scanner's pace.
    Merge(usize),
    /// Room has become short (true) or plentiful again (false): the
    /// scanner runs ahead of the vCPUs, or yields to them.
    Urgent(bool),
    /// End this guest: sharing cannot make room. The reason says why.
    End(usize, String),
    /// Set this guest's balloon to hold this many bytes: more to reclaim
    /// its free memory, 0 to give it all back.
    Balloon(usize, u64),
}

struct Squeeze {
    /// When room last grew (or the squeeze began).
    since: Instant,
    best_room: u64,
}

pub struct Governor {
    reserve: u64,
    last_bytes: BTreeMap<usize, u64>,
    /// When each guest was first seen or last grew.
    last_grew: BTreeMap<usize, Instant>,
    /// Guests let in (`admits`) but not seen yet: when, and their RAM.
    promised: Vec<(Instant, u64)>,
    /// Throttled guests, first throttled first.
    throttled: Vec<usize>,
    squeeze: Option<Squeeze>,
    last_release: Option<Instant>,
    last_growth: Option<Instant>,
    /// Guests ended for memory whose process has not gone yet.
    ending: Vec<usize>,
    /// What the guests that grew lately may still fill, at the last tick.
    filling: u64,
    last_step: Option<Instant>,
    /// How long until the next look.
    next_tick: Duration,
    /// In a squeeze, the guest last asked to be merged, and when.
    merged_up_to: usize,
    last_merge_ask: Option<Instant>,
    /// Whether page sharing was last told room is short.
    urgent: bool,
    /// What each guest's balloon holds at the governor's asking, and when
    /// it last asked.
    balloons: BTreeMap<usize, (u64, Instant)>,
    /// Balloon requests made so far, to reclaim and to give back.
    pub reclaims: u64,
    pub reclaimed_bytes: u64,
    pub returns: u64,
}

impl Governor {
    pub fn new(reserve: u64) -> Governor {
        Governor {
            reserve: reserve.max(MIN_RESERVE),
            last_bytes: BTreeMap::new(),
            last_grew: BTreeMap::new(),
            promised: Vec::new(),
            throttled: Vec::new(),
            squeeze: None,
            last_release: None,
            last_growth: None,
            ending: Vec::new(),
            filling: 0,
            last_step: None,
            next_tick: TICK,
            merged_up_to: 0,
            last_merge_ask: None,
            urgent: false,
            balloons: BTreeMap::new(),
            reclaims: 0,
            reclaimed_bytes: 0,
            returns: 0,
        }
    }

    /// How long to wait before the next `step`.
    pub fn next_tick(&self) -> Duration {
        self.next_tick
    }

    pub fn reserve(&self) -> u64 {
        self.reserve
    }

    /// What to do now, with `room` bytes left before the wall.
    pub fn step(&mut self, now: Instant, room: u64, guests: &[GuestMemory]) -> Vec<Action> {
        // Guests gone since the last tick leave the books.
        self.throttled.retain(|id| guests.iter().any(|g| g.id == *id));
        self.ending.retain(|id| guests.iter().any(|g| g.id == *id));
        self.balloons.retain(|id, _| guests.iter().any(|g| g.id == *id));
        // Growth is measured over the time since the last look.
        let ticks = self.last_step.map_or(1.0, |t| now.duration_since(t).as_secs_f64() / TICK.as_secs_f64()).max(1.0);
        self.last_step = Some(now);
        let mut growing = Vec::new();
        let mut incoming = 0;
        for g in guests {
            match self.last_bytes.get(&g.id) {
                Some(&before) if g.bytes as f64 > before as f64 + GROWTH as f64 * ticks => {
                    growing.push(g.id);
                    let rate = (g.bytes - before) as f64 / (ticks * TICK.as_secs_f64());
                    incoming += (rate * LOOKAHEAD.as_secs_f64()) as u64;
                    self.last_grew.insert(g.id, now);
                }
                Some(_) => {}
                None => {
                    // A new guest: it takes the place of a promise, and
                    // counts as filling until it has been quiet a while.
                    self.last_grew.insert(g.id, now);
                    self.last_growth = Some(now);
                    if !self.promised.is_empty() {
                        self.promised.remove(0);
                    }
                }
            }
        }
        self.promised.retain(|&(at, _)| now.duration_since(at) < QUIET);
        self.last_grew.retain(|id, _| guests.iter().any(|g| g.id == *id));
        if !growing.is_empty() {
            self.last_growth = Some(now);
        }
        self.last_bytes = guests.iter().map(|g| (g.id, g.bytes)).collect();
        self.filling = guests
            .iter()
            .filter(|g| self.last_grew.get(&g.id).is_some_and(|&t| now.duration_since(t) < QUIET))
            .map(|g| g.size.saturating_sub(g.bytes))
            .sum();
        let mut actions = Vec::new();
        // Free memory held by guests goes first: asked back before anyone
        // is held, and long before anyone is ended.
        if room < (2 * self.reserve).saturating_add(incoming) {
            for g in guests.iter().filter(|g| g.spare >= MIN_RECLAIM && !self.ending.contains(&g.id)) {
                let last = self.balloons.get(&g.id).copied();
                if last.is_none_or(|(_, asked)| now.duration_since(asked) >= RECLAIM_EVERY) {
                    let held = last.map_or(0, |(held, _)| held);
                    let target = (held + g.spare).min(g.size);
                    self.balloons.insert(g.id, (target, now));
                    self.reclaims += 1;
                    self.reclaimed_bytes += target - held;
                    actions.push(Action::Balloon(g.id, target));
                }
            }
        }
        let squeezed = room < self.reserve.saturating_add(incoming);
        if squeezed {
            for g in guests.iter().filter(|g| g.running && growing.contains(&g.id)) {
                if self.hold(g.id) {
                    actions.push(Action::Throttle(g.id));
                }
            }
        }
        // Held guests wait for twice the reserve: until then it is a squeeze
        // too, or a guest could be held for ever just above the reserve.
        if squeezed || (!self.throttled.is_empty() && room < 2 * self.reserve) {
            let squeeze = self.squeeze.get_or_insert(Squeeze { since: now, best_room: room });
            if room > squeeze.best_room + PROGRESS {
                *squeeze = Squeeze { since: now, best_room: room };
            }
            // Room comes from merging: every guest in turn, the held ones
            // (merged when throttled) and the ones that stopped growing.
            if self.last_merge_ask.is_none_or(|t| now.duration_since(t) >= MERGE_EVERY) {
                let next =
                    guests.iter().map(|g| g.id).find(|&id| id > self.merged_up_to).or(guests.first().map(|g| g.id));
                if let Some(id) = next {
                    actions.push(Action::Merge(id));
                    self.merged_up_to = id;
                    self.last_merge_ask = Some(now);
                }
            }
            if now.duration_since(squeeze.since) >= STUCK {
                // The guests asking for memory now go first (the largest of
                // them), rather than one that has its memory and works.
                let candidates = guests.iter().filter(|g| !self.ending.contains(&g.id));
                let victim = candidates
                    .clone()
                    .filter(|g| self.throttled.contains(&g.id))
                    .max_by_key(|g| g.bytes)
                    .or_else(|| candidates.max_by_key(|g| g.bytes));
                if let Some(v) = victim {
                    actions.push(Action::End(
                        v.id,
                        format!(
                            "not enough memory: {} MiB of room (a {} MiB reserve) for {} s, and page sharing \
                             gave none back; this guest wanted more and held {} MiB",
                            room / MIB,
                            self.reserve / MIB,
                            STUCK.as_secs(),
                            v.bytes / MIB
                        ),
                    ));
                    self.ending.push(v.id);
                    self.throttled.retain(|&id| id != v.id);
                }
                // Its memory goes when its process does: wait again.
                *squeeze = Squeeze { since: now, best_room: room };
            }
        } else {
            self.squeeze = None;
            let settled = self.last_release.is_none_or(|t| now.duration_since(t) >= SETTLE);
            if settled && !self.throttled.is_empty() {
                actions.push(Action::Release(self.throttled.remove(0)));
                self.last_release = Some(now);
            }
        }
        let plenty = room / 4 > self.reserve.saturating_add(self.filling).saturating_add(incoming);
        // Plenty of room, nobody held: the balloons go back, one at a time.
        let settled = self.last_release.is_none_or(|t| now.duration_since(t) >= SETTLE);
        if plenty && settled && self.throttled.is_empty() {
            if let Some((&id, _)) = self.balloons.iter().find(|(_, &(held, _))| held > 0) {
                self.balloons.insert(id, (0, now));
                self.returns += 1;
                self.last_release = Some(now);
                actions.push(Action::Balloon(id, 0));
            }
        }
        if plenty == self.urgent {
            self.urgent = !plenty;
            actions.push(Action::Urgent(self.urgent));
        }
        self.next_tick = if plenty && self.throttled.is_empty() && self.ending.is_empty() { SLOW_TICK } else { TICK };
        actions
    }

    /// Counts guest `id` among the held (throttled, or started held): it
    /// goes when they go. False if it was already.
    pub fn hold(&mut self, id: usize) -> bool {
        let new = !self.throttled.contains(&id);
        if new {
            self.throttled.push(id);
        }
        new
    }

    /// Whether a guest of `bytes` may start now (waves): no guest is held,
    /// and it fits above the reserve and what others may still fill, or
    /// nothing else is growing. A guest let in is counted as filling from
    /// then on.
    pub fn admits(&mut self, now: Instant, room: u64, bytes: u64) -> bool {
        let promised: u64 = self.promised.iter().map(|&(_, b)| b).sum();
        let fits = room >= self.reserve + self.filling + promised + bytes;
        let quiet = self.last_growth.is_none_or(|t| now.duration_since(t) >= QUIET) && self.promised.is_empty();
        // Nothing starts while a guest is held: it would take the room the
        // held ones wait for, first come first served.
        let admitted = self.throttled.is_empty() && self.ending.is_empty() && (fits || quiet);
        if admitted {
            self.promised.push((now, bytes));
        }
        admitted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RESERVE: u64 = 100 * MIB;

    /// The actions other than merge requests.
    /// The throttles, releases and ends (merges asked and urgency apart).
    fn decided(actions: Vec<Action>) -> Vec<Action> {
        actions.into_iter().filter(|a| !matches!(a, Action::Merge(_) | Action::Urgent(_))).collect()
    }

    fn guest(id: usize, mib: u64) -> GuestMemory {
        GuestMemory { id, bytes: mib * MIB, size: 512 * MIB, running: true, spare: 0 }
    }

    #[test]
    fn throttles_only_the_growing_and_lets_them_go_one_at_a_time() {
        let mut gov = Governor::new(RESERVE);
        let t = Instant::now();
        assert!(decided(gov.step(t, 1000 * MIB, &[guest(0, 10), guest(1, 10), guest(2, 10)])).is_empty());
        // Under the reserve: 0 and 2 grew, 1 did not; a user-paused one is left alone.
        let paused = GuestMemory { running: false, ..guest(3, 50) };
        let actions =
            decided(gov.step(t + TICK, 50 * MIB, &[guest(0, 60), guest(1, 10), guest(2, 30), paused.clone()]));
        assert_eq!(actions, [Action::Throttle(0), Action::Throttle(2)]);
        // Between the reserve and twice it: nothing changes.
        assert!(decided(gov.step(t + 2 * TICK, 150 * MIB, &[guest(0, 60), guest(1, 10), guest(2, 30)])).is_empty());
        // Room again: first in, first out, one per SETTLE.
        let now = t + 3 * TICK;
        assert_eq!(
            decided(gov.step(now, 300 * MIB, &[guest(0, 20), guest(1, 10), guest(2, 10)])),
            [Action::Release(0)]
        );
        assert!(decided(gov.step(now + TICK, 300 * MIB, &[guest(0, 20), guest(1, 10), guest(2, 10)])).is_empty());
        assert_eq!(
            decided(gov.step(now + SETTLE, 300 * MIB, &[guest(0, 20), guest(1, 10), guest(2, 10)])),
            [Action::Release(2)]
        );
    }

    #[test]
    fn ends_the_largest_guest_only_when_room_stops_growing() {
        let mut gov = Governor::new(RESERVE);
        let t = Instant::now();
        gov.step(t, 1000 * MIB, &[guest(0, 10), guest(1, 10)]);
        assert_eq!(decided(gov.step(t, 50 * MIB, &[guest(0, 300), guest(1, 200)])).len(), 2);
        // Room grows (sharing at work): no end, however long it takes.
        let both = [guest(0, 300), guest(1, 200)];
        for i in 1..=9 {
            let actions = decided(gov.step(t + Duration::from_secs(i), (50 + 5 * i) * MIB, &both));
            assert!(actions.is_empty(), "at {i} s: {actions:?}");
        }
        // Stuck at 99 MiB from 9 s on (95 -> 99 is not progress): ended at
        // 9 s + STUCK, the largest first, once.
        assert!(decided(gov.step(t + Duration::from_secs(13), 99 * MIB, &both)).is_empty());
        let at = t + Duration::from_secs(9) + STUCK;
        let actions = decided(gov.step(at, 99 * MIB, &both));
        assert!(matches!(&actions[..], [Action::End(0, why)] if why.starts_with("not enough memory")), "{actions:?}");
        assert!(decided(gov.step(at + Duration::from_secs(1), 99 * MIB, &both)).is_empty());
        // Still stuck STUCK later, with 0 not gone yet: 1 goes next.
        let actions = decided(gov.step(at + STUCK, 99 * MIB, &both));
        assert!(matches!(&actions[..], [Action::End(1, _)]), "{actions:?}");
    }

    #[test]
    fn looks_less_often_far_from_the_wall_and_measures_growth_over_the_gap() {
        let mut gov = Governor::new(RESERVE);
        let t = Instant::now();
        gov.step(t, 10_000 * MIB, &[guest(0, 10)]);
        assert_eq!(gov.next_tick(), SLOW_TICK);
        // 50 MiB in 100 ms is 500 MiB/s: 50 MiB more expected in the next
        // 100 ms, which with 140 MiB of room over a 100 MiB reserve is a
        // squeeze.
        let actions = decided(gov.step(t + SLOW_TICK, 140 * MIB, &[guest(0, 60)]));
        assert_eq!(actions, [Action::Throttle(0)]);
        assert_eq!(gov.next_tick(), TICK);
        // 2 MiB over 100 ms is noise at that pace (256 KiB per 10 ms).
        let mut quiet = Governor::new(RESERVE);
        quiet.step(t, 160 * MIB, &[guest(0, 10)]);
        assert!(decided(quiet.step(t + SLOW_TICK, 160 * MIB, &[guest(0, 12)])).is_empty());
    }

    #[test]
    fn sharing_is_urgent_only_while_room_is_short() {
        let mut gov = Governor::new(RESERVE);
        let t = Instant::now();
        let urgency = |a: Vec<Action>| a.into_iter().filter(|a| matches!(a, Action::Urgent(_))).collect::<Vec<_>>();
        let idle = [GuestMemory { size: 100 * MIB, ..guest(0, 100) }];
        assert!(urgency(gov.step(t, 10_000 * MIB, &idle)).is_empty(), "plenty of room: nothing to say");
        // Under four times the reserve: urgent, said once.
        assert_eq!(urgency(gov.step(t + TICK, 350 * MIB, &idle)), [Action::Urgent(true)]);
        assert!(urgency(gov.step(t + 2 * TICK, 300 * MIB, &idle)).is_empty());
        // Plenty again: yielding again.
        assert_eq!(urgency(gov.step(t + 3 * TICK, 10_000 * MIB, &idle)), [Action::Urgent(false)]);
        // What guests still filling may take counts: 2 GiB of them to fill
        // in 5 GiB of room is not plenty.
        let filling = [GuestMemory { size: 2048 * MIB, ..guest(1, 10) }];
        assert_eq!(urgency(gov.step(t + 4 * TICK, 5000 * MIB, &filling)), [Action::Urgent(true)]);
    }

    #[test]
    fn a_squeeze_has_every_guest_merged_in_turn() {
        let mut gov = Governor::new(RESERVE);
        let t = Instant::now();
        let three = [guest(0, 100), guest(1, 100), guest(2, 100)];
        gov.step(t, 1000 * MIB, &three);
        let merges = |a: Vec<Action>| a.into_iter().filter(|a| matches!(a, Action::Merge(_))).collect::<Vec<_>>();
        assert_eq!(merges(gov.step(t + TICK, 50 * MIB, &three)), [Action::Merge(1)]);
        assert!(merges(gov.step(t + 2 * TICK, 50 * MIB, &three)).is_empty(), "one every MERGE_EVERY");
        assert_eq!(merges(gov.step(t + TICK + MERGE_EVERY, 50 * MIB, &three)), [Action::Merge(2)]);
        assert_eq!(merges(gov.step(t + TICK + 2 * MERGE_EVERY, 50 * MIB, &three)), [Action::Merge(0)]);
        assert!(merges(gov.step(t + TICK + 3 * MERGE_EVERY, 1000 * MIB, &three)).is_empty(), "no squeeze, no ask");
    }

    #[test]
    fn a_guest_started_held_goes_with_the_others_held() {
        let mut gov = Governor::new(RESERVE);
        let t = Instant::now();
        gov.step(t, 1000 * MIB, &[guest(0, 10)]);
        gov.step(t + TICK, 1000 * MIB, &[guest(0, 100)]);
        assert!(!gov.admits(t + TICK, 150 * MIB, 128 * MIB), "it does not fit while 0 fills");
        gov.hold(4);
        // While it is held, anything else waits behind it.
        assert!(!gov.admits(t + TICK + QUIET, 1000 * MIB, 128 * MIB));
        let both = [guest(0, 100), guest(4, 2)];
        assert!(decided(gov.step(t + 2 * TICK, 150 * MIB, &both)).is_empty());
        assert_eq!(decided(gov.step(t + 3 * TICK, 300 * MIB, &both)), [Action::Release(4)]);
    }

    #[test]
    fn a_guest_held_just_above_the_reserve_is_not_held_for_ever() {
        let mut gov = Governor::new(RESERVE);
        let t = Instant::now();
        gov.step(t, 1000 * MIB, &[guest(0, 100), guest(1, 10)]);
        assert_eq!(decided(gov.step(t + TICK, 90 * MIB, &[guest(0, 100), guest(1, 60)])), [Action::Throttle(1)]);
        // Room settles between the reserve and twice it: 1 cannot go again...
        let held = [guest(0, 100), guest(1, 60)];
        assert!(decided(gov.step(t + 2 * TICK, 150 * MIB, &held)).is_empty());
        // ...so after STUCK without progress it is ended, not held for ever.
        let actions = decided(gov.step(t + 2 * TICK + STUCK, 150 * MIB, &held));
        assert!(matches!(&actions[..], [Action::End(1, _)]), "{actions:?}");
    }

    #[test]
    fn admits_what_fits_besides_what_others_may_still_fill() {
        let mut gov = Governor::new(RESERVE);
        let t = Instant::now();
        let sized = |id, mib| GuestMemory { id, bytes: mib * MIB, size: 256 * MIB, running: true, spare: 0 };
        // Three fit in 1000 MiB above the reserve, counting those let in.
        for _ in 0..3 {
            assert!(gov.admits(t, 1000 * MIB, 256 * MIB));
        }
        assert!(!gov.admits(t, 1000 * MIB, 256 * MIB), "a fourth would not fit once the three fill");
        // They appear, not filled yet: still counted as what they may take.
        let now = t + TICK;
        gov.step(now, 1000 * MIB, &[sized(0, 10), sized(1, 10), sized(2, 10)]);
        assert!(!gov.admits(now, 1000 * MIB, 256 * MIB));
        // Filled over half a second (no squeeze in 1000 MiB), then quiet for
        // a while: the next goes in if it fits, or once nothing grows.
        let filled = now + QUIET / 2;
        assert!(decided(gov.step(filled, 1000 * MIB, &[sized(0, 256), sized(1, 256), sized(2, 256)])).is_empty());
        assert!(!gov.admits(filled, 300 * MIB, 256 * MIB));
        let later = filled + QUIET;
        gov.step(later, 300 * MIB, &[sized(0, 256), sized(1, 256), sized(2, 256)]);
        assert!(gov.admits(later, 400 * MIB, 256 * MIB), "it fits");
        assert!(!gov.admits(later, 300 * MIB, 256 * MIB), "the one just let in is not quiet yet");
    }

    #[test]
    fn the_wall_is_never_above_the_host() {
        let wall = Wall::find();
        let available = host_available_memory().unwrap();
        assert!(wall.room() <= available + 64 * MIB);
        assert!(wall.size() <= host_total_memory().unwrap());
    }

    /// Near the wall, free memory guests hold is asked back through their
    /// balloons before anyone is held, once per guest per RECLAIM_EVERY;
    /// with plenty of room again the balloons are emptied one at a time.
    #[test]
    fn free_memory_is_reclaimed_first_and_given_back_when_room_returns() {
        let mut gov = Governor::new(RESERVE);
        let t = Instant::now();
        let with_spare = |id, mib, spare_mib: u64| GuestMemory { spare: spare_mib * MIB, ..guest(id, mib) };
        gov.step(t, 1000 * MIB, &[with_spare(0, 100, 64), guest(1, 100)]);
        // Near the wall (under twice the reserve), nobody growing.
        let near = gov.step(t + TICK, 150 * MIB, &[with_spare(0, 100, 64), guest(1, 100)]);
        assert_eq!(decided(near), vec![Action::Balloon(0, 64 * MIB)]);
        // Not again until its statistics can have caught up.
        let again = gov.step(t + 2 * TICK, 150 * MIB, &[with_spare(0, 100, 64), guest(1, 100)]);
        assert!(decided(again).is_empty());
        // Squeezed and growing: reclaimed again (6 s on), then throttled.
        let later = t + RECLAIM_EVERY + 3 * TICK;
        // (Between the two: neither near the wall nor plenty of room.)
        assert!(decided(gov.step(later - TICK, 300 * MIB, &[with_spare(0, 100, 16), guest(1, 100)])).is_empty());
        let squeezed = gov.step(later, 50 * MIB, &[with_spare(0, 200, 16), guest(1, 100)]);
        assert_eq!(decided(squeezed), vec![Action::Balloon(0, 80 * MIB), Action::Throttle(0)]);
        assert_eq!((gov.reclaims, gov.reclaimed_bytes), (2, 80 * MIB));
        // A guest with little free memory is not asked.
        let small = gov.step(later + TICK, 50 * MIB, &[with_spare(0, 200, 0), with_spare(1, 100, 4)]);
        assert!(!decided(small).iter().any(|a| matches!(a, Action::Balloon(..))));
        // Room back: the throttled guest goes first, then the balloon.
        let back = later + Duration::from_secs(1);
        assert_eq!(decided(gov.step(back, 4000 * MIB, &[guest(0, 200), guest(1, 100)])), vec![Action::Release(0)]);
        let then = gov.step(back + SETTLE, 4000 * MIB, &[guest(0, 200), guest(1, 100)]);
        assert_eq!(decided(then), vec![Action::Balloon(0, 0)]);
        assert_eq!(gov.returns, 1);
        assert!(decided(gov.step(back + 2 * SETTLE, 4000 * MIB, &[guest(0, 200), guest(1, 100)])).is_empty());
    }
}
