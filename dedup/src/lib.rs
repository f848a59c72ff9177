//! In-process samepage merging: find identical 4 KiB pages across the guests
//! this process runs and map them to one shared frame, copy-on-write.
//!
//! # The algorithm
//!
//! Guest RAM is a memfd mapped `MAP_SHARED` by the VMM. The engine walks
//! every guest's pages in turn, a few thousand per [`Engine::scan`] call, and
//! for each page not yet merged:
//!
//! 1. skips it if it is *volatile*: written since the engine last looked,
//!    by KVM's dirty log (or, without one, because its content hash
//!    changed). Merging it would only be undone by the next write. Otherwise
//!    the engine copies the page and hashes the copy (xxh3). Without a dirty
//!    log, a page seen for the first time only has its hash recorded: it
//!    becomes a candidate once it has stayed unchanged for a whole pass.
//!    Pages never written (holes in the memfd) are not looked at at all.
//! 2. A page of zeros is queued to become the kernel's zero page.
//! 3. Otherwise the *stable store* is asked for a frame with the same content
//!    in the same merge group (hash, then full compare: a hash alone is never
//!    trusted). A match is queued: this page will map that frame.
//! 4. Otherwise the page is looked up in the *unstable* table of pages seen
//!    once this pass. A twin with the same content makes a new frame (a copy
//!    of the content in the store's memfd), and both pages are queued for it.
//!    Without a twin, the page is remembered there. The unstable table is
//!    forgotten at the end of every pass, since its pages may have changed.
//!
//! Queued merges are carried out per guest in batches, under a short
//! *freeze*: the guest's vCPUs are parked outside `KVM_RUN` and its device
//! threads held, so nothing can write its memory. Under the freeze every
//! queued page is compared again with its frame; pages that still match are
//! remapped `MAP_PRIVATE` onto the frame (adjacent pages with adjacent frames
//! in one `mmap`, so they share one mapping), and zero pages onto anonymous
//! memory. After the thaw, the guest's old frames are punched out of its
//! memfd. The first later write to a merged page, by a vCPU or by the VMM,
//! is copied on write by the kernel, and KVM's MMU notifier drops its stale
//! EPT/NPT entry on each remap and each copy. Frames are reference counted;
//! at the end of each pass, `/proc/self/pagemap` shows which merged pages
//! were copied on write since, and a frame is freed with its last user.
//! docs/dedup.md argues why no write can be lost.

pub mod engine;
pub mod os;
pub mod stats;
pub mod store;

pub use engine::{Config, DirtyTracker, Engine, Freezer, GuestId, GuestMemory, Region};
pub use stats::{FreezeSummary, GuestStats, Stats};
pub use store::GroupId;
