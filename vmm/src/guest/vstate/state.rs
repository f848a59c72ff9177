//! What KVM holds for a guest that a snapshot must carry: each vCPU's
//! registers, FPU/XSAVE, MSRs, LAPIC and pending events, and the VM's
//! in-kernel irqchip (two PICs, the IOAPIC), PIT and clock. Read while the
//! guest's vCPUs are parked; written into fresh vCPUs before they first run.
//!
//! The order of the writes matters to KVM (as in other VMMs): CPUID first,
//! then MSRs (the TSC before the TSC deadline), registers, special
//! registers, XSAVE, XCRs, debug registers, the LAPIC, the TSC deadline
//! once more (KVM takes it only with the LAPIC timer in deadline mode; see
//! `timer_deadline`), the MP state and the pending events last, since they
//! refer to the rest.

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_pit_state2, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

/// The time stamp counter.
const MSR_IA32_TSC: u32 = 0x10;
/// The LAPIC timer's deadline in TSC-deadline mode.
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
/// The LAPIC's timer LVT register, in its register page.
const APIC_LVTT: usize = 0x320;

/// KVM's limit on MSRs per KVM_GET_MSRS / KVM_SET_MSRS call.
const MSRS_PER_CALL: usize = 256;

type KvmResult<T> = Result<T, kvm_ioctls::Error>;

#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    regs: kvm_regs,
    sregs: kvm_sregs,
    #[serde(with = "boxed_bytes")]
    xsave: Box<kvm_xsave>,
    xcrs: kvm_xcrs,
    debug_regs: kvm_debugregs,
    #[serde(with = "boxed_bytes")]
    lapic: Box<kvm_lapic_state>,
    mp_state: kvm_mp_state,
    events: kvm_vcpu_events,
    msrs: Vec<kvm_msr_entry>,
}

impl VcpuState {
    /// Reads the state of a vCPU that is not in `KVM_RUN`. `msr_list` is
    /// what KVM says it can save; an MSR it then refuses to read (not
    /// offered to this guest) is left out.
    pub fn save(fd: &VcpuFd, msr_list: &[u32]) -> KvmResult<VcpuState> {
        Ok(VcpuState {
            regs: fd.get_regs()?,
            sregs: fd.get_sregs()?,
            xsave: Box::new(fd.get_xsave()?),
            xcrs: fd.get_xcrs()?,
            debug_regs: fd.get_debug_regs()?,
            lapic: Box::new(fd.get_lapic()?),
            mp_state: fd.get_mp_state()?,
            events: fd.get_vcpu_events()?,
            msrs: save_msrs(fd, msr_list)?,
        })
    }

    /// Writes the state into a vCPU whose CPUID is set and that has not
    /// run; its TSC too if `restore_tsc` (see `HostKind::restores_guest_tsc`).
    pub fn restore(&self, fd: &VcpuFd, restore_tsc: bool) -> Result<(), String> {
        let step = |what: &str, r: KvmResult<()>| r.map_err(|e| format!("restoring {what}: {e}"));
        let msrs: Vec<kvm_msr_entry> =
            self.msrs.iter().filter(|m| restore_tsc || m.index != MSR_IA32_TSC).copied().collect();
        restore_msrs(fd, &msrs)?;
        step("the registers", fd.set_regs(&self.regs))?;
        step("the special registers", fd.set_sregs(&self.sregs))?;
        // SAFETY: a legacy 4 KiB kvm_xsave, as KVM_GET_XSAVE returned it,
        // without the dynamic features KVM_SET_XSAVE2 would need.
        step("XSAVE", unsafe { fd.set_xsave(&self.xsave) })?;
        step("the XCRs", fd.set_xcrs(&self.xcrs))?;
        step("the debug registers", fd.set_debug_regs(&self.debug_regs))?;
        step("the LAPIC", fd.set_lapic(&self.lapic))?;
        if let Some(deadline) = self.timer_deadline() {
            let entry = kvm_msr_entry { index: MSR_IA32_TSC_DEADLINE, data: deadline, ..Default::default() };
            restore_msrs(fd, &[entry])?;
        }
        step("the MP state", fd.set_mp_state(self.mp_state))?;
        step("the pending events", fd.set_vcpu_events(&self.events))
    }

