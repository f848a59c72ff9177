//! One guest: its memory, VM, devices and vCPU threads. It lives in a guest
//! process of its own (process.rs builds it there).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use event_manager::{EventManager, EventSubscriber, SubscriberOps};
use kvm_ioctls::{VcpuFd, VmFd};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::config::{GuestConfig, Transport};
use crate::error::{Error, Result};
use crate::guest::boot::{self, BootFile, BootSource};
use crate::guest::devices::console::Console;
use crate::guest::devices::doorbell::{self, Doorbell};
use crate::guest::devices::io_gate::IoGate;
use crate::guest::devices::pci::msix::MsiSink;
use crate::guest::devices::power::PmRegisters;
use crate::guest::devices::virtio::{self, Irq, SavedDevice, VirtioDevice, VirtioSlot};
use crate::guest::devices::{serial, Devices};
use crate::guest::snapshot::SnapshotState;
use crate::guest::vstate::control::VcpuGate;
use crate::guest::vstate::kvm_stats::KvmStats;
use crate::guest::vstate::state::{VcpuState, VmState};
use crate::guest::vstate::vcpu;
use crate::guest::vstate::vm::{self, KvmMsi};
use crate::hypervisor::Hypervisor;
use crate::memory::{GuestMemoryMmap, GuestRam};
use crate::outcome::GuestEnd;
use crate::protocol::KvmCounters;
use crate::snapshot::{SnapshotFiles, Written};

/// State the vCPU threads of one guest share.
struct Shared {
    gate: Arc<VcpuGate>,
    /// Device threads touching guest memory hold it.
    io_gate: Arc<IoGate>,
    devices: Devices,
    end: Mutex<Option<GuestEnd>>,
}

impl Shared {
    /// Records why the guest ends (the first reason wins) and stops its vCPUs.
    fn end_guest(&self, reason: GuestEnd) {
        self.end.lock().unwrap().get_or_insert(reason);
        self.gate.stop();
    }
}

/// The freeze (page sharing's fallback where write-protection is not
/// available) parks the guest's vCPUs, then closes its I/O gate: no vCPU
/// runs and no device writes guest memory until the thaw. (A request served
/// on a vCPU thread is done before that vCPU parks.)
impl dedup::Freezer for Shared {
    fn freeze(&self) -> usize {
        let parked = self.gate.pause();
        self.io_gate.freeze();
        parked
    }
    fn thaw(&self) {
        self.io_gate.thaw();
        self.gate.resume();
    }
}

/// How the guest's page-sharing dirty log is kept.
pub struct GuestOptions {
    /// Keep KVM's dirty log (in-process page sharing reads it).
    pub dirty_log: bool,
    /// Offer the guest no VMX/SVM (see `vcpu::configure`).
    pub hide_virtualization: bool,
    /// More for a booting kernel's command line (its network address).
    pub kernel_args: Vec<String>,
    /// The kernel and initrd a disk image's boot entry names, read from
    /// the image; None: the configuration's files.
    pub from_disk: Option<(BootFile, Option<BootFile>)>,
}

pub struct Guest {
    pub id: usize,
    config: GuestConfig,
    shared: Arc<Shared>,
    /// Each vCPU, locked by its thread while in `KVM_RUN` (see `vcpu::run`).
    vcpus: Vec<Arc<Mutex<VcpuFd>>>,
    /// The MSRs KVM can save, for snapshots.
    msr_list: Vec<u32>,
    started: bool,
    /// Held by the supervisor for memory (see supervisor/pressure.rs): one pause of
    /// the gate, on top of any the user asked for.
    throttled: bool,
    threads: Vec<JoinHandle<()>>,
    /// The device I/O thread and its stop flag, when the guest has a disk.
    io: Option<(JoinHandle<()>, Arc<AtomicBool>)>,
    // Dropped after the vCPUs: the VM, then the memory it maps.
    vm: Arc<VmFd>,
    dirty_log: bool,
    /// The guest's TSC rate (for memtest's gap times), if KVM says.
    tsc_khz: Option<u32>,
    /// Each vCPU's KVM counters, where the kernel has them.
    kvm_stats: Vec<KvmStats>,
    ram: GuestRam,
}

