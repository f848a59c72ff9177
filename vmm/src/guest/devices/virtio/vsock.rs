//! virtio-vsock with a hybrid host side, as Firecracker's: the guest's
//! stream sockets meet Unix sockets on the host.
//!
//! - A host program connects to the guest's Unix socket (`socket`) and
//!   writes `CONNECT <port>\n`; the device asks the guest to accept on that
//!   port and, once it does, answers `OK <host port>\n`; then the bytes flow.
//! - A guest connecting to the host (CID 2) on port P reaches the Unix
//!   socket `<socket>_P`, if something listens there; else it is refused.
//!   The supervisor connects it and passes it over (`process/dial.rs`): a
//!   jailed guest process cannot reach a user's socket by itself.
//!
//! Queues: 0 receives (packets to the guest), 1 transmits (packets from
//! it), 2 carries events (a transport reset after a restore, so a clone
//! starts with no connections). Each packet is a 44-byte header and, for
//! data, its bytes.
//!
//! Every packet a guest sends is hostile input, and a host peer may never
//! read: each connection buffers at most [`BUF_ALLOC`] bytes on their way to
//! the host, which is the credit the guest is given (it may not send more
//! until the host has taken some); a guest that ignores its credit has its
//! connection reset. Host bytes go to the guest only as its credit allows.
//! Connections are capped at [`MAX_CONNECTIONS`]; control packets waiting
//! for receive buffers at one per connection and request. Nothing a guest
//! or a host peer does makes the device allocate without bound.
//!
//! Host descriptors come and go with connections, while the I/O thread
//! waits on a fixed set: the device's own epoll descriptor, which holds the
//! listener and every connection (edge-triggered), is its one host
//! descriptor.

use std::collections::{HashMap, VecDeque};
use std::io::{self, ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

use serde::{Deserialize, Serialize};
use virtio_queue::{QueueOwnedT, QueueT, Reader, Writer};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::device::{self, read_config_bytes, Persist, Queues, Used, VirtioDevice};
use super::VIRTIO_F_VERSION_1;
use crate::config::{check_cid, HOST_CID};
use crate::guest::dial::HostDialer;
use crate::snapshot::SnapshotFiles;

/// How snapshots name it.
pub const NAME: &str = "virtio-vsock";
const VIRTIO_ID_VSOCK: u32 = 19;
const RX: usize = 0;
const TX: usize = 1;
const EVENT: usize = 2;
const QUEUE_SIZES: &[u16] = &[256, 256, 256];

const HDR: usize = 44;
const TYPE_STREAM: u16 = 1;
const OP_REQUEST: u16 = 1;
const OP_RESPONSE: u16 = 2;
const OP_RST: u16 = 3;
const OP_SHUTDOWN: u16 = 4;
const OP_RW: u16 = 5;
const OP_CREDIT_UPDATE: u16 = 6;
const OP_CREDIT_REQUEST: u16 = 7;
/// SHUTDOWN flags: the sender will receive / send no more.
const SHUTDOWN_BOTH: u32 = 3;
const EVENT_TRANSPORT_RESET: u32 = 0;

/// Bytes a connection holds on their way to its host peer: the guest's
/// credit.
pub const BUF_ALLOC: u32 = 64 * 1024;
/// Connections per guest, both directions together.
pub const MAX_CONNECTIONS: usize = 64;
/// Host-side ports the device gives connections the host opens.
const FIRST_HOST_PORT: u32 = 1 << 30;
/// The longest `CONNECT <port>\n` line.
const MAX_LINE: usize = 32;
const LISTENER: u64 = 0;

/// A packet header (`struct virtio_vsock_hdr`, little-endian).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Header {
    src_cid: u64,
    dst_cid: u64,
    src_port: u32,
    dst_port: u32,
    len: u32,
    kind: u16,
    op: u16,
    flags: u32,
    buf_alloc: u32,
    fwd_cnt: u32,
}