    /// The TSC deadline to arm once the LAPIC is set, if its timer is in
    /// TSC-deadline mode and unmasked. KVM drops a deadline written while
    /// the timer is in another mode (a fresh vCPU's), and setting the
    /// LAPIC does not arm it, so it is written again after. A deadline of
    /// 0 is armed in the past: the timer fired while the guest was paused,
    /// and KVM keeps such a tick outside the LAPIC state it saves, so the
    /// clone would wait for it forever (its kernel's clock stopped); it
    /// gets one tick at once instead, which a kernel takes as an early one.
    fn timer_deadline(&self) -> Option<u64> {
        let lvtt = u32::from_le_bytes(std::array::from_fn(|i| self.lapic.regs[APIC_LVTT + i] as u8));
        let deadline_mode = (lvtt >> 17) & 3 == 2 && lvtt & (1 << 16) == 0;
        let saved = self.msrs.iter().find(|m| m.index == MSR_IA32_TSC_DEADLINE).map_or(0, |m| m.data);
        deadline_mode.then_some(saved.max(1))
    }

    pub fn msr_count(&self) -> usize {
        self.msrs.len()
    }
}

/// Reads every MSR of `list` that KVM will read, in order. KVM_GET_MSRS
/// stops at the first MSR it refuses and says how many it read: skip that
/// one and go on.
fn save_msrs(fd: &VcpuFd, list: &[u32]) -> KvmResult<Vec<kvm_msr_entry>> {
    let mut saved = Vec::with_capacity(list.len());
    let mut rest = list;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(MSRS_PER_CALL)];
        let entries: Vec<kvm_msr_entry> =
            chunk.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| kvm_ioctls::Error::new(libc::E2BIG))?;
        let read = fd.get_msrs(&mut msrs)?;
        saved.extend_from_slice(&msrs.as_slice()[..read]);
        // The MSR at `read` (if any) was refused.
        rest = &rest[(read + usize::from(read < chunk.len())).min(rest.len())..];
    }
    Ok(saved)
}

fn restore_msrs(fd: &VcpuFd, saved: &[kvm_msr_entry]) -> Result<(), String> {
    for chunk in saved.chunks(MSRS_PER_CALL) {
        let msrs = Msrs::from_entries(chunk).map_err(|e| format!("restoring MSRs: {e:?}"))?;
        let written = fd.set_msrs(&msrs).map_err(|e| format!("restoring MSRs: {e}"))?;
        if written < chunk.len() {
            return Err(format!("KVM refused MSR {:#x} of the snapshot", chunk[written].index));
        }
    }
    Ok(())
}

/// The VM's in-kernel devices and clock.
#[derive(Serialize, Deserialize)]
pub struct VmState {
    #[serde(with = "boxed_bytes")]
    pic_master: Box<kvm_irqchip>,
    #[serde(with = "boxed_bytes")]
    pic_slave: Box<kvm_irqchip>,
    #[serde(with = "boxed_bytes")]
    ioapic: Box<kvm_irqchip>,
    pit: kvm_pit_state2,
    clock: kvm_clock_data,
}

impl VmState {
    pub fn save(vm: &VmFd) -> KvmResult<VmState> {
        let chip = |chip_id| -> KvmResult<Box<kvm_irqchip>> {
            let mut c = Box::new(kvm_irqchip { chip_id, ..Default::default() });
            vm.get_irqchip(&mut c)?;
            Ok(c)
        };
        Ok(VmState {
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
            pit: vm.get_pit2()?,
            clock: vm.get_clock()?,
        })
    }

    /// Writes the state into a VM whose irqchip and PIT exist.
    pub fn restore(&self, vm: &VmFd) -> Result<(), String> {
        let step = |what: &str, r: KvmResult<()>| r.map_err(|e| format!("restoring {what}: {e}"));
        step("the PIC", vm.set_irqchip(&self.pic_master))?;
        step("the second PIC", vm.set_irqchip(&self.pic_slave))?;
        step("the IOAPIC", vm.set_irqchip(&self.ioapic))?;
        step("the PIT", vm.set_pit2(&self.pit))?;
        // Only the clock's value: the flags describe the host it was read on.
        let clock = kvm_clock_data { clock: self.clock.clock, ..Default::default() };
        step("the KVM clock", vm.set_clock(&clock))
    }
}

