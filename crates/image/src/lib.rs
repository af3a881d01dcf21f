//! Images: fetch, verify, decompress, extract, and make disks and seed
//! volumes from them.
pub mod cache;
pub mod checksum;
pub mod decompress;
pub mod disk;
mod error;
pub mod inuse;
pub mod iso;
pub mod progress;
pub mod seed;

pub use cache::{Cache, Event};
pub use error::{ImageError, Result};
