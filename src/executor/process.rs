//! The process executor (placeholder).
