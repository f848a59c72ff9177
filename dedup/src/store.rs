//! The stable store: frames of merged content, owned by the engine.
//!
//! Each merge group has a memfd of its own holding one 4 KiB frame per
//! distinct merged content; a guest process gets a read-only descriptor of
//! its group's memfd alone, so it can map and compare frames but never
//! write one or see another group's. Guests map frames `MAP_PRIVATE`, so
//! their writes never reach a frame: once written, a frame's content is
//! fixed until it is freed. The engine keeps its own `MAP_SHARED` view to
//! fill and compare frames. Frame ids continue the last one handed out
//! while they can, so pages merged in scan order get adjacent frames and
//! their mappings coalesce into one VMA; freed ids are reused, so the id
//! space never runs out while frames come and go.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::io;

use crate::os::{self, PAGE_SIZE};

pub type FrameId = u32;
pub type GroupId = u32;

/// Address space reserved for a view of one group's store (not memory).
pub const VIEW_BYTES: usize = 1 << 40;
const MAX_FRAMES: usize = VIEW_BYTES / PAGE_SIZE;

struct Frame {
    /// Guest pages that map it now.
    mapped: u32,
    /// Merges queued onto it that have not happened yet.
    reserved: u32,
    hash: u64,
    /// Which filling of this id it is: a frame id freed and filled again
    /// gets a new generation, so (id, generation) names one content for
    /// good.
    generation: u64,
}

/// The frames of one merge group.
pub struct StableStore {
    file: File,
    view: *mut u8,
    /// Indexed by `FrameId`; `None` once freed (its id in `free`).
    frames: Vec<Option<Frame>>,
    free: BTreeSet<FrameId>,
    /// Content index: frames by content hash.
    index: HashMap<u64, Vec<FrameId>>,
    live: usize,
    /// Frames with at least one mapping guest page.
    mapped_frames: usize,
    file_len: u64,
    last: Option<FrameId>,
    generations: u64,
}

// SAFETY: `view` is a mapping owned by the store; it is only used through
// `&self`/`&mut self`, so the usual borrow rules order every access.
unsafe impl Send for StableStore {}

