//! amphi-packager
