//! The process-wide handle on KVM, opened once and shared by every guest.

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, Kvm};

use crate::host::HostKind;

pub struct Hypervisor {
    pub kvm: Kvm,
    /// CPUID as KVM supports it; each vCPU gets a copy with its APIC ID.
    pub cpuid: CpuId,
    pub host: HostKind,
}

impl Hypervisor {
    pub fn open() -> Result<Self, String> {
        let kvm = Kvm::new()
            .map_err(|e| format!("cannot open /dev/kvm: {e} (is KVM available, and may this user use it?)"))?;
        for (cap, name) in [(Cap::Irqchip, "KVM_CAP_IRQCHIP"), (Cap::UserMemory, "KVM_CAP_USER_MEMORY")] {
            if !kvm.check_extension(cap) {
                return Err(format!("this KVM lacks {name}, which vmm needs"));
            }
        }
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| format!("KVM_GET_SUPPORTED_CPUID failed: {e}"))?;
        Ok(Hypervisor { kvm, cpuid, host: HostKind::detect() })
    }
}
