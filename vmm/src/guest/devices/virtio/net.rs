//! virtio-net over a TAP: queue 0 receives (frames from the TAP into the
//! guest's buffers), queue 1 transmits (the guest's frames to the TAP).
//! Frames carry the 12-byte virtio-net header both ways, which TAP speaks
//! too, so checksum and segmentation offloads pass straight through.
//!
//! Every frame a guest hands us is hostile input: a chain that is empty,
//! outside guest memory, looping or larger than a frame can be is dropped
//! and counted, never trusted. Receiving holds at most one frame that did
//! not fit yet; when the guest has no buffers the TAP is left to fill (and
//! the kernel to drop), so nothing a peer sends makes us allocate.
//! Received frames are written inside the guest's I/O gate through
//! vm-memory, so they are logged dirty like disk reads and never race a
//! merge (docs/dedup.md).

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;

use serde::{Deserialize, Serialize};
use virtio_queue::{DescriptorChain, QueueOwnedT, QueueT, Reader, Writer};

use super::device::{self, read_config_bytes, Persist, Queues, Used, VirtioDevice};
use super::VIRTIO_F_VERSION_1;
use crate::guest::devices::rate_limiter::RateLimiter;
use crate::memory::GuestMemoryMmap;
use crate::snapshot::SnapshotFiles;
use crate::tap::{Tap, TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, VNET_HDR_LEN};

/// How snapshots name it.
pub const NAME: &str = "virtio-net";
const VIRTIO_ID_NET: u32 = 1;
const RX: usize = 0;
const TX: usize = 1;
const QUEUE_SIZES: &[u16] = &[256, 256];

pub const VIRTIO_NET_F_CSUM: u64 = 1 << 0;
pub const VIRTIO_NET_F_GUEST_CSUM: u64 = 1 << 1;
pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
pub const VIRTIO_NET_F_GUEST_TSO4: u64 = 1 << 7;
pub const VIRTIO_NET_F_GUEST_TSO6: u64 = 1 << 8;
pub const VIRTIO_NET_F_HOST_TSO4: u64 = 1 << 11;
pub const VIRTIO_NET_F_HOST_TSO6: u64 = 1 << 12;
pub const VIRTIO_NET_F_MRG_RXBUF: u64 = 1 << 15;

/// The largest frame with its header: a 64 KiB segmentation-offload frame,
/// its Ethernet header and a VLAN tag.
pub const MAX_FRAME: usize = VNET_HDR_LEN + 65535 + 14 + 4;

/// What the device has moved and dropped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetCounters {
    pub rx_frames: u64,
    pub tx_frames: u64,
    /// Frames from the TAP no buffer could take (too small, or unusable).
    pub rx_dropped: u64,
    /// Frames from the guest that were malformed or the TAP refused.
    pub tx_dropped: u64,
}

pub struct Net {
    tap: Tap,
    mac: [u8; 6],
    features: u64,
    /// A frame read from the TAP (its header first), waiting for buffers.
    frame: Vec<u8>,
    pending: usize,
    tx_buf: Vec<u8>,
    /// Frames both ways go no faster than it allows.
    limiter: Option<RateLimiter>,
    pub counters: NetCounters,
}

/// What became of a frame offered to the receive queue.
enum Delivery {
    Delivered,
    /// The guest has not enough buffers yet: keep it for its next kick.
    NoRoom,
    Dropped,
}

impl Net {
    pub fn new(tap: Tap, mac: [u8; 6]) -> Net {
        Net {
            tap,
            mac,
            features: 0,
            frame: vec![0; MAX_FRAME],
            pending: 0,
            tx_buf: Vec::new(),
            limiter: None,
            counters: Default::default(),
        }
    }

    pub fn with_limiter(mut self, limiter: RateLimiter) -> Net {
        self.limiter = Some(limiter);
        self
    }

