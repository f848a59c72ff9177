//! What kind of KVM host we run on, and what follows from it.
//!
//! On KVM-on-PVM hosts (`kvm_pvm` module: KVM without VMX/SVM, as on nested
//! cloud machines) guest kernel code is emulated and several instructions stop
//! the guest; Linux boots only with the parameters below. See
//! docs/host-quirks.md.

use std::path::Path;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostKind {
    /// Hardware virtualization (kvm_intel or kvm_amd).
    Hardware,
    /// KVM on PVM: CPL 0 guest code is emulated.
    Pvm,
    /// /dev/kvm works but we cannot tell which module provides it.
    Unknown,
}

impl HostKind {
    /// Whether a restored vCPU's TSC can be set to its saved value. On PVM
    /// hosts the guest reads the host's TSC whatever KVM was told, so a
    /// clone's TSC has moved on by the time its snapshot waited; KVM still
    /// takes the write and would then time the LAPIC's TSC deadline against
    /// a TSC the guest does not see, firing every timer that much late (a
    /// clone of a kernel that keeps time with the TSC stalled). There the
    /// TSC is left as it is, and the other clocks follow it.
    pub fn restores_guest_tsc(self) -> bool {
        !matches!(self, HostKind::Pvm)
    }

    pub fn detect() -> Self {
        Self::detect_in(Path::new("/sys/module"))
    }

    fn detect_in(modules: &Path) -> Self {
        if modules.join("kvm_pvm").exists() {
            HostKind::Pvm
        } else if modules.join("kvm_intel").exists() || modules.join("kvm_amd").exists() {
            HostKind::Hardware
        } else {
            HostKind::Unknown
        }
    }

    /// The command line for a Linux guest when the user gave none.
    pub fn default_linux_cmdline(self) -> &'static str {
        match self {
            HostKind::Pvm => PVM_LINUX_CMDLINE,
            HostKind::Hardware | HostKind::Unknown => LINUX_CMDLINE,
        }
    }
}

/// Serial console, and a panic or reboot ends the guest (via the i8042 reset).
const LINUX_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1";

/// What lets Linux boot on PVM: no XSAVE, no paravirt hypercalls, no PTI, and
/// the CPU features the emulator cannot run hidden from the kernel (CPUID
/// itself cannot be masked there). `no_timer_check`: Linux sets it itself on
/// KVM, in the paravirt set-up that `nopv` turns off; without it the kernel
/// counts timer ticks over ~70 ms of TSC time and, when the emulated vCPU gets
/// too little of a busy host in that window, panics ("IO-APIC + timer doesn't
/// work"). `lapic=notscdeadline`: PVM's KVM seldom shows an armed TSC
/// deadline in the state a snapshot reads (11 of 12 snapshots of a running
/// ACPI kernel, whose calibrated TSC makes it use the deadline timer, read
/// 0), so a clone of such a kernel waits for ticks that come only by
/// chance; the LAPIC's own count-down, which the LAPIC state carries, comes
/// through.
const PVM_LINUX_CMDLINE: &str =
    "console=ttyS0 reboot=k panic=-1 noxsave nopv nopti no_timer_check lapic=notscdeadline \
    clearcpuid=smap,smep,pku,umip,popcnt,fsgsbase,erms,fsrm,rdrand,rdseed,rdpid,avx,avx2,\
bmi1,bmi2,clwb,clflushopt,invpcid,pcid";

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_modules(names: &[&str]) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("vmm-host-test-{}-{}", std::process::id(), names.join("-")));
        for n in names {
            std::fs::create_dir_all(dir.join(n)).unwrap();
        }
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn detects_each_kind() {
        assert_eq!(HostKind::detect_in(&fake_modules(&["kvm", "kvm_pvm"])), HostKind::Pvm);
        assert_eq!(HostKind::detect_in(&fake_modules(&["kvm", "kvm_amd"])), HostKind::Hardware);
        assert_eq!(HostKind::detect_in(&fake_modules(&["kvm"])), HostKind::Unknown);
    }

    #[test]
    fn pvm_cmdline_avoids_what_stops_the_guest() {
        let c = HostKind::Pvm.default_linux_cmdline();
        for word in ["noxsave", "nopv", "no_timer_check", "clearcpuid=smap", "console=ttyS0", "reboot=k"] {
            assert!(c.contains(word), "{word} missing from {c}");
        }
        assert!(!c.contains("  "));
        assert!(!HostKind::Hardware.default_linux_cmdline().contains("clearcpuid"));
    }
}
