//! amphi-geo-router
