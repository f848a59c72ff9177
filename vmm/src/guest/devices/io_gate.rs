//! The I/O gate: device threads hold it while they write guest memory, so
//! a merge freeze (page sharing's fallback, docs/dedup.md) can wait for
//! them and keep them out until the thaw.

use std::sync::{Condvar, Mutex};

/// Held by device threads while they touch guest memory, so a merge freeze
/// can wait for them and keep them out until the thaw (docs/dedup.md).
#[derive(Default)]
pub struct IoGate {
    /// (frozen, device threads inside)
    state: Mutex<(bool, usize)>,
    changed: Condvar,
}

/// Proof of being inside an [`IoGate`]; leaving is dropping it.
pub struct Inside<'a>(&'a IoGate);

impl IoGate {
    /// Waits out a freeze, then lets the caller touch guest memory until
    /// the returned guard is dropped.
    pub fn enter(&self) -> Inside<'_> {
        let mut s = self.state.lock().unwrap();
        while s.0 {
            s = self.changed.wait(s).unwrap();
        }
        s.1 += 1;
        Inside(self)
    }

    /// Returns once no device thread is inside; none enters until `thaw`.
    pub fn freeze(&self) {
        let mut s = self.state.lock().unwrap();
        s.0 = true;
        while s.1 > 0 {
            s = self.changed.wait(s).unwrap();
        }
    }

    pub fn thaw(&self) {
        self.state.lock().unwrap().0 = false;
        self.changed.notify_all();
    }
}

impl Drop for Inside<'_> {
    fn drop(&mut self) {
        self.0.state.lock().unwrap().1 -= 1;
        self.0.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU8, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn io_freeze_waits_for_device_work_and_holds_off_new_work() {
        let gate = Arc::new(IoGate::default());
        let inside = gate.enter();
        let frozen = Arc::new(AtomicU8::new(0));
        let freezer = {
            let (gate, frozen) = (gate.clone(), frozen.clone());
            std::thread::spawn(move || {
                gate.freeze();
                frozen.store(1, Ordering::SeqCst);
            })
        };
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(frozen.load(Ordering::SeqCst), 0, "froze while a device was inside");
        drop(inside);
        freezer.join().unwrap();
        let entered = Arc::new(AtomicU8::new(0));
        let device = {
            let (gate, entered) = (gate.clone(), entered.clone());
            std::thread::spawn(move || {
                let _inside = gate.enter();
                entered.store(1, Ordering::SeqCst);
            })
        };
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(entered.load(Ordering::SeqCst), 0, "a device entered during a freeze");
        gate.thaw();
        device.join().unwrap();
        assert_eq!(entered.load(Ordering::SeqCst), 1);
    }
}
