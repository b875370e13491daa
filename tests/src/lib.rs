//! End-to-end tests of Corsair across the real binaries, as separate processes: faults and
//! recovery under steady traffic, and bad input. The tests are in `tests/`; this library is
//! empty.
