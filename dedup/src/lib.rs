//! Samepage merging inside the VMM: find identical 4 KiB pages across
//! guests and map them to one shared frame, copy-on-write.
//!
//! # Who does what
//!
//! Each guest runs in a process of its own, with its RAM in a memfd it maps
//! `MAP_SHARED`. The VMM's supervisor runs the [`Engine`]: it maps every
//! guest's memfd read-only, decides what to merge and keeps the stable
//! store. A merge itself is made by the guest's [`Agent`], in the guest's
//! process, under that process's own mmap lock: merging one guest never
//! takes a lock another guest's vCPUs need.
//!
//! # The algorithm
//!
//! The engine walks every guest's pages in turn, a few thousand per
//! [`Engine::scan`] call, and for each page not yet merged:
//!
//! 1. skips it if it is *volatile*: written since the engine last looked,
//!    by the guest's dirty log (KVM's, plus the VMM's own device writes;
//!    without one, because its content hash changed). Merging it would only
//!    be undone by the next write. Otherwise the engine copies the page and
//!    hashes the copy (xxh3): from the memfd, or, for a page the guest has
//!    written since an earlier merge (its content is then a private copy in
//!    the guest's process), from the guest's process. Without a dirty log,
//!    a page seen for the first time only has its hash recorded: it becomes
//!    a candidate once it has stayed unchanged for a whole pass. Pages never
//!    written (holes in the memfd) are not looked at at all.
//! 2. A page of zeros is queued to become the kernel's zero page.
//! 3. Otherwise the *stable store* of the guest's merge group is asked for
//!    a frame with the same content (hash, then full compare: a hash alone
//!    is never trusted). A match is queued: this page will map that frame.
//! 4. Otherwise the page is looked up in the *unstable* table of pages seen
//!    once this pass. A twin with the same content makes a new frame (a copy
//!    of the content in the store's memfd), and both pages are queued for it.
//!    Without a twin, the page is remembered there. The unstable table is
//!    forgotten at the end of every pass, since its pages may have changed.
//!
//! Queued merges go to the guest's agent in batches. For each window of
//! nearby pages the agent holds off writers (userfaultfd write-protection
//! of just those pages, or, where that is unavailable, a short freeze of
//! the guest), compares every page with its frame again, remaps the pages
//! still equal `MAP_PRIVATE` onto the frame (adjacent pages with adjacent
//! frames in one `mmap`, so they share one mapping) and zero pages onto
//! anonymous memory, and releases the window; then it punches the old
//! frames out of the guest's memfd. The first later write to a merged page,
//! by a vCPU or by the VMM, is copied on write by the kernel, and KVM's MMU
//! notifier drops its stale EPT/NPT entry on each remap and each copy.
//! Frames are reference counted; at the end of each pass the guest
//! process's pagemap shows which merged pages were copied on write since,
//! and a frame is freed with its last user. docs/dedup.md argues why no
//! write can be lost.

pub mod agent;
pub mod churn;
pub mod engine;
pub mod layout;
pub mod os;
pub mod scanner;
pub mod stats;
pub mod store;
pub mod uffd;

pub use agent::{
    Agent, AgentStatus, DirtyTracker, Freezer, GuestAgent, MergeOutcome, ProtectMode, Protection, FREEZE_BUDGET,
};
pub use engine::{Audit, Config, Engine, GuestId, GuestMemory, PreparedGuest};
pub use layout::{Region, Target};
pub use scanner::{Published, ScanPace, Scanner, DEFAULT_SCAN_NICE};
pub use stats::{GuestStats, HeldPages, StallSummary, Stats};
pub use store::{FrameId, GroupId};
