//! Container images by name, without Docker: references as Docker resolves them, a registry
//! client, a content-addressed store under the state directory, safe unpacking of layers and
//! import of image archives.

pub mod archive;
pub mod commands;
pub mod digest;
pub mod import;
pub mod inroot;
mod install;
pub mod manifest;
pub mod passwd;
pub mod pull;
pub mod reference;
pub mod registry;
pub mod service;
pub mod store;
pub mod stream;
pub mod unpack;

pub use digest::Digest;
pub use reference::Reference;
pub use store::{Store, StoredImage};
pub use unpack::Limits;
