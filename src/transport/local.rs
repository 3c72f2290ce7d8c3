//! The local transport (placeholder until the implementation lands).
