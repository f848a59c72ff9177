//! In-process samepage merging (filled in by the dedup work; see docs/).
