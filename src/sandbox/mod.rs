//! The sandbox executor: every runner a Linux sandbox (placeholder until it lands).
