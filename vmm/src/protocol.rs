//! The channel between the supervisor and a guest process: two Unix stream
//! sockets (requests and their replies; events from the guest), carrying
//! frames of a JSON header and a raw binary payload (dirty bitmaps, merge
//! lists).
//!
//! Frame: `u32 length of the rest | u32 header length | header | payload`,
//! little endian. A frame over [`MAX_FRAME`] or a header that does not parse
//! is an error, never a crash: the supervisor does not trust what a guest
//! process sends.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::config::{GuestConfig, MergeProtect};
use crate::error::Kind;
use crate::memory::MemoryBackend;
use crate::outcome::GuestEnd;
use crate::snapshot::SavedState;

/// Descriptors a guest process starts with (after stdin, stdout, stderr):
/// its two channels. Everything else comes with its setup (`Setup::files`),
/// so a process can be started before anyone knows which guest it runs.
pub const FD_REQUESTS: i32 = 3;
pub const FD_EVENTS: i32 = 4;

/// What each descriptor sent after a [`Setup`] is, in the order sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SetupFile {
    /// Where the guest's serial console goes.
    Console,
    /// The guest's RAM (memfd backend only).
    Memory,
    /// A read-only descriptor of the guest's merge group's stable store
    /// (in-process sharing only).
    Store,
    /// The guest's TAP, opened by the supervisor (a guest with a network).
    Tap,
    /// The guest's vsock listener, bound by the supervisor (a guest with vsock).
    Vsock,
    /// Its channel for connections to host sockets (`guest::dial`; with vsock).
    VsockDial,
}

/// A guest process's OOM score adjustment: a guest is always the OOM
/// killer's first pick, and only that guest ends.
pub const GUEST_OOM_SCORE_ADJ: i32 = 1000;

/// Largest frame either side accepts: a dirty bitmap of a 1 TiB guest.
pub const MAX_FRAME: usize = 40 << 20;

/// Everything a guest process needs to build its guest.
#[derive(Debug, Serialize, Deserialize)]
pub struct Setup {
    pub id: usize,
    pub guest: GuestConfig,
    pub backend: MemoryBackend,
    /// The disk: its base image and, unless read-only, the overlay to create.
    pub disk_overlay: Option<PathBuf>,
    /// Keep the overlay's file (`--overlay-dir`); else it is unlinked as
    /// soon as it is open.
    pub keep_overlay: bool,
    /// Keep KVM's dirty log and run a merge agent (in-process sharing).
    pub sharing: Option<AgentSetup>,
    /// Mark RAM MADV_MERGEABLE for kernel KSM.
    pub ksm: bool,
    /// Start from this snapshot instead of booting: its state as the
    /// supervisor read it (its directory is `guest.restore`), checked for
    /// its format and version; the guest process parses the rest.
    pub restore: Option<SavedState>,
    /// Boot what the disk image's boot entry names (a guest without a
    /// kernel), read from the image by the guest process.
    pub boot_entry: Option<crate::image::boot_entry::BootEntry>,
    /// With `restore`: the supervisor maps the snapshot's memory in as
    /// shared frames (`Adopt`) instead of the guest reading it.
    pub adopt_memory: bool,
    /// The network device, whose TAP is [`SetupFile::Tap`].
    pub net: Option<NetSetup>,
    /// The vsock device, whose listener is [`SetupFile::Vsock`].
    pub vsock: Option<VsockSetup>,
    /// The jail the process enters once the guest is built (`None`:
    /// `--no-jail`).
    pub jail: Option<Jail>,
    /// The console file's cap in bytes (`None`: the console is a terminal).
    pub console_limit: Option<u64>,
    /// The descriptors that follow this request, in order.
    pub files: Vec<SetupFile>,
}

/// A guest's vsock device as the supervisor set it up.
#[derive(Debug, Serialize, Deserialize)]
pub struct VsockSetup {
    pub cid: u64,
}

/// A guest's network device as the supervisor set it up.
#[derive(Debug, Serialize, Deserialize)]
pub struct NetSetup {
    pub tap: String,
    pub mac: [u8; 6],
    /// What tells its kernel its address (`ip=...`), if it has one.
    pub kernel_arg: Option<String>,
}

