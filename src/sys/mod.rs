//! The only place with `unsafe` code: thin wrappers around system calls that the safe APIs
//! (std, rustix) do not offer. Every block carries a `SAFETY:` comment.

pub mod sandbox;
