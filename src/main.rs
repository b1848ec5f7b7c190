//! The poseidon-lite server binary.

fn main() {}