/// How the guest's merge agent works.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct AgentSetup {
    pub protect: MergeProtect,
    /// Keep KVM's dirty log (else the scanner compares checksums).
    pub dirty_log: bool,
    /// Nice value of the thread that makes merges: it holds writers off
    /// while it works, so it must not wait for a core behind them.
    pub nice: i32,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum Request {
    Setup(Box<Setup>),
    Start,
    Pause,
    Resume,
    /// Holds the vCPUs for memory (true) or lets them go: apart from
    /// Pause and Resume, which stay the user's.
    Throttle(bool),
    /// Ends the guest for this reason; the process exits once it has.
    Stop(GuestEnd),
    /// The merge agent's status; the reply's payload is the dirty bitmap.
    Status,
    /// Watch these pages' dirty log again; the payload is their bitmap.
    Watch,
    /// Merges; the payload is runs of (first page u32, first target u32,
    /// pages u32) ([`encode_merges`]), target [`ZERO_TARGET`] for the zero
    /// page, else a frame id.
    Merge,
    /// Maps frames over pages without comparing, before the guest first
    /// runs (a clone taking its snapshot's memory); payload as `Merge`,
    /// reply `Merged`.
    Adopt,
    /// The console's last bytes.
    Console,
    /// The balloon's new target, in 4 KiB pages.
    Balloon(u32),
    /// Writes a snapshot of the paused guest into the files that follow
    /// the request ([`send_files`]: memory, state, and a disk's overlay).
    Snapshot,
}

impl Request {
    /// What it asks, in a word, for error messages (a setup's whole
    /// configuration is no message).
    pub fn name(&self) -> &'static str {
        match self {
            Request::Setup(_) => "setup",
            Request::Start => "start",
            Request::Pause => "pause",
            Request::Resume => "resume",
            Request::Throttle(_) => "throttle",
            Request::Stop(_) => "stop",
            Request::Status => "status",
            Request::Watch => "watch",
            Request::Merge => "merge",
            Request::Adopt => "adopt",
            Request::Console => "console",
            Request::Balloon(_) => "balloon",
            Request::Snapshot => "snapshot",
        }
    }
}

/// The target number that stands for the zero page in a merge list.
pub const ZERO_TARGET: u32 = u32::MAX;
/// A merge made, and one left alone because the page changed (`Merged`).
pub const MERGED: u8 = 1;
pub const CHANGED: u8 = 2;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Reply {
    Ok,
    /// The guest exists: its RAM as mapped in its process, and how its
    /// merges hold off writers.
    Created {
        regions: Vec<(u64, u64, u64)>,
        protection: Option<String>,
        /// When each step of its making ended (the host's monotonic clock,
        /// ns), from the process's start, in order.
        #[serde(default)]
        stages: Vec<(String, u64)>,
    },
    Status {
        has_dirty_log: bool,
        mappings: u64,
        map_limit: u64,
        /// Pages the guest gave back since the last status, as runs
        /// (first page, count) ([`dedup::AgentStatus::discarded`]).
        #[serde(default)]
        discarded: Vec<(u32, u32)>,
    },
    /// The payload: one byte per requested merge: [`MERGED`], [`CHANGED`]
    /// (left alone: the page changed), or 0 (not made).
    Merged {
        stalls_ns: Vec<u64>,
        write_protected: bool,
        map_limited: bool,
        mappings: u64,
        map_limit: u64,
        errors: u32,
        first_error: Option<String>,
    },
    Console(String),
    Snapshotted(crate::snapshot::Written),
    Error {
        kind: Kind,
        message: String,
    },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Event {
    /// The process has KVM open and its VM made, and waits for its setup
    /// (its first event, sent before the setup comes).
    Ready,
    /// Corrupted pages the guest has reported so far.
    Mismatches(u64),
    /// Rounds a memtest guest has verified in this process (a clone's
    /// count starts at 0, not at its template's).
    Rounds(u64),
    /// How long its pages took so far (memtest), in nanoseconds.
    Gaps(crate::gaps::Gaps),
    /// What it has cost KVM so far.
    Kvm(KvmCounters),
    /// Where its balloon stands, whenever that changed.
    Balloon(BalloonStatus),
    /// When a vCPU first entered the guest (the host's monotonic clock, ns).
    FirstEntry(u64),
    /// How the guest ended, and its console's tail; the process exits next.
    Ended { end: GuestEnd, console: String },
}

/// The user and group a guest process runs as.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Jail {
    pub uid: u32,
    pub gid: u32,
}

