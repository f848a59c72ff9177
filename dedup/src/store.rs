//! The stable store: frames of merged content, owned by the engine.
//!
//! A memfd holds one 4 KiB frame per distinct merged content. Guests map
//! frames `MAP_PRIVATE`, so their writes never reach a frame: once written,
//! a frame's content is fixed until it is freed. The engine keeps its own
//! `MAP_SHARED` view to fill and compare frames. Frames are handed out in
//! increasing offsets, so pages merged in scan order get adjacent frames and
//! their mappings coalesce into one VMA.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use crate::os::{self, PAGE_SIZE};

pub type FrameId = u32;
pub type GroupId = u32;

/// Address space reserved for the engine's view of the store (not memory).
const VIEW_BYTES: usize = 1 << 40;

struct Frame {
    users: u32,
    hash: u64,
    group: GroupId,
}

pub struct StableStore {
    file: File,
    view: *mut u8,
    /// Indexed by `FrameId`; `None` once freed.
    frames: Vec<Option<Frame>>,
    /// Content index: frames by (merge group, content hash).
    index: HashMap<(GroupId, u64), Vec<FrameId>>,
    live: usize,
    file_len: u64,
}

// SAFETY: `view` is a mapping owned by the store; it is only used through
// `&self`/`&mut self`, so the usual borrow rules order every access.
unsafe impl Send for StableStore {}

impl StableStore {
    pub fn new() -> io::Result<Self> {
        let file = os::memfd("vmm-stable-store")?;
        let view = os::map_shared(&file, VIEW_BYTES, 0)?;
        Ok(StableStore { file, view, frames: Vec::new(), index: HashMap::new(), live: 0, file_len: 0 })
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

    /// Whether some frame of `group` has this content hash.
    pub fn has_hash(&self, group: GroupId, hash: u64) -> bool {
        self.index.contains_key(&(group, hash))
    }

    /// A live frame in `group` holding exactly `content`, with room for one
    /// more user under `max_users`.
    pub fn find(&self, group: GroupId, hash: u64, content: &[u8], max_users: u32) -> Option<FrameId> {
        self.index.get(&(group, hash))?.iter().copied().find(|&f| {
            let frame = self.frames[f as usize].as_ref().unwrap();
            frame.users < max_users && self.page(f) == content
        })
    }

    /// A new frame holding a copy of `content`, with no users yet.
    pub fn insert(&mut self, group: GroupId, hash: u64, content: &[u8]) -> io::Result<FrameId> {
        let id = FrameId::try_from(self.frames.len()).map_err(|_| io::Error::other("stable store full"))?;
        let end = Self::offset(id) + PAGE_SIZE as u64;
        if end as usize > VIEW_BYTES {
            return Err(io::Error::other("stable store full"));
        }
        if end > self.file_len {
            // Grow in 2 MiB steps: ftruncate is cheap, but not free.
            self.file_len = end.next_multiple_of(2 << 20);
            self.file.set_len(self.file_len)?;
        }
        // A write, not a store through the view: a whole-page write fills a
        // fresh page without the fault and the clearing a store would cost.
        // The frame is not mapped by any guest yet, so nobody sees it early.
        self.file.write_all_at(content, Self::offset(id))?;
        self.frames.push(Some(Frame { users: 0, hash, group }));
        self.index.entry((group, hash)).or_default().push(id);
        self.live += 1;
        Ok(id)
    }

    pub fn users(&self, frame: FrameId) -> u32 {
        self.frames[frame as usize].as_ref().map_or(0, |f| f.users)
    }

    pub fn add_user(&mut self, frame: FrameId) {
        self.frames[frame as usize].as_mut().expect("user added to a freed frame").users += 1;
    }

    /// Drops one user; the frame is freed (its memory returned) with the last.
    pub fn drop_user(&mut self, frame: FrameId) -> io::Result<()> {
        let f = self.frames[frame as usize].as_mut().expect("user dropped from a freed frame");
        f.users -= 1;
        if f.users == 0 {
            self.free(frame)?;
        }
        Ok(())
    }

    /// Frees a frame nobody maps (also one that never got a user).
    pub fn free_if_unused(&mut self, frame: FrameId) -> io::Result<()> {
        if self.frames[frame as usize].as_ref().is_some_and(|f| f.users == 0) {
            self.free(frame)?;
        }
        Ok(())
    }

    fn free(&mut self, frame: FrameId) -> io::Result<()> {
        let f = self.frames[frame as usize].take().unwrap();
        if let Some(list) = self.index.get_mut(&(f.group, f.hash)) {
            list.retain(|&x| x != frame);
            if list.is_empty() {
                self.index.remove(&(f.group, f.hash));
            }
        }
        self.live -= 1;
        os::punch_hole(&self.file, Self::offset(frame), PAGE_SIZE as u64)
    }

    /// Frames in use (KSM's pages_shared).
    pub fn live_frames(&self) -> usize {
        self.live
    }

    /// Bytes of bookkeeping the store holds per frame ever made.
    pub fn metadata_bytes(&self) -> usize {
        self.frames.capacity() * std::mem::size_of::<Option<Frame>>()
            + self.index.capacity() * (std::mem::size_of::<(GroupId, u64)>() + 32)
    }
}

impl Drop for StableStore {
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
    fn frames_are_found_by_group_and_content() {
        let mut s = StableStore::new().unwrap();
        let f = s.insert(0, 42, &page(1)).unwrap();
        assert_eq!(s.find(0, 42, &page(1), 10), Some(f));
        assert_eq!(s.find(1, 42, &page(1), 10), None, "other group");
        assert_eq!(s.find(0, 42, &page(2), 10), None, "hash collision, other content");
        assert_eq!(s.page(f), &page(1)[..]);
    }

    #[test]
    fn full_frames_are_not_offered() {
        let mut s = StableStore::new().unwrap();
        let f = s.insert(0, 1, &page(3)).unwrap();
        s.add_user(f);
        s.add_user(f);
        assert_eq!(s.find(0, 1, &page(3), 2), None);
        assert_eq!(s.find(0, 1, &page(3), 3), Some(f));
    }

    #[test]
    fn last_user_frees_the_frame() {
        let mut s = StableStore::new().unwrap();
        let f = s.insert(0, 9, &page(7)).unwrap();
        s.add_user(f);
        s.add_user(f);
        s.drop_user(f).unwrap();
        assert_eq!(s.live_frames(), 1);
        s.drop_user(f).unwrap();
        assert_eq!(s.live_frames(), 0);
        assert_eq!(s.find(0, 9, &page(7), 10), None);
    }

    #[test]
    fn consecutive_inserts_get_adjacent_frames() {
        let mut s = StableStore::new().unwrap();
        let a = s.insert(0, 1, &page(1)).unwrap();
        let b = s.insert(0, 2, &page(2)).unwrap();
        assert_eq!(b, a + 1);
    }
}