    /// Whether the limiter lets a frame of `bytes` go now (if not, its
    /// timer is armed and the frame waits).
    fn allowed(&mut self, bytes: usize) -> bool {
        self.limiter.as_mut().is_none_or(|l| l.consume(bytes as u64))
    }

    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// Moves frames from the TAP into the receive queue until the TAP is
    /// empty or the guest's buffers are.
    fn receive(&mut self, q: &mut Queues) -> Result<Used, virtio_queue::Error> {
        let mut used = 0;
        loop {
            if self.pending == 0 {
                match self.tap.read_frame(&mut self.frame) {
                    Ok(n) if n < VNET_HDR_LEN => continue,
                    Ok(n) => self.pending = n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(used),
                    Err(e) => {
                        log::warn!("{NAME}: reading {}: {e}", self.tap.name());
                        return Ok(used);
                    }
                }
            }
            if !self.allowed(self.pending) {
                return Ok(used);
            }
            match self.deliver(q)? {
                Delivery::NoRoom => return Ok(used),
                Delivery::Delivered => {
                    self.counters.rx_frames += 1;
                    used |= 1 << RX;
                }
                Delivery::Dropped => {
                    self.counters.rx_dropped += 1;
                    used |= 1 << RX;
                }
            }
            self.pending = 0;
        }
    }

    /// Puts the pending frame into as many receive buffers as it needs
    /// (one without mergeable buffers), all or nothing.
    fn deliver(&mut self, q: &mut Queues) -> Result<Delivery, virtio_queue::Error> {
        let mergeable = self.features & VIRTIO_NET_F_MRG_RXBUF != 0;
        let frame = &self.frame[..self.pending];
        let (mem, rx) = (q.mem, &mut q.queues[RX]);
        let mut parts: Vec<(DescriptorChain<&GuestMemoryMmap>, usize)> = Vec::new();
        let mut placed = 0;
        while placed < frame.len() {
            let Some(chain) = rx.pop_descriptor_chain(mem) else {
                for _ in &parts {
                    rx.go_to_previous_position();
                }
                return Ok(Delivery::NoRoom);
            };
            let room = Writer::new(mem, chain.clone()).map(|w| w.available_bytes()).unwrap_or(0);
            // The first buffer holds the header whole; without mergeable
            // buffers one holds the frame.
            let fits = if parts.is_empty() { room >= VNET_HDR_LEN } else { room > 0 };
            if !fits || (!mergeable && room < frame.len()) {
                log::debug!("{NAME}: a receive buffer of {room} bytes for a {}-byte frame: dropped", frame.len());
                let _inside = q.gate.enter();
                for (chain, _) in parts.iter().chain([(chain, 0)].iter()) {
                    rx.add_used(mem, chain.head_index(), 0)?;
                }
                return Ok(Delivery::Dropped);
            }
            let n = room.min(frame.len() - placed);
            parts.push((chain, n));
            placed += n;
        }
        let mut header = [0u8; VNET_HDR_LEN];
        header.copy_from_slice(&frame[..VNET_HDR_LEN]);
        header[10..12].copy_from_slice(&(parts.len() as u16).to_le_bytes());
        let _inside = q.gate.enter();
        let mut at = 0;
        for (chain, n) in parts {
            let head = chain.head_index();
            let mut writer = Writer::new(mem, chain).expect("checked above");
            let piece = &frame[at..at + n];
            let written = if at == 0 {
                writer.write_all(&header).and_then(|()| writer.write_all(&piece[VNET_HDR_LEN..]))
            } else {
                writer.write_all(piece)
            };
            if let Err(e) = written {
                log::warn!("{NAME}: copy to guest: {e}");
            }
            rx.add_used(mem, head, n as u32)?;
            at += n;
        }
        Ok(Delivery::Delivered)
    }

    /// Sends every frame the guest made available to the TAP.
    fn transmit(&mut self, q: &mut Queues) -> Result<Used, virtio_queue::Error> {
        let (mem, tx) = (q.mem, &mut q.queues[TX]);
        let mut used = 0;
        while let Some(chain) = tx.pop_descriptor_chain(mem) {
            let bytes: u64 = chain.clone().map(|d| u64::from(d.len())).sum();
            if !self.allowed(bytes as usize) {
                tx.go_to_previous_position();
                break;
            }
            let head = chain.head_index();
            if let Err(why) = self.send(mem, chain) {
                log::debug!("{NAME}: a frame from the guest dropped: {why}");
                self.counters.tx_dropped += 1;
            } else {
                self.counters.tx_frames += 1;
            }
            let _inside = q.gate.enter();
            tx.add_used(mem, head, 0)?;
            used |= 1 << TX;
        }
        Ok(used)
    }

    fn send(&mut self, mem: &GuestMemoryMmap, chain: DescriptorChain<&GuestMemoryMmap>) -> Result<(), String> {
        let mut reader = Reader::new(mem, chain).map_err(|e| format!("unusable chain: {e}"))?;
        let len = reader.available_bytes();
        if !(VNET_HDR_LEN..=MAX_FRAME).contains(&len) {
            return Err(format!("{len} bytes is not a frame"));
        }
        self.tx_buf.resize(len, 0);
        reader.read_exact(&mut self.tx_buf).map_err(|e| format!("copy from guest: {e}"))?;
        self.tap.write_frame(&self.tx_buf).map_err(|e| format!("{}: {e}", self.tap.name()))
    }
}