impl Guest {
    /// Builds guest `id` from `config` in `ram`, ready to start: booted from
    /// its kernel, or, with `restore`, from a snapshot's state (its memory
    /// is in `ram` already), in `vm`, a VM made by `vm::new` and not used
    /// yet. `virtio` are its virtio devices, in slot order (built from the
    /// snapshot's state too when restoring).
    #[allow(clippy::too_many_arguments)]
    pub fn create(
        hv: &Hypervisor,
        vm: VmFd,
        id: usize,
        config: &GuestConfig,
        ram: GuestRam,
        console: Console,
        virtio: Vec<Box<dyn VirtioDevice>>,
        mut options: GuestOptions,
        restore: Option<&SnapshotState>,
    ) -> Result<Guest> {
        let vcpu_count = config.vcpus as u8;
        if virtio.len() > virtio::MAX_SLOTS {
            return Err(Error::bad_input(format!("{} virtio devices; at most {}", virtio.len(), virtio::MAX_SLOTS)));
        }
        let boot = match restore {
            Some(_) => None,
            None => {
                let device_args = options.kernel_args.join(" ");
                let boot_err = |e: boot::BootError| Error::bad_input(e.to_string());
                let (kernel, initrd) = match options.from_disk.take() {
                    Some(files) => files,
                    None => (
                        BootFile::kernel(&config.kernel).map_err(boot_err)?,
                        config.initrd.as_deref().map(BootFile::initrd).transpose().map_err(boot_err)?,
                    ),
                };
                let source = BootSource {
                    kernel,
                    initrd,
                    cmdline: config.cmdline.as_deref(),
                    default_linux_cmdline: hv.host.default_linux_cmdline(),
                    device_args: &device_args,
                    virtio_slots: virtio.len(),
                    transport: config.transport,
                };
                Some(
                    boot::load(ram.memory(), config.memory_bytes(), vcpu_count, &source)
                        .map_err(|e| Error::bad_input(e.to_string()))?,
                )
            }
        };

        let kvm_err = |what: &str, e: kvm_ioctls::Error| Error::host(format!("{what}: {e}"));
        let restore_err = |e: String| Error::host(format!("cannot restore guest {id}: {e}"));
        vm::attach_memory(&vm, &ram, options.dirty_log).map_err(|e| kvm_err("cannot give the VM its memory", e))?;
        let vm = Arc::new(vm);
        if let Some(snapshot) = restore {
            snapshot.vm.restore(&vm).map_err(restore_err)?;
        }
        let serial_irq = EventFd::new(EFD_NONBLOCK).map_err(|e| Error::host(format!("eventfd: {e}")))?;
        vm.register_irqfd(&serial_irq, serial::COM1_IRQ).map_err(|e| kvm_err("cannot wire the serial interrupt", e))?;
        let io_gate = Arc::new(IoGate::default());
        let gate = Arc::new(VcpuGate::new(vcpu_count as usize));
        // A booted guest's transport is what its boot chose; a clone's is
        // its snapshot's (MMIO for one from before PCI).
        let transport = match &boot {
            Some(info) => info.transport,
            None => config.transport.unwrap_or(Transport::Mmio),
        };
        let msi: Arc<dyn MsiSink> = Arc::new(KvmMsi(vm.clone()));
        let mut devices = Vec::with_capacity(virtio.len());
        for (slot, device) in virtio.into_iter().enumerate() {
            let name = device.name();
            let irq = match transport {
                Transport::Mmio => {
                    let irq = EventFd::new(EFD_NONBLOCK).map_err(|e| Error::host(format!("eventfd: {e}")))?;
                    vm.register_irqfd(&irq, virtio::FIRST_GSI + slot as u32)
                        .map_err(|e| kvm_err(&format!("cannot wire {name}'s interrupt"), e))?;
                    Irq::Line(irq)
                }
                Transport::Pci => Irq::Msi(msi.clone()),
            };
            let device = VirtioSlot::new(slot, device, irq, io_gate.clone(), gate.clone(), ram.memory().clone())
                .map_err(|e| Error::host(format!("eventfd: {e}")))?;
            if let Some(snapshot) = restore {
                let saved = snapshot.devices.iter().find(|d| d.slot == slot);
                let saved = saved.ok_or_else(|| restore_err(format!("no state for {name} in slot {slot}")))?;
                device.restore(saved).map_err(restore_err)?;
            }
            if let Err(e) = device.wire_notifications(&vm) {
                // Kicks then exit to the vCPU thread, which serves them.
                log::warn!("guest {id}: no ioeventfds for {name}'s queues ({e}); serving kicks on vCPU exits");
            }
            devices.push(Arc::new(device));
        }
        // On PVM the guest's TSC is the host's whatever it is told; the
        // PM timer then follows the host's clock too.
        let restore_tsc = hv.host.restores_guest_tsc();
        let vcpus = (0..vcpu_count)
            .map(|i| {
                let fd = vm.create_vcpu(u64::from(i)).map_err(|e| kvm_err("cannot create a vCPU", e))?;
                match (&boot, restore) {
                    (Some(boot), _) => vcpu::configure(&fd, i, &hv.cpuid, boot, options.hide_virtualization)
                        .map_err(|e| kvm_err("cannot set up a vCPU", e))?,
                    (None, Some(snapshot)) => {
                        vcpu::set_cpuid(&fd, i, &hv.cpuid, options.hide_virtualization)
                            .map_err(|e| kvm_err("cannot set up a vCPU", e))?;
                        snapshot.vcpus[i as usize]
                            .restore(&fd, restore_tsc)
                            .map_err(|e| restore_err(format!("vCPU {i}: {e}")))?;
                    }
                    (None, None) => unreachable!("a guest is booted or restored"),
                }
                Ok(fd)
            })
            .collect::<Result<Vec<_>>>()?;
        // Opened now: a running vCPU's descriptor is locked by its thread.
        let kvm_stats = vcpus.iter().filter_map(|fd| KvmStats::open(fd).ok()).collect();
        let vcpus: Vec<_> = vcpus.into_iter().map(|fd| Arc::new(Mutex::new(fd))).collect();
        let tsc_khz = vcpus.first().and_then(|fd| fd.lock().unwrap().get_tsc_khz().ok());
        let rounds = doorbell::memtest_rounds(config.cmdline.as_deref().unwrap_or(""));
        let (serial, doorbell) = match restore {
            Some(snapshot) => (
                serial::restore(&snapshot.serial, serial_irq, console.clone()).map_err(restore_err)?,
                Doorbell::restore(id as u64, rounds, &snapshot.doorbell),
            ),
            None => (serial::new(serial_irq, console.clone()), Doorbell::new(id as u64, vcpu_count, rounds)),
        };
        // Only our own test guests (the ELF note) ask for the doorbell; a
        // restored guest has it as its snapshot says.
        let doorbell = match &boot {
            Some(info) if !info.all_vcpus_at_entry => doorbell.unmapped(),
            _ => doorbell,
        };
        let doorbell = doorbell.with_tsc_khz(tsc_khz);
        let power = match restore.and_then(|snapshot| snapshot.power.as_ref()) {
            Some(saved) => PmRegisters::restore(saved, restore_tsc),
            None => PmRegisters::default(),
        };
        let pci = transport == Transport::Pci;
        let devices = Devices::new(serial, doorbell, power, console, devices, pci).map_err(Error::host)?;
        let msr_list = hv.kvm.get_msr_index_list().map(|l| l.as_slice().to_vec()).unwrap_or_default();
        let shared = Arc::new(Shared { gate, io_gate, devices, end: Mutex::new(None) });
        Ok(Guest {
            id,
            config: GuestConfig { transport: Some(transport), ..config.clone() },
            shared,
            vcpus,
            msr_list,
            started: false,
            throttled: false,
            threads: Vec::new(),
            io: None,
            vm,
            dirty_log: options.dirty_log,
            tsc_khz,
            kvm_stats,
            ram,
        })
    }

