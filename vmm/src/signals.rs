//! Ctrl-C and SIGTERM: a flag the long-running loops (`vmm run`, `vmm
//! bench`) poll, so they wind down cleanly instead of dying mid-way.

use std::sync::atomic::{AtomicBool, Ordering};

static STOP_REQUESTED: AtomicBool = AtomicBool::new(false);

/// Routes SIGINT and SIGTERM to the flag.
pub fn install_stop_handlers() -> Result<(), String> {
    extern "C" fn on_stop(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
        STOP_REQUESTED.store(true, Ordering::SeqCst);
    }
    for sig in [libc::SIGINT, libc::SIGTERM] {
        vmm_sys_util::signal::register_signal_handler(sig, on_stop)
            .map_err(|e| format!("cannot install the handler for signal {sig}: {e}"))?;
    }
    Ok(())
}

pub fn stop_requested() -> bool {
    STOP_REQUESTED.load(Ordering::SeqCst)
}
