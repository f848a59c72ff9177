//! Address ranges to devices: one bus for port I/O, one for MMIO. A vCPU
//! exit looks its address up here and hands the access to the device that
//! holds it, with the offset into the device's range; nothing else knows
//! where a device lives.

use std::sync::Arc;

use super::Action;

/// A device on a bus. Accesses come from vCPU threads, several at once.
pub trait BusDevice: Send + Sync {
    fn read(&self, vcpu: u8, offset: u64, data: &mut [u8]);
    fn write(&self, vcpu: u8, offset: u64, data: &[u8]) -> Action;
}

struct Range {
    base: u64,
    len: u64,
    device: Arc<dyn BusDevice>,
}

/// Non-overlapping ranges, sorted by base.
#[derive(Default)]
pub struct Bus {
    ranges: Vec<Range>,
}

impl Bus {
    /// Puts `device` at `base..base + len`; refuses a range that is empty,
    /// wraps, or overlaps one already taken.
    pub fn insert(&mut self, base: u64, len: u64, device: Arc<dyn BusDevice>) -> Result<(), String> {
        let end = base.checked_add(len).filter(|_| len > 0).ok_or_else(|| format!("bad range {base:#x}+{len:#x}"))?;
        let at = self.ranges.partition_point(|r| r.base < base);
        let clashes_before = at > 0 && self.ranges[at - 1].base + self.ranges[at - 1].len > base;
        let clashes_after = self.ranges.get(at).is_some_and(|r| r.base < end);
        if clashes_before || clashes_after {
            return Err(format!("{base:#x}..{end:#x} overlaps a device already on the bus"));
        }
        self.ranges.insert(at, Range { base, len, device });
        Ok(())
    }

    /// The device holding `addr`, and `addr`'s offset into its range.
    pub fn find(&self, addr: u64) -> Option<(&dyn BusDevice, u64)> {
        let at = self.ranges.partition_point(|r| r.base <= addr).checked_sub(1)?;
        let r = &self.ranges[at];
        (addr - r.base < r.len).then(|| (r.device.as_ref(), addr - r.base))
    }

    /// Reads `addr`; an address no device holds reads as all ones, as an
    /// empty bus floats high on real hardware.
    pub fn read(&self, vcpu: u8, addr: u64, data: &mut [u8]) {
        match self.find(addr) {
            Some((device, offset)) => device.read(vcpu, offset, data),
            None => {
                log::debug!("guest read of unclaimed address {addr:#x}");
                data.fill(0xff);
            }
        }
    }

    /// Writes `addr`; a write no device holds is dropped.
    pub fn write(&self, vcpu: u8, addr: u64, data: &[u8]) -> Action {
        match self.find(addr) {
            Some((device, offset)) => device.write(vcpu, offset, data),
            None => {
                log::debug!("guest write to unclaimed address {addr:#x}");
                Action::Continue
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Records the offsets it was given; reads return its tag.
    struct Probe(u8, Mutex<Vec<u64>>);

    impl BusDevice for Probe {
        fn read(&self, _vcpu: u8, offset: u64, data: &mut [u8]) {
            self.1.lock().unwrap().push(offset);
            data.fill(self.0);
        }
        fn write(&self, _vcpu: u8, offset: u64, _data: &[u8]) -> Action {
            self.1.lock().unwrap().push(offset);
            Action::Continue
        }
    }

    #[test]
    fn accesses_reach_the_device_holding_the_address_at_its_offset() {
        let mut bus = Bus::default();
        let (a, b) = (Arc::new(Probe(1, Mutex::default())), Arc::new(Probe(2, Mutex::default())));
        bus.insert(0x2000, 0x1000, b.clone()).unwrap();
        bus.insert(0x1000, 0x1000, a.clone()).unwrap();
        let mut data = [0u8; 4];
        for (addr, tag) in [(0x1000, 1), (0x1fff, 1), (0x2000, 2), (0x2ffc, 2), (0x0fff, 0xff), (0x3000, 0xff)] {
            bus.read(0, addr, &mut data);
            assert_eq!(data, [tag; 4], "at {addr:#x}");
        }
        assert_eq!(bus.write(0, 0x2010, &[0]), Action::Continue);
        assert_eq!(*a.1.lock().unwrap(), [0, 0xfff]);
        assert_eq!(*b.1.lock().unwrap(), [0, 0xffc, 0x10]);
    }

    #[test]
    fn overlapping_empty_or_wrapping_ranges_are_refused() {
        let mut bus = Bus::default();
        let p = || Arc::new(Probe(0, Mutex::default()));
        bus.insert(0x1000, 0x1000, p()).unwrap();
        for (base, len) in [(0x1800, 0x10), (0x0800, 0x1000), (0x0, 0x10000), (0x1fff, 1), (0x3000, 0), (u64::MAX, 2)] {
            assert!(bus.insert(base, len, p()).is_err(), "{base:#x}+{len:#x} was taken");
        }
        bus.insert(0x2000, 1, p()).unwrap();
        bus.insert(0x0fff, 1, p()).unwrap();
    }
}