impl Header {
    fn parse(b: &[u8; HDR]) -> Header {
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap());
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap());
        let u16_at = |i: usize| u16::from_le_bytes(b[i..i + 2].try_into().unwrap());
        Header {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            kind: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    fn bytes(&self) -> [u8; HDR] {
        let mut b = [0u8; HDR];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.kind.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Phase {
    /// A host peer connected; its `CONNECT <port>` line is not all here.
    HostHello,
    /// We asked the guest to accept; no answer yet.
    Requested,
    Established,
}

/// One stream between a guest port and a host peer.
struct Connection {
    stream: UnixStream,
    phase: Phase,
    /// The host side's port (ours) and the guest's.
    host_port: u32,
    guest_port: u32,
    line: Vec<u8>,
    /// Guest bytes the host peer has not taken yet (at most BUF_ALLOC).
    to_host: VecDeque<u8>,
    /// Guest bytes passed on to the host peer, and what the guest was last
    /// told of it.
    fwd_cnt: u32,
    told_fwd_cnt: u32,
    /// Host bytes sent to the guest, and the guest's credit.
    tx_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// The stream may have bytes (edge-triggered: until a read would block).
    readable: bool,
    /// The host peer closed its side; the guest was told.
    host_done: bool,
}

impl Connection {
    fn new(stream: UnixStream, phase: Phase, host_port: u32, guest_port: u32) -> Connection {
        Connection {
            stream,
            phase,
            host_port,
            guest_port,
            line: Vec::new(),
            to_host: VecDeque::new(),
            fwd_cnt: 0,
            told_fwd_cnt: 0,
            tx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            readable: true,
            host_done: false,
        }
    }

    /// Bytes the guest can take now.
    fn credit(&self) -> u32 {
        self.peer_buf_alloc.saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }

    /// Writes what the host peer takes; false if the stream broke.
    fn flush(&mut self) -> bool {
        while !self.to_host.is_empty() {
            let (front, _) = self.to_host.as_slices();
            match self.stream.write(front) {
                Ok(0) => return false,
                Ok(n) => {
                    self.to_host.drain(..n);
                    self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        true
    }
}

/// What the device has moved and refused.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VsockCounters {
    pub connections: u64,
    pub refused: u64,
    /// Packets from the guest that were malformed or broke the rules.
    pub bad_packets: u64,
}

pub struct Vsock {
    cid: u64,
    /// Connections the guest opens to the host, made by the supervisor.
    dialer: HostDialer,
    listener: UnixListener,
    epoll: Epoll,
    conns: HashMap<u64, Connection>,
    by_ports: HashMap<(u32, u32), u64>,
    next_token: u64,
    next_host_port: u32,
    /// Packets with no payload waiting for receive buffers.
    control: VecDeque<Header>,
    /// A transport reset to send on the event queue (after a restore).
    reset_pending: bool,
    scratch: Vec<u8>,
    pub counters: VsockCounters,
}

impl Vsock {
    /// A device for a guest of address `cid` whose host side listens on
    /// `listener`; its connections to host ports go through `dialer`.
    pub fn new(cid: u64, dialer: HostDialer, listener: UnixListener) -> io::Result<Vsock> {
        listener.set_nonblocking(true)?;
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            listener.as_raw_fd(),
            EpollEvent::new(EventSet::IN | EventSet::EDGE_TRIGGERED, LISTENER),
        )?;
        Ok(Vsock {
            cid,
            dialer,
            listener,
            epoll,
            conns: HashMap::new(),
            by_ports: HashMap::new(),
            next_token: LISTENER + 1,
            next_host_port: FIRST_HOST_PORT,
            control: VecDeque::new(),
            reset_pending: false,
            scratch: vec![0; 64 * 1024],
            counters: Default::default(),
        })
    }

    fn header(&self, conn: &Connection, op: u16) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: self.cid,
            src_port: conn.host_port,
            dst_port: conn.guest_port,
            kind: TYPE_STREAM,
            op,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: conn.fwd_cnt,
            ..Default::default()
        }
    }

    /// A control packet for the guest; dropped when too many wait (the
    /// guest is not taking its receive queue).
    fn send_control(&mut self, h: Header) {
        if self.control.len() < 2 * MAX_CONNECTIONS {
            self.control.push_back(h);
        }
    }

    /// A reset answering packet `h`, which fits no connection.
    fn refuse(&mut self, h: &Header) {
        if h.op != OP_RST {
            self.send_control(Header {
                src_cid: HOST_CID,
                dst_cid: self.cid,
                src_port: h.dst_port,
                dst_port: h.src_port,
                kind: TYPE_STREAM,
                op: OP_RST,
                ..Default::default()
            });
        }
    }

    fn add(&mut self, conn: Connection) -> Option<u64> {
        let token = self.next_token;
        let events = EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED;
        if let Err(e) = self.epoll.ctl(ControlOperation::Add, conn.stream.as_raw_fd(), EpollEvent::new(events, token)) {
            log::warn!("{NAME}: cannot watch a connection: {e}");
            return None;
        }
        let _ = conn.stream.set_nonblocking(true);
        self.next_token += 1;
        self.counters.connections += 1;
        self.by_ports.insert((conn.host_port, conn.guest_port), token);
        self.conns.insert(token, conn);
        Some(token)
    }

    /// Ends a connection; with `tell`, the guest gets a reset.
    fn remove(&mut self, token: u64, tell: bool) {
        if let Some(conn) = self.conns.remove(&token) {
            self.by_ports.remove(&(conn.host_port, conn.guest_port));
            let _ = self.epoll.ctl(ControlOperation::Delete, conn.stream.as_raw_fd(), EpollEvent::default());
            if tell && conn.phase != Phase::HostHello {
                let h = self.header(&conn, OP_RST);
                self.send_control(h);
            }
        }
    }

    /// Takes what the epoll descriptor reports: new host connections, and
    /// streams that may be read.
    fn take_events(&mut self) {
        let mut events = [EpollEvent::default(); 64];
        loop {
            let n = match self.epoll.wait(0, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return log::warn!("{NAME}: epoll: {e}"),
            };
            for event in &events[..n] {
                match event.data() {
                    LISTENER => self.accept(),
                    token => {
                        if let Some(conn) = self.conns.get_mut(&token) {
                            conn.readable = true;
                        }
                    }
                }
            }
            if n < events.len() {
                return;
            }
        }
    }

    fn accept(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) if self.conns.len() < MAX_CONNECTIONS => {
                    let port = self.next_host_port;
                    self.next_host_port = self.next_host_port.checked_add(1).unwrap_or(FIRST_HOST_PORT);
                    self.add(Connection::new(stream, Phase::HostHello, port, 0));
                }
                Ok(_) => {
                    self.counters.refused += 1;
                    log::warn!("{NAME}: {} connections already: a host connection refused", MAX_CONNECTIONS);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    }

    /// Reads host peers' `CONNECT <port>` lines; a whole one becomes a
    /// request to the guest.
    fn read_hellos(&mut self) {
        let waiting: Vec<u64> =
            self.conns.iter().filter(|(_, c)| c.phase == Phase::HostHello && c.readable).map(|(t, _)| *t).collect();
        for token in waiting {
            let conn = self.conns.get_mut(&token).unwrap();
            let mut byte = [0u8; 1];
            let mut port: Result<Option<u32>, ()> = Ok(None);
            loop {
                // A byte at a time: what follows the line is the guest's.
                match conn.stream.read(&mut byte) {
                    Ok(1) if byte[0] == b'\n' => {
                        port = parse_connect(&conn.line).map(Some).ok_or(());
                        break;
                    }
                    Ok(1) if conn.line.len() < MAX_LINE => conn.line.push(byte[0]),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        conn.readable = false;
                        break;
                    }
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    // The peer left, or its line is too long, or the stream broke.
                    _ => {
                        port = Err(());
                        break;
                    }
                }
            }
            match port {
                Ok(Some(port)) if !self.by_ports.contains_key(&(conn.host_port, port)) => {
                    let host_port = conn.host_port;
                    conn.guest_port = port;
                    conn.phase = Phase::Requested;
                    self.by_ports.remove(&(host_port, 0));
                    self.by_ports.insert((host_port, port), token);
                    let h = self.header(&self.conns[&token], OP_REQUEST);
                    self.send_control(h);
                }
                Ok(None) => {}
                _ => {
                    let _ = conn.stream.write_all(b"ERROR bad CONNECT line\n");
                    self.remove(token, false);
                }
            }
        }
    }

    /// One packet from the guest.
    fn take_packet(&mut self, h: Header, payload: &[u8]) {
        if h.src_cid != self.cid || h.dst_cid != HOST_CID || h.kind != TYPE_STREAM {
            self.counters.bad_packets += 1;
            return self.refuse(&h);
        }
        let token = self.by_ports.get(&(h.dst_port, h.src_port)).copied();
        let Some(token) = token else {
            return match h.op {
                OP_REQUEST => self.connect_to_host(&h),
                _ => self.refuse(&h),
            };
        };
        let conn = self.conns.get_mut(&token).unwrap();
        conn.peer_buf_alloc = h.buf_alloc;
        conn.peer_fwd_cnt = h.fwd_cnt;
        match (h.op, conn.phase) {
            (OP_RESPONSE, Phase::Requested) => {
                conn.phase = Phase::Established;
                let ok = format!("OK {}\n", conn.host_port);
                if conn.stream.write_all(ok.as_bytes()).is_err() {
                    self.remove(token, true);
                }
            }
            (OP_RW, Phase::Established) => {
                if conn.to_host.len() + payload.len() > BUF_ALLOC as usize {
                    log::debug!("{NAME}: the guest sent past its credit on port {}: reset", h.src_port);
                    self.counters.bad_packets += 1;
                    return self.remove(token, true);
                }
                conn.to_host.extend(payload);
                if !conn.flush() {
                    self.remove(token, true);
                }
            }
            (OP_CREDIT_UPDATE, _) => {}
            (OP_CREDIT_REQUEST, Phase::Established) => {
                let h = self.header(&self.conns[&token], OP_CREDIT_UPDATE);
                self.conns.get_mut(&token).unwrap().told_fwd_cnt = h.fwd_cnt;
                self.send_control(h);
            }
            (OP_SHUTDOWN, _) => {
                // What the guest sent is passed on if the peer takes it
                // now; then both sides are done.
                let _ = conn.flush();
                self.remove(token, h.flags & SHUTDOWN_BOTH != 0);
            }
            (OP_RST, _) => self.remove(token, false),
            _ => {
                self.counters.bad_packets += 1;
                self.remove(token, true);
            }
        }
    }

    /// The guest connects to host port `h.dst_port`: `<socket>_<port>`.
    fn connect_to_host(&mut self, h: &Header) {
        if self.conns.len() >= MAX_CONNECTIONS {
            self.counters.refused += 1;
            return self.refuse(h);
        }
        match self.dialer.connect(h.dst_port) {
            Ok(stream) => {
                let mut conn = Connection::new(stream, Phase::Established, h.dst_port, h.src_port);
                conn.peer_buf_alloc = h.buf_alloc;
                conn.peer_fwd_cnt = h.fwd_cnt;
                let response = self.header(&conn, OP_RESPONSE);
                if self.add(conn).is_some() {
                    self.send_control(response);
                } else {
                    self.refuse(h);
                }
            }
            Err(e) => {
                log::debug!("{NAME}: the guest's connection to host port {}: {e}", h.dst_port);
                self.counters.refused += 1;
                self.refuse(h);
            }
        }
    }

    /// Takes every packet the guest made available.
    fn transmit(&mut self, q: &mut Queues) -> Result<Used, virtio_queue::Error> {
        let mut used = 0;
        while let Some(chain) = q.queues[TX].pop_descriptor_chain(q.mem) {
            let head = chain.head_index();
            match read_packet(q.mem, chain, &mut self.scratch) {
                Ok((h, len)) => {
                    let payload = std::mem::take(&mut self.scratch);
                    self.take_packet(h, &payload[..len]);
                    self.scratch = payload;
                }
                Err(why) => {
                    log::debug!("{NAME}: a packet from the guest dropped: {why}");
                    self.counters.bad_packets += 1;
                }
            }
            let _inside = q.gate.enter();
            q.queues[TX].add_used(q.mem, head, 0)?;
            used |= 1 << TX;
        }
        Ok(used)
    }

    /// Passes on what host peers will take, and tells the guest its credit
    /// when half of it came back.
    fn flush_to_host(&mut self) {
        let tokens: Vec<u64> = self.conns.keys().copied().collect();
        for token in tokens {
            let conn = self.conns.get_mut(&token).unwrap();
            if conn.phase != Phase::Established {
                continue;
            }
            if !conn.flush() {
                self.remove(token, true);
                continue;
            }
            if conn.fwd_cnt.wrapping_sub(conn.told_fwd_cnt) >= BUF_ALLOC / 2 {
                conn.told_fwd_cnt = conn.fwd_cnt;
                let h = self.header(&self.conns[&token], OP_CREDIT_UPDATE);
                self.send_control(h);
            }
        }
    }

    /// Fills the guest's receive buffers: control packets first, then host
    /// bytes as each connection's credit allows.
    fn receive(&mut self, q: &mut Queues) -> Result<Used, virtio_queue::Error> {
        let mut used = 0;
        loop {
            let Some(chain) = q.queues[RX].pop_descriptor_chain(q.mem) else {
                return Ok(used);
            };
            let room = Writer::new(q.mem, chain.clone()).map(|w| w.available_bytes()).unwrap_or(0);
            if room < HDR {
                // Unusable: give it back empty.
                let _inside = q.gate.enter();
                q.queues[RX].add_used(q.mem, chain.head_index(), 0)?;
                self.counters.bad_packets += 1;
                used |= 1 << RX;
                continue;
            }
            let Some((h, len)) = self.next_for_guest(room - HDR) else {
                q.queues[RX].go_to_previous_position();
                return Ok(used);
            };
            let head = chain.head_index();
            let _inside = q.gate.enter();
            let mut writer = Writer::new(q.mem, chain).expect("checked above");
            if let Err(e) = writer.write_all(&h.bytes()).and_then(|()| writer.write_all(&self.scratch[..len])) {
                log::warn!("{NAME}: copy to guest: {e}");
            }
            q.queues[RX].add_used(q.mem, head, (HDR + len) as u32)?;
            used |= 1 << RX;
        }
    }

    /// The next packet for the guest, its payload in `scratch`, at most
    /// `room` bytes of it.
    fn next_for_guest(&mut self, room: usize) -> Option<(Header, usize)> {
        if let Some(h) = self.control.pop_front() {
            return Some((h, 0));
        }
        let tokens: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, c)| c.phase == Phase::Established && c.readable && !c.host_done && c.credit() > 0)
            .map(|(t, _)| *t)
            .collect();
        for token in tokens {
            let conn = self.conns.get_mut(&token).unwrap();
            let want = room.min(conn.credit() as usize).min(self.scratch.len());
            match conn.stream.read(&mut self.scratch[..want]) {
                Ok(0) => {
                    // The host peer is done: so is the guest's stream.
                    conn.host_done = true;
                    let mut h = self.header(&self.conns[&token], OP_SHUTDOWN);
                    h.flags = SHUTDOWN_BOTH;
                    return Some((h, 0));
                }
                Ok(n) => {
                    conn.tx_cnt = conn.tx_cnt.wrapping_add(n as u32);
                    let mut h = self.header(&self.conns[&token], OP_RW);
                    h.len = n as u32;
                    return Some((h, n));
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => conn.readable = false,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => self.remove(token, true),
            }
        }
        self.control.pop_front().map(|h| (h, 0))
    }

    /// Tells the guest's driver, on the event queue, to forget its
    /// connections (they were the template's).
    fn send_reset(&mut self, q: &mut Queues) -> Result<Used, virtio_queue::Error> {
        if !self.reset_pending {
            return Ok(0);
        }
        let Some(chain) = q.queues[EVENT].pop_descriptor_chain(q.mem) else {
            return Ok(0);
        };
        let head = chain.head_index();
        let _inside = q.gate.enter();
        let written = Writer::new(q.mem, chain)
            .map_err(|e| io::Error::other(e.to_string()))
            .and_then(|mut w| w.write_all(&EVENT_TRANSPORT_RESET.to_le_bytes()));
        if let Err(e) = written {
            log::warn!("{NAME}: the reset event: {e}");
        }
        q.queues[EVENT].add_used(q.mem, head, 4)?;
        self.reset_pending = false;
        Ok(1 << EVENT)
    }

    fn pump(&mut self, q: &mut Queues) -> Result<Used, virtio_queue::Error> {
        self.take_events();
        self.read_hellos();
        self.flush_to_host();
        let sent = self.transmit(q)?;
        self.flush_to_host();
        Ok(sent | self.receive(q)? | self.send_reset(q)?)
    }
}

