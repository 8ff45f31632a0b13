//! amphi-origin