impl VirtioDevice for Net {
    fn name(&self) -> &'static str {
        NAME
    }

    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &'static [u16] {
        QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
            | VIRTIO_NET_F_MAC
            | VIRTIO_NET_F_MRG_RXBUF
            | VIRTIO_NET_F_CSUM
            | VIRTIO_NET_F_GUEST_CSUM
            | VIRTIO_NET_F_GUEST_TSO4
            | VIRTIO_NET_F_GUEST_TSO6
            | VIRTIO_NET_F_HOST_TSO4
            | VIRTIO_NET_F_HOST_TSO6
    }

    /// `struct virtio_net_config` up to what we offer: the MAC.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.mac, offset, data);
    }

    /// The TAP may hand the guest what its driver said it takes.
    fn activate(&mut self, features: u64) {
        self.features = features;
        let mut offload = 0;
        if features & VIRTIO_NET_F_GUEST_CSUM != 0 {
            offload |= TUN_F_CSUM;
            if features & VIRTIO_NET_F_GUEST_TSO4 != 0 {
                offload |= TUN_F_TSO4;
            }
            if features & VIRTIO_NET_F_GUEST_TSO6 != 0 {
                offload |= TUN_F_TSO6;
            }
        }
        if let Err(e) = self.tap.set_offload(offload) {
            log::warn!("{NAME}: offloads {offload:#x} on {}: {e}", self.tap.name());
        }
    }

    fn reset(&mut self) {
        self.features = 0;
        self.pending = 0;
    }

    fn process_queue(&mut self, index: usize, q: &mut Queues) -> Result<Used, virtio_queue::Error> {
        match index {
            RX => self.receive(q),
            _ => self.transmit(q),
        }
    }

    fn host_fds(&self) -> Vec<RawFd> {
        let timer = self.limiter.iter().map(RateLimiter::timer_fd);
        std::iter::once(self.tap.as_raw_fd()).chain(timer).collect()
    }

    /// The TAP has frames, or the limiter's timer fired: serve what it held
    /// back both ways.
    fn process_host(&mut self, fd: RawFd, q: &mut Queues) -> Result<Used, virtio_queue::Error> {
        let mut used = 0;
        if let Some(limiter) = self.limiter.as_mut().filter(|l| l.timer_fd() == fd) {
            limiter.timer_fired();
            if q.queues[TX].ready() {
                used |= self.transmit(q)?;
            }
        }
        if q.queues[RX].ready() {
            used |= self.receive(q)?;
        }
        Ok(used)
    }

    fn save(&self, files: &SnapshotFiles) -> io::Result<serde_json::Value> {
        device::to_value(self, files)
    }
}

/// A network device keeps its MAC; frames in flight are dropped (a clone
/// starts with an empty wire, as after a cable was pulled and put back).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NetState {
    pub mac: [u8; 6],
}

impl Persist for Net {
    type State = NetState;
    type Args = Tap;

    fn save_state(&self, _files: &SnapshotFiles) -> io::Result<NetState> {
        Ok(NetState { mac: self.mac })
    }

