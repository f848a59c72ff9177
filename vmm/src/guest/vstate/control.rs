//! Stopping and parking vCPU threads from other threads.
//!
//! A vCPU thread calls [`VcpuGate::pass`] before every `KVM_RUN`. To
//! stop or pause, another thread changes the gate's state and kicks every
//! vCPU out of `KVM_RUN`: it sets `immediate_exit` in the vCPU's `kvm_run`
//! page and sends it a signal. The signal interrupts a `KVM_RUN` in progress;
//! `immediate_exit` catches a vCPU that was about to enter one, so no kick is
//! ever lost. `pause` returns only once every live vCPU is parked, which is
//! what a merge freeze needs to be sure no vCPU is writing guest memory.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Condvar, Mutex, Once};
use std::time::Duration;

use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

/// What a vCPU does at its gate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pass {
    /// Enter the guest.
    Run,
    /// Finish the pending I/O: enter `KVM_RUN` with `immediate_exit` set,
    /// then come back.
    FinishIo,
    /// Leave the run loop.
    Stop,
}

/// The signal used to kick vCPU threads out of `KVM_RUN`.
pub fn kick_signal() -> i32 {
    SIGRTMIN()
}

/// Installs the (empty) handler for the kick signal, once per process.
pub fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
        register_signal_handler(kick_signal(), on_kick).expect("cannot install the vCPU kick handler");
    });
}

/// Sets a vCPU's `immediate_exit`, from its own thread, so its next
/// `KVM_RUN` only completes what is pending and returns.
///
/// # Safety
/// `immediate_exit` must point into the vCPU's mapped `kvm_run` page.
pub unsafe fn set_immediate_exit(immediate_exit: *mut u8) {
    // SAFETY: the caller's promise; kickers write it atomically too.
    unsafe { AtomicU8::from_ptr(immediate_exit) }.store(1, Ordering::SeqCst);
}

/// Clears a vCPU's `immediate_exit` after a kick, from its own thread: an
/// atomic store, since other threads set the same byte.
///
/// # Safety
/// `immediate_exit` must point into the vCPU's mapped `kvm_run` page.
pub unsafe fn clear_immediate_exit(immediate_exit: *mut u8) {
    // SAFETY: per the contract; u8 and AtomicU8 have the same layout.
    unsafe { AtomicU8::from_ptr(immediate_exit) }.store(0, Ordering::SeqCst);
}

/// One vCPU thread's kick target, registered while it runs.
struct KickTarget {
    thread: libc::pthread_t,
    immediate_exit: *mut u8,
}

struct PthreadKill(libc::pthread_t);

// SAFETY: `Killable` only needs the pthread id, which stays valid while the
// thread is registered (it unregisters before it exits).
unsafe impl Killable for PthreadKill {
    fn pthread_handle(&self) -> libc::pthread_t {
        self.0
    }
}

#[derive(Default)]
struct GateState {
    stop: bool,
    pause_depth: u32,
    parked: usize,
    /// vCPU threads that have not left their run loop.
    live: usize,
    /// A device raised an interrupt since a vCPU last waited for one.
    device_interrupt: bool,
    targets: Vec<Option<KickTarget>>,
}

/// Shared by a guest's vCPU threads and whoever controls them.
#[derive(Default)]
pub struct VcpuGate {
    state: Mutex<GateState>,
    changed: Condvar,
}

// SAFETY: the raw `immediate_exit` pointers in `KickTarget` are only
// dereferenced under the mutex, while their vCPU thread is registered, i.e.
// while the `kvm_run` mapping they point into is alive.
unsafe impl Send for VcpuGate {}
// SAFETY: as above; all access goes through the mutex.
unsafe impl Sync for VcpuGate {}

impl VcpuGate {
    pub fn new(vcpus: usize) -> Self {
        let gate = VcpuGate::default();
        gate.state.lock().unwrap().targets = (0..vcpus).map(|_| None).collect();
        gate
    }

    /// Counts a vCPU thread as live; call before spawning it. A pause waits
    /// for live vCPUs only, so a guest not yet started pauses at once, and a
    /// vCPU counted here parks at its first checkpoint if a pause is on.
    pub fn starting(&self) {
        self.state.lock().unwrap().live += 1;
    }

    /// Called by vCPU `index`'s own thread before its first `KVM_RUN`.
    /// `immediate_exit` must stay valid until [`VcpuGate::leave`].
    pub fn register(&self, index: usize, immediate_exit: *mut u8) {
        // SAFETY: pthread_self has no preconditions.
        let thread = unsafe { libc::pthread_self() };
        self.state.lock().unwrap().targets[index] = Some(KickTarget { thread, immediate_exit });
    }