    /// Starts one thread per vCPU; the last of them to leave writes
    /// `finished`.
    pub fn start(&mut self, finished: Arc<EventFd>) -> std::io::Result<()> {
        self.shared.devices.doorbell.mark_start();
        let virtio = &self.shared.devices.virtio;
        if !virtio.is_empty() {
            self.io = Some(spawn_io_thread(self.id, virtio)?);
            // A restored guest's last kicks may not have been served.
            virtio.iter().for_each(|d| d.kick());
        }
        self.started = true;
        for (index, fd) in self.vcpus.iter().cloned().enumerate() {
            let shared = self.shared.clone();
            let finished = finished.clone();
            self.shared.gate.starting();
            let thread = std::thread::Builder::new().name(format!("vcpu{index}")).spawn(move || {
                let (end, last) = match crate::guest::seccomp::install_for_thread(crate::guest::seccomp::Role::Vcpu) {
                    Ok(()) => vcpu::run(&fd, index as u8, &shared.gate, &shared.devices),
                    Err(e) => (Some(GuestEnd::VmmError(format!("vCPU {index}: {e}"))), shared.gate.leave(index)),
                };
                if let Some(end) = end {
                    shared.end_guest(end);
                }
                if last {
                    let _ = finished.write(1);
                }
            });
            match thread {
                Ok(t) => self.threads.push(t),
                Err(e) => {
                    self.shared.gate.leave(index);
                    self.stop(GuestEnd::VmmError(format!("cannot start a vCPU thread: {e}")));
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Parks every vCPU outside the guest until `resume`; its memory stays
    /// mapped (and mergeable). Pauses nest.
    pub fn pause(&self) {
        self.shared.gate.pause();
    }

    /// Undoes one `pause`.
    pub fn resume(&self) {
        self.shared.gate.resume();
    }

    /// Holds (or lets go of) the vCPUs for memory: a pause of its own,
    /// so a user's pause and resume neither undo it nor are undone by it.
    pub fn throttle(&mut self, on: bool) {
        if on != self.throttled {
            self.throttled = on;
            if on {
                self.pause();
            } else {
                self.resume();
            }
        }
    }

    /// Writes the guest to `dir` (see `guest/snapshot.rs`). The guest must have
    /// started and be paused (its vCPUs parked); its devices are held for
    /// the time it takes, so none writes guest memory or its backend
    /// meanwhile. Returns the pages written and that time.
    pub fn snapshot(&self, files: &SnapshotFiles) -> Result<Written> {
        if !self.started || !self.shared.gate.is_paused() {
            return Err(Error::conflict(format!(
                "guest {} must be paused to take a snapshot: pause it first",
                self.id
            )));
        }
        let held = std::time::Instant::now();
        let devices: Vec<_> = self.shared.devices.virtio.iter().map(|d| d.hold()).collect();
        let saved = devices
            .iter()
            .map(|d| d.save(files))
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(|e| Error::host(format!("cannot save the devices: {e}")))?;
        let pages = self.write_snapshot(files, saved)?;
        drop(devices);
        Ok(Written { pages, micros: held.elapsed().as_micros() as u64 })
    }

    fn write_snapshot(&self, files: &SnapshotFiles, devices: Vec<SavedDevice>) -> Result<u64> {
        let kvm_err = |what: &str, e: kvm_ioctls::Error| Error::host(format!("cannot save {what}: {e}"));
        let vcpus = self
            .vcpus
            .iter()
            .enumerate()
            .map(|(i, fd)| {
                VcpuState::save(&fd.lock().unwrap(), &self.msr_list).map_err(|e| kvm_err(&format!("vCPU {i}"), e))
            })
            .collect::<Result<Vec<_>>>()?;
        // A clone's snapshot records the kernel it came from, not the clone.
        let config = GuestConfig { restore: None, ..self.config.clone() };
        let state = SnapshotState::new(
            config,
            VmState::save(&self.vm).map_err(|e| kvm_err("the VM", e))?,
            vcpus,
            self.shared.devices.serial_state(),
            self.shared.devices.doorbell.save(),
            self.shared.devices.power.save(),
            devices,
        );
        crate::guest::snapshot::write(files, &state, &self.ram)
            .map_err(|e| Error::host(format!("cannot write the snapshot: {e}")))
    }

    /// Ends the guest for `reason` unless it already ended for another.
    pub fn stop(&self, reason: GuestEnd) {
        self.shared.end_guest(reason);
    }

    /// Waits for the vCPU and device threads and returns how the guest ended.
    pub fn join(mut self) -> GuestEnd {
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                self.shared.end_guest(GuestEnd::VmmError("a vCPU thread panicked".into()));
            }
        }
        if let Some((thread, stop)) = self.io.take() {
            stop.store(true, Ordering::SeqCst);
            if thread.join().is_err() {
                self.shared.end_guest(GuestEnd::VmmError("the I/O thread panicked".into()));
            }
        }
        let end = self.shared.end.lock().unwrap().take();
        // All vCPUs left on their own (e.g. every memtest vCPU finished) but
        // nobody said why: that cannot happen by design, so say so loudly.
        let end = end.unwrap_or_else(|| GuestEnd::VmmError("every vCPU stopped without a reason".into()));
        self.shared.devices.doorbell.judge_stop(end)
    }

    /// Corrupted pages a memtest guest has reported so far (0 for others).
    pub fn reported_mismatches(&self) -> u64 {
        self.shared.devices.doorbell.reported_mismatches()
    }

    /// Rounds a memtest guest has verified on every vCPU (a clone counts
    /// its template's too).
    pub fn rounds(&self) -> Option<u64> {
        self.shared.devices.doorbell.rounds()
    }

    /// What the guest has cost KVM so far, over its vCPUs.
    pub fn kvm_counters(&self) -> KvmCounters {
        let mut all = KvmCounters::default();
        for s in &self.kvm_stats {
            all.add(&s.read());
        }
        all
    }

    /// How long a memtest guest's pages took, in nanoseconds (empty for
    /// other guests, or without the TSC rate).
    pub fn gaps(&self) -> crate::gaps::Gaps {
        match self.tsc_khz {
            Some(khz) => crate::gaps::Gaps::from_ticks(&self.shared.devices.doorbell.gaps(), khz),
            None => Default::default(),
        }
    }

    /// What page sharing uses to stop this guest's writers when it cannot
    /// write-protect pages.
    pub fn freezer(&self) -> Arc<dyn dedup::Freezer> {
        self.shared.clone()
    }

    /// The guest's writes since the last call, for page sharing: KVM's
    /// dirty log of the vCPUs' writes and the VMM's own device writes.
    pub fn dirty_tracker(&self) -> Option<Arc<dyn dedup::DirtyTracker>> {
        self.dirty_log.then(|| {
            Arc::new(DirtyPages {
                kvm: vm::DirtyLog::new(self.vm.clone(), &self.ram),
                memory: self.ram.memory().clone(),
            }) as Arc<dyn dedup::DirtyTracker>
        })
    }

    /// Its virtio device called `name`, if it has one.
    pub fn virtio_slot(&self, name: &str) -> Option<Arc<VirtioSlot>> {
        self.shared.devices.virtio.iter().find(|d| d.name() == name).cloned()
    }

    pub fn config(&self) -> &GuestConfig {
        &self.config
    }

    pub fn console_tail(&self) -> String {
        self.shared.devices.console.tail()
    }

    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }
}

impl Drop for Guest {
    /// A guest dropped without `join` still stops its I/O thread before its
    /// memory goes.
    fn drop(&mut self) {
        if let Some((thread, stop)) = self.io.take() {
            stop.store(true, Ordering::SeqCst);
            let _ = thread.join();
        }
    }
}

/// Every page written since the last look, by a vCPU or by the VMM.
struct DirtyPages {
    kvm: vm::DirtyLog,
    memory: GuestMemoryMmap,
}

impl dedup::DirtyTracker for DirtyPages {
    fn watch(&self, pages: &[u64]) -> std::io::Result<()> {
        self.kvm.watch(pages)
    }

