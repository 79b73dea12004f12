//! Fuzz target `chunk_log`: its body is `ferry_wire::fuzzing::formats::chunk_log`, which the normal test run
//! also calls on every file of `corpus/chunk_log`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ferry_wire::fuzzing::formats::chunk_log(data));