impl Jail {
    /// Guest `id`'s jail: user and group id `base + id`.
    pub fn for_guest(base: u32, id: usize) -> io::Result<Jail> {
        let uid =
            u32::try_from(id).ok().and_then(|id| base.checked_add(id)).filter(|&uid| uid < u32::MAX).ok_or_else(
                || io::Error::other(format!("--jail-uid-base {base} + guest {id} is past the last user id")),
            )?;
        Ok(Jail { uid, gid: uid })
    }
}

/// How a guest process says a signal ended it: as process 1 of its PID
/// namespace it gets from outside only the signals it handles (and
/// SIGKILL), so it handles those that end a process, says which on
/// stderr, and exits.
pub const FATAL_SIGNAL: &str = "vmm-guest ended by signal ";

/// The line a guest process leaves on stderr when seccomp stops a call,
/// before the call's name.
pub const VIOLATION: &str = "vmm-guest seccomp violation: ";

/// Balloon pages are 4 KiB whatever the guest's page size.
pub const BALLOON_PAGE: u64 = 4096;

/// Where a guest's balloon stands (`guest::devices::virtio::balloon`),
/// as its process tells the supervisor.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BalloonStatus {
    /// Pages the host asked the guest to hold in its balloon.
    pub target_pages: u32,
    /// Pages the guest says its balloon holds.
    pub actual_pages: u32,
    /// The guest's driver has started the device.
    pub driver_ready: bool,
    /// It negotiated free page reporting, statistics, deflate on OOM.
    pub reporting: bool,
    pub stats_queue: bool,
    pub deflate_on_oom: bool,
    /// Pages given back by inflating, taken back by deflating, and
    /// reported free, since the guest booted (a clone goes on counting).
    pub inflated_pages: u64,
    pub deflated_pages: u64,
    pub reported_pages: u64,
    /// Frame numbers or ranges outside the guest's RAM, skipped.
    pub bad_pages: u64,
    /// The guest's last statistics, by name.
    pub stats: std::collections::BTreeMap<String, u64>,
}

/// What a guest cost KVM so far, summed over its vCPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct KvmCounters {
    /// Page faults KVM handled for the guest (`pf_taken`): its memory
    /// faulted in, again after a remap, or written after a copy-on-write
    /// merge or a dirty-log re-arm.
    pub page_faults: u64,
    /// Times KVM flushed the guest's TLB (`tlb_flush`).
    pub tlb_flushes: u64,
    /// Exits to KVM (`exits`).
    pub exits: u64,
}

impl KvmCounters {
    pub fn add(&mut self, other: &KvmCounters) {
        self.page_faults += other.page_faults;
        self.tlb_flushes += other.tlb_flushes;
        self.exits += other.exits;
    }
}

pub fn send<T: Serialize>(stream: &mut UnixStream, header: &T, payload: &[u8]) -> io::Result<()> {
    let header = serde_json::to_vec(header).map_err(io::Error::other)?;
    let rest = 4 + header.len() + payload.len();
    if rest > MAX_FRAME {
        return Err(io::Error::other(format!("frame of {rest} bytes is too large")));
    }
    let mut frame = Vec::with_capacity(4 + rest);
    frame.extend_from_slice(&(rest as u32).to_le_bytes());
    frame.extend_from_slice(&(header.len() as u32).to_le_bytes());
    frame.extend_from_slice(&header);
    frame.extend_from_slice(payload);
    stream.write_all(&frame)
}