/// `CONNECT <port>` -> the port.
fn parse_connect(line: &[u8]) -> Option<u32> {
    let line = std::str::from_utf8(line).ok()?.trim_end_matches('\r');
    line.strip_prefix("CONNECT ")?.trim().parse().ok()
}

/// A packet from a chain: its header, and its payload in `buf`.
fn read_packet(
    mem: &crate::memory::GuestMemoryMmap,
    chain: virtio_queue::DescriptorChain<&crate::memory::GuestMemoryMmap>,
    buf: &mut [u8],
) -> Result<(Header, usize), String> {
    let mut reader = Reader::new(mem, chain).map_err(|e| format!("unusable chain: {e}"))?;
    if reader.available_bytes() < HDR {
        return Err(format!("{} bytes is no packet", reader.available_bytes()));
    }
    let mut raw = [0u8; HDR];
    reader.read_exact(&mut raw).map_err(|e| e.to_string())?;
    let h = Header::parse(&raw);
    let len = h.len as usize;
    if len > buf.len() || len > reader.available_bytes() {
        return Err(format!("a {len}-byte payload in {} bytes", reader.available_bytes()));
    }
    reader.read_exact(&mut buf[..len]).map_err(|e| e.to_string())?;
    Ok((h, len))
}

impl VirtioDevice for Vsock {
    fn name(&self) -> &'static str {
        NAME
    }

    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &'static [u16] {
        QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    /// `struct virtio_vsock_config`: the guest's CID.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.cid.to_le_bytes(), offset, data);
    }

    fn reset(&mut self) {
        let tokens: Vec<u64> = self.conns.keys().copied().collect();
        for token in tokens {
            self.remove(token, false);
        }
        self.control.clear();
    }

    fn process_queue(&mut self, _index: usize, q: &mut Queues) -> Result<Used, virtio_queue::Error> {
        self.pump(q)
    }

    fn host_fds(&self) -> Vec<RawFd> {
        vec![self.epoll.as_raw_fd()]
    }

    fn process_host(&mut self, _fd: RawFd, q: &mut Queues) -> Result<Used, virtio_queue::Error> {
        self.pump(q)
    }

    fn save(&self, files: &SnapshotFiles) -> io::Result<serde_json::Value> {
        device::to_value(self, files)
    }
}

