//! The SSH transport (placeholder until the implementation lands).