/// Sends descriptors: one byte carrying them, after a request that says
/// they follow.
pub fn send_files(stream: &UnixStream, fds: &[std::os::fd::RawFd]) -> io::Result<()> {
    use vmm_sys_util::sock_ctrl_msg::ScmSocket;
    stream.send_with_fds(&[&[0u8][..]], fds).map(drop).map_err(|e| io::Error::from_raw_os_error(e.errno()))
}

/// The descriptors [`send_files`] sent (at most [`MAX_FILES`]).
pub fn receive_files(stream: &UnixStream) -> io::Result<Vec<std::fs::File>> {
    use std::os::fd::FromRawFd;
    use vmm_sys_util::sock_ctrl_msg::ScmSocket;
    let mut byte = [0u8; 1];
    let mut fds = [-1; MAX_FILES];
    let mut iov = [libc::iovec { iov_base: byte.as_mut_ptr().cast(), iov_len: 1 }];
    // SAFETY: the iovec points at `byte`, which outlives the call.
    let (n, count) =
        unsafe { stream.recv_with_fds(&mut iov, &mut fds) }.map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    // SAFETY: the kernel just installed these descriptors for us.
    let files = fds[..count].iter().map(|&fd| unsafe { std::fs::File::from_raw_fd(fd) }).collect();
    match n {
        1 => Ok(files),
        _ => Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the descriptors did not come")),
    }
}

/// Most descriptors one [`send_files`] carries.
pub const MAX_FILES: usize = 8;

/// The next frame; `Ok(None)` at a clean end of the stream.
pub fn receive<T: DeserializeOwned>(stream: &mut UnixStream) -> io::Result<Option<(T, Vec<u8>)>> {
    let mut len = [0u8; 4];
    match stream.read_exact(&mut len) {
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        other => other?,
    }
    let rest = u32::from_le_bytes(len) as usize;
    if !(4..=MAX_FRAME).contains(&rest) {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("bad frame length {rest}")));
    }
    let mut frame = vec![0u8; rest];
    stream.read_exact(&mut frame)?;
    let header_len = u32::from_le_bytes(frame[..4].try_into().unwrap()) as usize;
    if header_len > rest - 4 {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("bad header length {header_len}")));
    }
    let header = serde_json::from_slice(&frame[4..4 + header_len])
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("bad message: {e}")))?;
    Ok(Some((header, frame.split_off(4 + header_len))))
}

/// A merge list as payload bytes (`decode_merges` reads it back), as runs: consecutive pages onto the zero page, or onto
/// consecutive frames, are one entry of (first page, first target, pages),
/// 12 bytes for a run where a page each took 8 (a clone's whole memory is
/// a run or two: `Engine::lay_out`).
pub fn encode_merges(merges: &[(u32, dedup::Target)]) -> Vec<u8> {
    let number = |target| match target {
        dedup::Target::Zero => ZERO_TARGET,
        dedup::Target::Frame(f) => f,
    };
    let mut runs: Vec<(u32, u32, u32)> = Vec::new();
    for &(page, target) in merges {
        let t = number(target);
        match runs.last_mut() {
            Some((first, first_t, n))
                if page.checked_sub(*first) == Some(*n)
                    && (t == ZERO_TARGET && *first_t == ZERO_TARGET
                        || t != ZERO_TARGET && *first_t != ZERO_TARGET && t.checked_sub(*first_t) == Some(*n)) =>
            {
                *n += 1
            }
            _ => runs.push((page, t, 1)),
        }
    }
    runs.iter().flat_map(|&(page, t, n)| [page, t, n]).flat_map(u32::to_le_bytes).collect()
}

