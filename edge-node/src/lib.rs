//! amphi-edge
