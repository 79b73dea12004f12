//! Fuzz target `wal_batch`: its body is `ferry_wire::fuzzing::formats::wal_batch`, which the normal test run
//! also calls on every file of `corpus/wal_batch`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ferry_wire::fuzzing::formats::wal_batch(data));