    /// Called by vCPU `index`'s thread when it leaves its run loop for good
    /// (after [`VcpuGate::starting`]). Returns true for the last vCPU to leave.
    pub fn leave(&self, index: usize) -> bool {
        let mut s = self.state.lock().unwrap();
        s.targets[index] = None;
        s.live -= 1;
        self.changed.notify_all();
        s.live == 0
    }

    /// Blocks while the vCPUs are paused. Returns false once they must stop.
    pub fn checkpoint(&self) -> bool {
        self.pass(false) == Pass::Run
    }

    /// Blocks while the vCPUs are paused, as [`VcpuGate::checkpoint`]; but
    /// a vCPU whose last exit was port or MMIO I/O (`io_pending`) is sent
    /// back into `KVM_RUN` once, with `immediate_exit` set, before it may
    /// park: KVM finishes that instruction only on the next entry, so a
    /// vCPU parked before it would be saved in the middle of it, and a
    /// clone of it would do the I/O again.
    pub fn pass(&self, io_pending: bool) -> Pass {
        let mut s = self.state.lock().unwrap();
        loop {
            if s.stop {
                return Pass::Stop;
            }
            if s.pause_depth == 0 {
                return Pass::Run;
            }
            if io_pending {
                return Pass::FinishIo;
            }
            s.parked += 1;
            self.changed.notify_all();
            s = self.changed.wait(s).unwrap();
            s.parked -= 1;
        }
    }

    /// Waits up to `time` on a vCPU thread that has nothing to run, like a
    /// halted CPU; returns early when a pause or stop comes, so neither
    /// waits for an idle vCPU.
    pub fn idle(&self, time: Duration) {
        self.wait(time, false);
    }

    /// Like [`VcpuGate::idle`], but also returns when a device raises an
    /// interrupt ([`VcpuGate::device_interrupt`]), or at once if one did
    /// since the last such wait: a guest that polls its devices and then
    /// waits loses no wake-up that came between the two.
    pub fn wait_for_device(&self, time: Duration) {
        self.wait(time, true);
    }

    /// Called by a device's thread when it raises the guest's interrupt.
    pub fn device_interrupt(&self) {
        let mut s = self.state.lock().unwrap();
        s.device_interrupt = true;
        self.changed.notify_all();
    }