/// The merge list [`encode_merges`] made, a page each; at most
/// [`MAX_MERGE_PAGES`] pages.
pub fn decode_merges(payload: &[u8]) -> io::Result<Vec<(u32, dedup::Target)>> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, format!("merge list: {what}"));
    if !payload.len().is_multiple_of(12) {
        return Err(bad("not whole runs"));
    }
    let mut merges = Vec::new();
    for run in payload.chunks_exact(12) {
        let word = |i: usize| u32::from_le_bytes(run[i * 4..i * 4 + 4].try_into().unwrap());
        let (page, t, n) = (word(0), word(1), word(2));
        // A run of frames must end before the zero target's number.
        let frames_fit = t == ZERO_TARGET || t.checked_add(n).is_some();
        if n == 0 || page.checked_add(n).is_none() || !frames_fit {
            return Err(bad("a run out of range"));
        }
        if merges.len() + n as usize > MAX_MERGE_PAGES {
            return Err(bad("too many pages"));
        }
        merges.extend(
            (0..n)
                .map(|i| (page + i, if t == ZERO_TARGET { dedup::Target::Zero } else { dedup::Target::Frame(t + i) })),
        );
    }
    Ok(merges)
}

/// The most pages one merge list may name: every page of a 1 TiB guest.
pub const MAX_MERGE_PAGES: usize = 1 << 28;

pub fn words_to_bytes(words: &[u64]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

pub fn bytes_to_words(bytes: &[u8]) -> io::Result<Vec<u64>> {
    if !bytes.len().is_multiple_of(8) {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "bitmap is not whole words"));
    }
    Ok(bytes.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        send(&mut a, &Request::Merge, &[1, 2, 3]).unwrap();
        send(&mut a, &Event::Mismatches(7), &[]).unwrap();
        drop(a);
        let (r, p): (Request, Vec<u8>) = receive(&mut b).unwrap().unwrap();
        assert!(matches!(r, Request::Merge) && p == [1, 2, 3]);
        let (e, _): (Event, Vec<u8>) = receive(&mut b).unwrap().unwrap();
        assert!(matches!(e, Event::Mismatches(7)));
        assert!(receive::<Event>(&mut b).unwrap().is_none(), "end of stream");
    }

    /// A guest process that sends garbage gets an error, not a crash or an
    /// allocation of whatever size it claims.
    #[test]
    fn garbage_frames_are_errors() {
        for bytes in [
            &[0xff, 0xff, 0xff, 0xff][..],
            &[2, 0, 0, 0, 0, 0],
            &[8, 0, 0, 0, 200, 0, 0, 0, 1, 2, 3, 4],
            &[6, 0, 0, 0, 2, 0, 0, 0, b'{', b'x'],
        ] {
            let (mut a, mut b) = UnixStream::pair().unwrap();
            a.write_all(bytes).unwrap();
            drop(a);
            assert!(receive::<Event>(&mut b).is_err(), "{bytes:?}");
        }
    }

    #[test]
    fn merge_lists_round_trip() {
        use dedup::Target::{Frame, Zero};
        let merges = vec![(3, Zero), (9, Frame(42))];
        assert_eq!(decode_merges(&encode_merges(&merges)).unwrap(), merges);
        assert!(decode_merges(&[1, 2, 3]).is_err());
        // Runs: consecutive pages on the zero page or on consecutive frames
        // are one entry; anything else starts another.
        let runs =
            vec![(0, Frame(7)), (1, Frame(8)), (2, Frame(9)), (3, Zero), (4, Zero), (5, Frame(10)), (7, Frame(11))];
        let encoded = encode_merges(&runs);
        assert_eq!(encoded.len(), 4 * 12, "{encoded:?}");
        assert_eq!(decode_merges(&encoded).unwrap(), runs);
        let whole: Vec<_> = (0..65_536).map(|p| (p, Frame(1000 + p))).collect();
        assert_eq!(encode_merges(&whole).len(), 12);
        assert_eq!(decode_merges(&encode_merges(&whole)).unwrap(), whole);
        // Runs that do not fit are refused, not wrapped.
        let run = |page: u32, t: u32, n: u32| [page, t, n].into_iter().flat_map(u32::to_le_bytes).collect::<Vec<u8>>();
        for bad in [run(0, 5, 0), run(u32::MAX - 1, 5, 3), run(0, ZERO_TARGET - 1, 2), run(0, ZERO_TARGET, 1 << 29)] {
            assert!(decode_merges(&bad).is_err(), "{bad:?}");
        }
        assert_eq!(bytes_to_words(&words_to_bytes(&[5, u64::MAX])).unwrap(), vec![5, u64::MAX]);
    }
}