impl StableStore {
    pub fn new(group: GroupId) -> io::Result<Self> {
        let file = os::memfd(&format!("vmm-stable-store-{group}"))?;
        // The engine writes frames through this descriptor, opened writable
        // here. The file's mode keeps anyone else from opening it writable
        // again (a guest process reopening its read-only descriptor through
        // /proc/self/fd): only a process with the owner's user id or
        // CAP_DAC_OVERRIDE could, and a jailed guest process has neither.
        // The seal keeps it from shrinking under the guests' mappings.
        file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o400))?;
        os::seal(&file, libc::F_SEAL_SHRINK)?;
        let view = os::map_file(&file, VIEW_BYTES, 0, false)?;
        Ok(StableStore {
            file,
            view,
            frames: Vec::new(),
            free: BTreeSet::new(),
            index: HashMap::new(),
            live: 0,
            mapped_frames: 0,
            file_len: 0,
            last: None,
            generations: 0,
        })
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn offset(frame: FrameId) -> u64 {
        u64::from(frame) * PAGE_SIZE as u64
    }

    /// The frame's content, as the engine sees it.
    pub fn page(&self, frame: FrameId) -> &[u8] {
        debug_assert!(self.frames[frame as usize].is_some());
        // SAFETY: the frame lies below `file_len`, inside the view, and frame
        // contents never change while a frame is live.
        unsafe { std::slice::from_raw_parts(self.view.add(Self::offset(frame) as usize), PAGE_SIZE) }
    }

    /// Whether some frame has this content hash.
    pub fn has_hash(&self, hash: u64) -> bool {
        self.index.contains_key(&hash)
    }

    /// A live frame holding exactly `content`, with room for one more user
    /// under `max_users`.
    pub fn find(&self, hash: u64, content: &[u8], max_users: u32) -> Option<FrameId> {
        self.index.get(&hash)?.iter().copied().find(|&f| {
            let frame = self.frames[f as usize].as_ref().unwrap();
            frame.mapped + frame.reserved < max_users && self.page(f) == content
        })
    }

    /// The id after the last one handed out if that is free (adjacent
    /// frames for pages merged in order), else the lowest free id, else a
    /// new one at the end.
    fn next_id(&self) -> Option<FrameId> {
        let after_last = self.last.map_or(0, |l| l + 1);
        if self.free.contains(&after_last) {
            return Some(after_last);
        }
        self.free.first().copied().or_else(|| (self.frames.len() < MAX_FRAMES).then_some(self.frames.len() as FrameId))
    }

    /// A new frame holding a copy of `content`, with no users yet.
    pub fn insert(&mut self, hash: u64, content: &[u8]) -> io::Result<FrameId> {
        let id = self.next_id().ok_or_else(|| io::Error::other("stable store full"))?;
        self.grow_to(id as usize + 1)?;
        if id as usize == self.frames.len() {
            self.frames.push(None);
        } else {
            self.free.remove(&id);
        }
        self.fill(id, hash, Some(content))?;
        self.last = Some(id);
        Ok(id)
    }

    /// Makes the file hold frames below `frames` (in 2 MiB steps:
    /// ftruncate is cheap, but not free).
    fn grow_to(&mut self, frames: usize) -> io::Result<()> {
        let end = Self::offset(frames as FrameId);
        if end > self.file_len {
            let len = end.next_multiple_of(2 << 20);
            self.file.set_len(len)?;
            self.file_len = len;
        }
        Ok(())
    }

    /// Makes id `id` (handed out, empty, a hole in the file) a live frame
    /// of `content`; `None` is zero content, left a hole and kept out of the
    /// content index (nothing is merged onto a laid-out zero frame).
    fn fill(&mut self, id: FrameId, hash: u64, content: Option<&[u8]>) -> io::Result<()> {
        if let Some(content) = content {
            // A write, not a store through the view: a whole-page write
            // fills a fresh page without the fault and the clearing a store
            // would cost. The frame is not mapped by any guest yet, so
            // nobody sees it early.
            os::write_page(&self.file, content, Self::offset(id))?;
            self.index.entry(hash).or_default().push(id);
        }
        self.generations += 1;
        self.frames[id as usize] = Some(Frame { mapped: 0, reserved: 0, hash, generation: self.generations });
        self.live += 1;
        Ok(())
    }

    /// Hands out `n` consecutive ids, none filled yet, for a laid-out
    /// placement (a guest's pages on frames in page order, so that one
    /// mapping covers them): the lowest run of free ids that long, else ids
    /// at the end. Fill them with [`StableStore::fill_block`], then give back
    /// those left empty with [`StableStore::close_block`]. Every id of the
    /// block is a hole when this returns.
    pub fn open_block(&mut self, n: usize) -> io::Result<FrameId> {
        let base = self.free_run(n).unwrap_or(self.frames.len() as FrameId);
        let end = base as usize + n;
        if end > MAX_FRAMES {
            return Err(io::Error::other("stable store full"));
        }
        self.grow_to(end)?;
        let reused = self.frames.len().min(end).saturating_sub(base as usize);
        for id in base..base + reused as FrameId {
            self.free.remove(&id);
        }
        if end > self.frames.len() {
            self.frames.resize_with(end, || None);
        }
        // Freed frames were punched, but a failed punch only logged: a
        // zero frame of the block must be a hole for sure.
        if reused > 0 {
            os::punch_hole(&self.file, Self::offset(base), (reused * PAGE_SIZE) as u64)?;
        }
        Ok(base)
    }

    /// Fills id `id` of an open block (see [`StableStore::fill`]).
    pub fn fill_block(&mut self, id: FrameId, hash: u64, content: Option<&[u8]>) -> io::Result<()> {
        debug_assert!(self.frames[id as usize].is_none(), "frame {id} of a block filled twice");
        self.fill(id, hash, content)
    }

    /// Gives back the ids of the block at `base` that were not filled.
    pub fn close_block(&mut self, base: FrameId, n: usize) {
        for id in base..base + n as FrameId {
            if self.frames[id as usize].is_none() {
                self.free.insert(id);
            }
        }
        self.last = Some(base + n as FrameId - 1);
    }

    /// The lowest run of `n` free ids (one that reaches the end of the id
    /// space may go on past it).
    fn free_run(&self, n: usize) -> Option<FrameId> {
        let (mut start, mut len, mut prev) = (0, 0, None::<FrameId>);
        for &id in &self.free {
            if prev.is_some_and(|p| p + 1 == id) {
                len += 1;
            } else {
                (start, len) = (id, 1);
            }
            if len == n {
                return Some(start);
            }
            prev = Some(id);
        }
        prev.filter(|&p| p as usize + 1 == self.frames.len()).map(|_| start)
    }

    fn frame(&mut self, id: FrameId) -> &mut Frame {
        self.frames[id as usize].as_mut().expect("a freed frame is still in use")
    }

    /// The generation of live frame `id`.
    pub fn generation(&self, id: FrameId) -> u64 {
        self.frames[id as usize].as_ref().expect("a freed frame is still in use").generation
    }

    /// Whether frame `id` is live and still the filling `generation` (so
    /// still holds the content it held then).
    pub fn is_generation(&self, id: FrameId, generation: u64) -> bool {
        matches!(self.frames.get(id as usize), Some(Some(f)) if f.generation == generation)
    }

    /// Whether live frame `id` can take one more user under `max_users`.
    pub fn has_room(&self, id: FrameId, max_users: u32) -> bool {
        self.frames[id as usize].as_ref().is_some_and(|f| f.mapped + f.reserved < max_users)
    }

    /// Reserves the frame for a queued merge.
    pub fn reserve(&mut self, id: FrameId) {
        self.frame(id).reserved += 1;
    }

    /// A queued merge happened: its reservation is now a mapping.
    pub fn reserved_to_mapped(&mut self, id: FrameId) {
        let f = self.frame(id);
        f.reserved -= 1;
        f.mapped += 1;
        if f.mapped == 1 {
            self.mapped_frames += 1;
        }
    }

    /// A queued merge did not happen; the frame goes with its last user.
    pub fn unreserve(&mut self, id: FrameId) -> io::Result<()> {
        self.frame(id).reserved -= 1;
        self.free_if_unused(id)
    }

    /// A guest page stopped mapping the frame; it goes with its last user.
    pub fn unmap(&mut self, id: FrameId) -> io::Result<()> {
        let f = self.frame(id);
        f.mapped -= 1;
        if f.mapped == 0 {
            self.mapped_frames -= 1;
        }
        self.free_if_unused(id)
    }

    fn free_if_unused(&mut self, id: FrameId) -> io::Result<()> {
        let f = self.frames[id as usize].as_ref().expect("a freed frame is still in use");
        if f.mapped + f.reserved > 0 {
            return Ok(());
        }
        let hash = f.hash;
        self.frames[id as usize] = None;
        self.free.insert(id);
        if let Some(list) = self.index.get_mut(&hash) {
            list.retain(|&x| x != id);
            if list.is_empty() {
                self.index.remove(&hash);
            }
        }
        self.live -= 1;
        // Even if the punch fails the frame is forgotten: a later frame with
        // this id overwrites the page whole before anyone maps it.
        os::punch_hole(&self.file, Self::offset(id), PAGE_SIZE as u64)
    }

    /// Frames in use, reserved ones included.
    pub fn live_frames(&self) -> usize {
        self.live
    }

    /// Frames at least one guest page maps (KSM's pages_shared).
    pub fn mapped_frames(&self) -> usize {
        self.mapped_frames
    }

    /// Ids handed out and not freed, and the highest id + 1: the store's
    /// file is at most that many pages long.
    pub fn id_space(&self) -> usize {
        self.frames.len()
    }

    /// Bytes of bookkeeping the store holds.
    pub fn metadata_bytes(&self) -> usize {
        self.frames.capacity() * std::mem::size_of::<Option<Frame>>()
            + self.index.capacity() * (std::mem::size_of::<u64>() + 32)
            + self.free.len() * 8
    }
}

