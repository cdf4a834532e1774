//! Small shared pieces: atomic file writes, the seeded generator, Ctrl-C.

pub mod fs;
pub mod interrupt;
pub mod rng;