    fn restore(tap: Tap, state: &NetState, _dir: &Path) -> Result<Net, String> {
        if state.mac[0] & 1 != 0 {
            return Err(format!("{:02x?} is a multicast MAC", state.mac));
        }
        Ok(Net::new(tap, state.mac))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::mac_for_guest;
    use crate::guest::devices::io_gate::IoGate;
    use virtio_queue::desc::split::Descriptor;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::Queue;
    use vm_memory::{Bytes, GuestAddress};

    const WRITE: u16 = 2;
    const RX_BUFFERS: u64 = 0x10_0000;
    const TX_FRAME: u64 = 0x20_0000;

    fn sh(cmd: &str) {
        let out = std::process::Command::new("sh").arg("-c").arg(cmd).output().unwrap();
        assert!(out.status.success(), "{cmd}: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// An ARP request from `mac`/`ip` for `target`, as a guest would send
    /// it: a virtio-net header, then the frame.
    fn arp_request(mac: [u8; 6], ip: [u8; 4], target: [u8; 4]) -> Vec<u8> {
        let mut f = vec![0u8; VNET_HDR_LEN];
        f.extend_from_slice(&[0xff; 6]);
        f.extend_from_slice(&mac);
        f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
        f.extend_from_slice(&mac);
        f.extend_from_slice(&ip);
        f.extend_from_slice(&[0; 6]);
        f.extend_from_slice(&target);
        f
    }

    /// A guest's frame goes out through the TAP to the host's stack, whose
    /// ARP reply comes back into the guest's receive buffers, spread over
    /// two of them (mergeable buffers); malformed frames from the guest
    /// are dropped and counted. Needs root (a TAP).
    #[test]
    fn a_frame_goes_out_and_the_hosts_reply_comes_back() {
        let id = std::process::id();
        let name = format!("vmmt{}", id % 100_000);
        let tap = Tap::open(&name)
            .unwrap_or_else(|e| panic!("this test needs root and /dev/net/tun: opening TAP {name}: {e}"));
        let net3 = (id % 250) as u8;
        let (host_ip, guest_ip) = ([198, 18, net3, 1], [198, 18, net3, 2]);
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
        sh(&format!("ip addr add 198.18.{net3}.1/24 dev {name} && ip link set {name} up"));

        let mac = mac_for_guest(7);
        let mut net = Net::new(tap, mac);
        let mut cfg = [0u8; 6];
        net.read_config(0, &mut cfg);
        assert_eq!(cfg, mac);
        net.activate(VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MRG_RXBUF | VIRTIO_NET_F_GUEST_CSUM);

        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
        let rxq = MockSplitQueue::create(&mem, GuestAddress(0x1000), 16);
        let txq = MockSplitQueue::create(&mem, GuestAddress(0x8000), 16);
        // Sixteen 32-byte receive buffers: a 54-byte ARP reply with its
        // header needs two.
        let rx: Vec<_> =
            (0..16).map(|i| RawDescriptor::from(Descriptor::new(RX_BUFFERS + i * 64, 32, WRITE, 0))).collect();
        rxq.add_desc_chains(&rx, 0).unwrap();
        let frame = arp_request(mac, guest_ip, host_ip);
        mem.write_slice(&frame, GuestAddress(TX_FRAME)).unwrap();
        let tx = [
            RawDescriptor::from(Descriptor::new(TX_FRAME, 8, 0, 0)), // shorter than a header
            RawDescriptor::from(Descriptor::new(0x1000_0000, 64, 0, 0)), // outside memory
            RawDescriptor::from(Descriptor::new(TX_FRAME, frame.len() as u32, 0, 0)),
        ];
        txq.add_desc_chains(&tx, 0).unwrap();
        let mut queues: Vec<Queue> = vec![rxq.create_queue().unwrap(), txq.create_queue().unwrap()];
        let gate = IoGate::default();
        let mut q = Queues { mem: &mem, queues: &mut queues, gate: &gate };

        assert_eq!(net.process_queue(TX, &mut q).unwrap(), 1 << TX);
        assert_eq!(txq.used().idx().load(), 3, "every chain is returned");
        assert_eq!((net.counters.tx_frames, net.counters.tx_dropped), (1, 2));

        // The reply: find it among whatever else the host sent.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut seen = 0u16;
        let reply = loop {
            net.process_host(net.tap.as_raw_fd(), &mut q).unwrap();
            let used = rxq.used().idx().load();
            let mut found = None;
            while seen < used {
                let elem = rxq.used().ring().ref_at(seen as usize).unwrap().load();
                let first = u64::from(elem.id());
                let mut header = [0u8; VNET_HDR_LEN];
                mem.read_slice(&mut header, GuestAddress(RX_BUFFERS + first * 64)).unwrap();
                let buffers = u16::from_le_bytes([header[10], header[11]]);
                assert!(buffers >= 1 && seen + buffers <= used, "num_buffers {buffers}");
                let mut bytes = Vec::new();
                for k in 0..buffers {
                    let e = rxq.used().ring().ref_at((seen + k) as usize).unwrap().load();
                    let mut part = vec![0u8; e.len() as usize];
                    mem.read_slice(&mut part, GuestAddress(RX_BUFFERS + u64::from(e.id()) * 64)).unwrap();
                    bytes.extend_from_slice(&part);
                }
                seen += buffers;
                let f = &bytes[VNET_HDR_LEN..];
                if f.len() >= 42 && f[12..14] == [0x08, 0x06] && f[20..22] == [0, 2] {
                    found = Some((buffers, f.to_vec()));
                }
            }
            if let Some(r) = found {
                break r;
            }
            assert!(std::time::Instant::now() < deadline, "no ARP reply within 5 s: {:?}", net.counters);
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        let (buffers, f) = reply;
        assert_eq!(buffers, 2, "a 54-byte frame in 32-byte buffers");
        assert_eq!(&f[0..6], &mac, "not addressed to the guest");
        assert_eq!(&f[28..32], &host_ip, "not the host's answer");
        assert_eq!((&f[32..38], &f[38..42]), (&mac[..], &guest_ip[..]));
        assert!(net.counters.rx_frames >= 1);
    }

    /// Ten frames a second, one at a time: of three frames the guest puts
    /// out at once, one goes now and the others when the limiter's timer
    /// says so. Then the TAP is deleted under the device. Needs root.
    #[test]
    fn a_rate_limit_holds_frames_back_until_its_timer() {
        use crate::config::RateLimit;
        use crate::guest::devices::rate_limiter::RateLimiter;
        let name = format!("vmml{}", std::process::id() % 100_000);
        let tap = Tap::open(&name)
            .unwrap_or_else(|e| panic!("this test needs root and /dev/net/tun: opening TAP {name}: {e}"));
        sh(&format!("ip link set {name} up"));
        let limit = RateLimit { ops_per_s: Some(10), ops_burst: Some(1), ..Default::default() };
        let mut net = Net::new(tap, mac_for_guest(1)).with_limiter(RateLimiter::new(&limit).unwrap());
        let fds = net.host_fds();
        assert_eq!(fds.len(), 2, "the TAP and the limiter's timer");
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
        let (rxq, txq) = (
            MockSplitQueue::create(&mem, GuestAddress(0x1000), 16),
            MockSplitQueue::create(&mem, GuestAddress(0x8000), 16),
        );
        let frame = arp_request(mac_for_guest(1), [198, 18, 255, 2], [198, 18, 255, 1]);
        mem.write_slice(&frame, GuestAddress(TX_FRAME)).unwrap();
        let tx = vec![RawDescriptor::from(Descriptor::new(TX_FRAME, frame.len() as u32, 0, 0)); 3];
        txq.add_desc_chains(&tx, 0).unwrap();
        let mut queues: Vec<Queue> = vec![rxq.create_queue().unwrap(), txq.create_queue().unwrap()];
        let gate = IoGate::default();
        let mut q = Queues { mem: &mem, queues: &mut queues, gate: &gate };
        net.process_queue(TX, &mut q).unwrap();
        assert_eq!((txq.used().idx().load(), net.counters.tx_frames), (1, 1), "the limit let more than one go");
        for sent in 2..=3 {
            let mut fd = libc::pollfd { fd: fds[1], events: libc::POLLIN, revents: 0 };
            // SAFETY: one valid pollfd.
            assert_eq!(unsafe { libc::poll(&mut fd, 1, 2000) }, 1, "the limiter's timer never fired");
            net.process_host(fds[1], &mut q).unwrap();
            assert_eq!(txq.used().idx().load(), sent);
        }
        assert_eq!(net.counters.tx_frames, 3);
        // The TAP disappears under the device: frames are dropped, counted,
        // and returned to the guest.
        let out = std::process::Command::new("ip").args(["link", "del", &name]).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        std::thread::sleep(std::time::Duration::from_millis(150));
        txq.add_desc_chains(&tx[..1], 3).unwrap();
        net.process_queue(TX, &mut q).unwrap();
        assert_eq!((txq.used().idx().load(), net.counters.tx_dropped), (4, 1), "{:?}", net.counters);
        assert_eq!(net.process_host(fds[0], &mut q).unwrap(), 0, "frames from a TAP that is gone");
    }

    /// Derived MACs are locally administered unicast; a saved state reads
    /// back, a damaged one is refused.
    #[test]
    fn its_mac_survives_a_snapshot() {
        assert_eq!(mac_for_guest(0x0102_0304)[..], [0x06, 0x76, 0x6d, 0x02, 0x03, 0x04]);
        assert_eq!(mac_for_guest(9)[0] & 3, 2, "locally administered unicast");
        let state: NetState = device::from_value::<Net>(&serde_json::json!({"mac": [1, 2, 3, 4, 5, 6]})).unwrap();
        assert_eq!(state.mac, [1, 2, 3, 4, 5, 6]);
        assert!(device::from_value::<Net>(&serde_json::json!({"mac": "x"})).is_err());
    }
}
