//! Images: fetch, verify, decompress, extract, and make disks and seed
//! volumes from them.
pub mod cache;
pub mod checksum;
pub mod decompress;
pub mod disk;
mod error;
pub mod iso;
pub mod progress;
pub mod seed;

pub use error::{ImageError, Result};
pub use cache::{Cache, Event};