impl Drop for StableStore {
    fn drop(&mut self) {
        // SAFETY: the view was mapped in `new` and is used by nobody else.
        unsafe { os::unmap(self.view, VIEW_BYTES) };
    }
}

/// A guest process's read-only view of its group's store: for comparing
/// pages with frames before they are remapped onto them.
pub struct StoreView {
    file: File,
    view: *mut u8,
}

// SAFETY: the view is a read-only mapping owned by this value.
unsafe impl Send for StoreView {}

impl StoreView {
    pub fn new(file: File) -> io::Result<StoreView> {
        let view = os::map_file(&file, VIEW_BYTES, 0, true)?;
        Ok(StoreView { file, view })
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    /// A frame's content. Reading a frame the engine never wrote would fail
    /// (beyond the file's end) or read a hole, so the engine only names
    /// frames it holds for this merge.
    pub fn page(&self, frame: FrameId) -> &[u8] {
        assert!((frame as usize) < MAX_FRAMES, "frame {frame} beyond the store");
        // SAFETY: inside the reserved view; frames named by the engine lie
        // below the file's end and do not change while reserved.
        unsafe { std::slice::from_raw_parts(self.view.add(StableStore::offset(frame) as usize), PAGE_SIZE) }
    }
}

impl Drop for StoreView {
    fn drop(&mut self) {
        // SAFETY: the view was mapped in `new` and is used by nobody else.
        unsafe { os::unmap(self.view, VIEW_BYTES) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(byte: u8) -> Vec<u8> {
        vec![byte; PAGE_SIZE]
    }

    #[test]
    fn frames_are_found_by_content() {
        let mut s = StableStore::new(0).unwrap();
        let f = s.insert(42, &page(1)).unwrap();
        assert_eq!(s.find(42, &page(1), 10), Some(f));
        assert_eq!(s.find(42, &page(2), 10), None, "hash collision, other content");
        assert_eq!(s.page(f), &page(1)[..]);
    }

    #[test]
    fn full_frames_are_not_offered() {
        let mut s = StableStore::new(0).unwrap();
        let f = s.insert(1, &page(3)).unwrap();
        s.reserve(f);
        s.reserve(f);
        s.reserved_to_mapped(f);
        assert_eq!(s.find(1, &page(3), 2), None);
        assert_eq!(s.find(1, &page(3), 3), Some(f));
    }

    #[test]
    fn last_user_frees_the_frame() {
        let mut s = StableStore::new(0).unwrap();
        let f = s.insert(9, &page(7)).unwrap();
        s.reserve(f);
        s.reserve(f);
        s.reserved_to_mapped(f);
        s.unreserve(f).unwrap();
        assert_eq!((s.live_frames(), s.mapped_frames()), (1, 1));
        s.unmap(f).unwrap();
        assert_eq!(s.live_frames(), 0);
        assert_eq!(s.find(9, &page(7), 10), None);
    }

    #[test]
    fn consecutive_inserts_get_adjacent_frames() {
        let mut s = StableStore::new(0).unwrap();
        let a = s.insert(1, &page(1)).unwrap();
        let b = s.insert(2, &page(2)).unwrap();
        assert_eq!(b, a + 1);
    }

    /// Frames made and freed over and over (twins that never get merged)
    /// reuse their ids instead of growing the id space.
    #[test]
    fn freed_ids_are_reused() {
        let mut s = StableStore::new(0).unwrap();
        let keep = s.insert(1, &page(1)).unwrap();
        s.reserve(keep);
        for round in 0..10_000u64 {
            let f = s.insert(100 + round, &page(2)).unwrap();
            s.reserve(f);
            s.unreserve(f).unwrap();
        }
        assert!(s.id_space() <= 2, "id space grew to {}", s.id_space());
        assert_eq!(s.live_frames(), 1);
    }

    /// A block's frames are consecutive ids in the order filled, zero ones
    /// read zero and are found by nobody, the ids left empty go back, and a
    /// later block reuses a freed run.
    #[test]
    fn a_block_lays_frames_out_in_order() {
        let mut s = StableStore::new(0).unwrap();
        let keep = s.insert(1, &page(1)).unwrap();
        s.reserve(keep);
        let base = s.open_block(4).unwrap();
        assert_eq!(base, keep + 1);
        s.fill_block(base, 2, Some(&page(2))).unwrap();
        s.fill_block(base + 1, 0, None).unwrap();
        s.fill_block(base + 3, 3, Some(&page(3))).unwrap();
        s.close_block(base, 4);
        assert_eq!(s.page(base), &page(2)[..]);
        assert_eq!(s.page(base + 1), &page(0)[..], "a zero frame is a hole");
        assert_eq!(s.page(base + 3), &page(3)[..]);
        assert_eq!(s.find(0, &page(0), 10), None, "zero frames are not offered");
        assert_eq!(s.find(3, &page(3), 10), Some(base + 3));
        assert_eq!(s.live_frames(), 4);
        // The id left empty is handed out again.
        assert_eq!(s.insert(4, &page(4)).unwrap(), base + 2);
        // Freed, the block's frames make room for the next block there.
        for f in [base, base + 1, base + 3] {
            s.reserve(f);
            s.unreserve(f).unwrap();
        }
        let f = base + 2;
        s.reserve(f);
        s.unreserve(f).unwrap();
        assert_eq!(s.open_block(4).unwrap(), base, "the freed run is reused");
        let mut read = page(9);
        std::os::unix::fs::FileExt::read_exact_at(s.file(), &mut read, StableStore::offset(base)).unwrap();
        assert_eq!(read, page(0), "a reused id is a hole again");
    }

    #[test]
    fn a_read_only_view_sees_frames() {
        let mut s = StableStore::new(3).unwrap();
        let f = s.insert(5, &page(9)).unwrap();
        let view = StoreView::new(os::reopen_read_only(s.file()).unwrap()).unwrap();
        assert_eq!(view.page(f), &page(9)[..]);
    }
}