/// The large KVM structures, read into the heap. kvm-bindings reads one
/// into an array on the stack that is returned through every layer of the
/// parser: the XSAVE area, the LAPIC page and the irqchips left about 70 KiB
/// of each restored guest process's stack touched, for good, against a
/// clone's budget of 1 MiB. The text is kvm-bindings' own (the bytes as a
/// list), and as there a short list is padded with zeros and a long one cut.
mod boxed_bytes {
    use std::fmt;
    use std::marker::PhantomData;

    use serde::de::{IgnoredAny, SeqAccess, Visitor};
    use serde::{Deserializer, Serializer};
    use zerocopy::{FromBytes, Immutable, IntoBytes};

    #[allow(clippy::borrowed_box, reason = "serde's `with` hands over the field as it is")]
    pub fn serialize<T: IntoBytes + Immutable, S: Serializer>(value: &Box<T>, out: S) -> Result<S::Ok, S::Error> {
        out.serialize_bytes(value.as_bytes())
    }

    pub fn deserialize<'de, T, D>(input: D) -> Result<Box<T>, D::Error>
    where
        T: FromBytes + IntoBytes + Default,
        D: Deserializer<'de>,
    {
        input.deserialize_bytes(Bytes(PhantomData))
    }

    struct Bytes<T>(PhantomData<T>);

    impl<'de, T: FromBytes + IntoBytes + Default> Visitor<'de> for Bytes<T> {
        type Value = Box<T>;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            write!(f, "{} bytes", std::mem::size_of::<T>())
        }

        fn visit_bytes<E>(self, bytes: &[u8]) -> Result<Box<T>, E> {
            let mut value = Box::<T>::default();
            let out = value.as_mut_bytes();
            let n = bytes.len().min(out.len());
            out[..n].copy_from_slice(&bytes[..n]);
            Ok(value)
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Box<T>, A::Error> {
            let mut value = Box::<T>::default();
            for byte in value.as_mut_bytes() {
                match seq.next_element()? {
                    Some(b) => *byte = b,
                    None => return Ok(value),
                }
            }
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            Ok(value)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize, Deserialize)]
    struct Boxed(#[serde(with = "boxed_bytes")] Box<kvm_lapic_state>);

    fn lapic() -> kvm_lapic_state {
        let mut lapic = kvm_lapic_state::default();
        lapic.regs.iter_mut().enumerate().for_each(|(i, r)| *r = (i % 251) as _);
        lapic
    }

    /// Snapshots written before the boxing read the same, and the other
    /// way round: the text is kvm-bindings' own.
    #[test]
    fn boxed_bytes_reads_and_writes_kvm_bindings_text() {
        let plain = serde_json::to_string(&lapic()).unwrap();
        let boxed = serde_json::to_string(&Boxed(Box::new(lapic()))).unwrap();
        assert_eq!(plain, boxed);
        let read: Boxed = serde_json::from_str(&plain).unwrap();
        assert_eq!(read.0.regs, lapic().regs);
        let back: kvm_lapic_state = serde_json::from_str(&boxed).unwrap();
        assert_eq!(back.regs, lapic().regs);
    }

    #[test]
    fn boxed_bytes_pads_a_short_list_and_cuts_a_long_one() {
        let short: Boxed = serde_json::from_str("[1,2,3]").unwrap();
        assert_eq!(&short.0.regs[..4], &[1, 2, 3, 0]);
        assert!(short.0.regs[3..].iter().all(|&r| r == 0));
        let long = format!("[{}]", vec!["7"; 1100].join(","));
        let long: Boxed = serde_json::from_str(&long).unwrap();
        assert!(long.0.regs.iter().all(|&r| r == 7));
        assert!(serde_json::from_str::<Boxed>("[1,300]").is_err(), "a byte over 255");
        assert!(serde_json::from_str::<Boxed>("{}").is_err());
    }
}