/// A snapshot keeps the guest's address; connections are not kept (their
/// host peers belong to the template), and the restored guest is told so.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VsockState {
    pub cid: u64,
}

impl Persist for Vsock {
    type State = VsockState;
    /// The restored guest's dialer and listener.
    type Args = (HostDialer, UnixListener);

    fn save_state(&self, _files: &SnapshotFiles) -> io::Result<VsockState> {
        Ok(VsockState { cid: self.cid })
    }

    fn restore((dialer, listener): Self::Args, state: &VsockState, _dir: &Path) -> Result<Vsock, String> {
        check_cid(state.cid)?;
        let mut vsock = Vsock::new(state.cid, dialer, listener).map_err(|e| e.to_string())?;
        vsock.reset_pending = true;
        Ok(vsock)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_and_connect_lines_parse() {
        let h = Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 1234,
            dst_port: 5678,
            len: 9,
            kind: TYPE_STREAM,
            op: OP_RW,
            flags: 1,
            buf_alloc: 4096,
            fwd_cnt: 77,
        };
        assert_eq!(Header::parse(&h.bytes()), h);
        assert_eq!(parse_connect(b"CONNECT 1234"), Some(1234));
        assert_eq!(parse_connect(b"CONNECT 52\r"), Some(52));
        for bad in [&b"CONNECT"[..], b"CONNECT x", b"connect 5", b"CONNECT 99999999999", b"\xff"] {
            assert_eq!(parse_connect(bad), None, "{bad:?}");
        }
        assert!(check_cid(3).is_ok());
        assert!(check_cid(2).is_err() && check_cid(u64::from(u32::MAX)).is_err());
    }
}