    fn wait(&self, time: Duration, for_device: bool) {
        let deadline = std::time::Instant::now() + time;
        let mut s = self.state.lock().unwrap();
        while !s.stop && s.pause_depth == 0 {
            if for_device && std::mem::take(&mut s.device_interrupt) {
                return;
            }
            let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) else {
                return;
            };
            s = self.changed.wait_timeout(s, left).unwrap().0;
        }
    }

    /// Tells every vCPU to leave its run loop; does not wait for it.
    pub fn stop(&self) {
        let mut s = self.state.lock().unwrap();
        s.stop = true;
        self.changed.notify_all();
        Self::kick_all(&s);
    }

    /// Parks every live vCPU outside `KVM_RUN`; returns once they all are
    /// (or have left, when the guest is stopping), with how many are parked.
    /// Pauses nest: each needs its own [`VcpuGate::resume`].
    pub fn pause(&self) -> usize {
        let mut s = self.state.lock().unwrap();
        s.pause_depth += 1;
        self.changed.notify_all(); // wakes idle vCPUs
                                   // A stopping vCPU leaves instead of parking; either way it is out of
                                   // KVM_RUN once counted here.
        while s.parked < s.live {
            Self::kick_all(&s);
            // Re-kick now and then: a vCPU may have been between its
            // checkpoint and KVM_RUN when immediate_exit was cleared.
            s = self.changed.wait_timeout(s, Duration::from_millis(5)).unwrap().0;
        }
        s.parked
    }

    /// Undoes one `pause` (a resume with no pause to undo does nothing).
    pub fn resume(&self) {
        let mut s = self.state.lock().unwrap();
        if s.pause_depth == 0 {
            log::warn!("resume without a pause; ignored");
            return;
        }
        s.pause_depth -= 1;
        self.changed.notify_all();
    }

    /// Whether a pause is in force (the vCPUs are parked or parking).
    pub fn is_paused(&self) -> bool {
        self.state.lock().unwrap().pause_depth > 0
    }

    pub fn live_vcpus(&self) -> usize {
        self.state.lock().unwrap().live
    }

    fn kick_all(s: &GateState) {
        for target in s.targets.iter().flatten() {
            // SAFETY: the target is registered, so its kvm_run page is mapped;
            // the vCPU thread clears the byte atomically too (see
            // `clear_immediate_exit`), and KVM reads it on the next KVM_RUN.
            unsafe { AtomicU8::from_ptr(target.immediate_exit) }.store(1, Ordering::SeqCst);
            // The thread may be exiting; a failed kill is harmless.
            let _ = PthreadKill(target.thread).kill(kick_signal());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
    use std::sync::Arc;

    /// Threads that spin like vCPUs; pausing must stop their progress.
    #[test]
    fn pause_parks_every_vcpu_and_stop_ends_them() {
        install_kick_handler();
        let gate = Arc::new(VcpuGate::new(3));
        // Not started yet: nothing to wait for.
        gate.pause();
        gate.resume();
        let work = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..3)
            .map(|i| {
                let (gate, work) = (gate.clone(), work.clone());
                gate.starting();
                std::thread::spawn(move || {
                    let exit_flag = Box::new(AtomicU8::new(0));
                    gate.register(i, exit_flag.as_ptr());
                    while gate.checkpoint() {
                        work.fetch_add(1, Ordering::SeqCst);
                        std::thread::yield_now();
                    }
                    gate.leave(i);
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(20));
        gate.pause();
        let frozen = work.load(Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(work.load(Ordering::SeqCst), frozen, "a vCPU ran while paused");
        gate.resume();
        std::thread::sleep(Duration::from_millis(20));
        assert!(work.load(Ordering::SeqCst) > frozen, "vCPUs did not resume");
        gate.stop();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(gate.live_vcpus(), 0);
        // Pausing a guest whose vCPUs are all gone returns at once.
        gate.pause();
    }

    /// A pause that comes while the guest is stopping still waits until no
    /// vCPU is in KVM_RUN (it would otherwise let a merge run beside one).
    #[test]
    fn a_pause_during_a_stop_waits_for_the_vcpus_to_leave() {
        install_kick_handler();
        let gate = Arc::new(VcpuGate::new(1));
        let in_run = Arc::new(AtomicU8::new(0));
        gate.starting();
        let vcpu = {
            let (gate, in_run) = (gate.clone(), in_run.clone());
            std::thread::spawn(move || {
                let exit_flag = Box::new(AtomicU8::new(0));
                gate.register(0, exit_flag.as_ptr());
                while gate.checkpoint() {
                    // "KVM_RUN": busy for a while, deaf to kicks.
                    in_run.store(1, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(100));
                    in_run.store(0, Ordering::SeqCst);
                }
                gate.leave(0);
            })
        };
        while in_run.load(Ordering::SeqCst) == 0 {
            std::thread::yield_now();
        }
        gate.stop();
        gate.pause();
        assert_eq!(in_run.load(Ordering::SeqCst), 0, "pause returned while a vCPU was in KVM_RUN");
        gate.resume();
        vcpu.join().unwrap();
    }

    #[test]
    fn idle_times_out_and_a_pause_or_stop_cuts_it_short() {
        let gate = Arc::new(VcpuGate::new(1));
        let t = std::time::Instant::now();
        gate.idle(Duration::from_millis(30));
        assert!(t.elapsed() >= Duration::from_millis(30));

        gate.starting();
        let idler = {
            let gate = gate.clone();
            std::thread::spawn(move || {
                let t = std::time::Instant::now();
                gate.idle(Duration::from_secs(30));
                let woke = t.elapsed();
                // The pause below waits for this vCPU to park.
                assert!(gate.checkpoint());
                gate.idle(Duration::from_secs(30));
                gate.leave(0);
                woke
            })
        };
        std::thread::sleep(Duration::from_millis(20));
        gate.pause();
        gate.resume();
        std::thread::sleep(Duration::from_millis(20));
        gate.stop();
        let woke = idler.join().unwrap();
        assert!(woke < Duration::from_secs(5), "idle ignored the pause for {woke:?}");
    }

    #[test]
    fn a_device_interrupt_ends_a_wait_for_devices_but_not_an_idle() {
        let gate = Arc::new(VcpuGate::new(1));
        // Raised before the wait: the wait returns at once, and only once.
        gate.device_interrupt();
        let t = std::time::Instant::now();
        gate.wait_for_device(Duration::from_secs(30));
        assert!(t.elapsed() < Duration::from_secs(5), "a wake-up raised before the wait was lost");
        let t = std::time::Instant::now();
        gate.wait_for_device(Duration::from_millis(30));
        assert!(t.elapsed() >= Duration::from_millis(30), "one interrupt ended two waits");

        // Raised during the wait.
        let waiter = {
            let gate = gate.clone();
            std::thread::spawn(move || {
                let t = std::time::Instant::now();
                gate.wait_for_device(Duration::from_secs(30));
                t.elapsed()
            })
        };
        std::thread::sleep(Duration::from_millis(20));
        gate.device_interrupt();
        assert!(waiter.join().unwrap() < Duration::from_secs(5), "the interrupt did not end the wait");

        // An idle vCPU (memtest's idle=) sleeps through interrupts.
        gate.device_interrupt();
        let t = std::time::Instant::now();
        gate.idle(Duration::from_millis(30));
        assert!(t.elapsed() >= Duration::from_millis(30));
    }
}