    fn take_dirty(&self) -> std::io::Result<Vec<u64>> {
        let mut bits = self.kvm.take_dirty()?;
        for (word, device) in bits.iter_mut().zip(crate::memory::take_device_writes(&self.memory)) {
            *word |= device;
        }
        Ok(bits)
    }
}

/// The guest's device event loop: serves its virtio devices' queue kicks
/// (ioeventfds) and host descriptors until told to stop.
fn spawn_io_thread(id: usize, devices: &[Arc<VirtioSlot>]) -> std::io::Result<(JoinHandle<()>, Arc<AtomicBool>)> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut events = EventManager::<Arc<dyn EventSubscriber + Send + Sync>>::new()
        .map_err(|e| std::io::Error::other(format!("event loop: {e}")))?;
    for device in devices {
        events.add_subscriber(device.clone());
    }
    let thread = {
        let stop = stop.clone();
        std::thread::Builder::new().name("io".into()).spawn(move || {
            if let Err(e) = crate::guest::seccomp::install_for_thread(crate::guest::seccomp::Role::Io) {
                log::error!("guest {id}: the I/O thread: {e}");
                return;
            }
            while !stop.load(Ordering::SeqCst) {
                if let Err(e) = events.run_with_timeout(50) {
                    log::error!("guest {id}: device event loop failed: {e}");
                    return;
                }
            }
        })?
    };
    Ok((thread, stop))
}
