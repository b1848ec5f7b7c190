//! The poseidon-lite server binary.

fn main() {
    // The binary doubles as the sandbox agent; this returns unless started as one.
    poseidon_lite::sandbox::run_agent_if_requested();
}
