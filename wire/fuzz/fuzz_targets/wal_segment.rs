//! Fuzz target `wal_segment`: its body is `ferry_wire::fuzzing::formats::wal_segment`, which the normal test run
//! also calls on every file of `corpus/wal_segment`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ferry_wire::fuzzing::formats::wal_segment(data));
