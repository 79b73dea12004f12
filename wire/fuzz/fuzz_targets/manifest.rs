//! Fuzz target `manifest`: its body is `ferry_wire::fuzzing::formats::manifest`, which the normal test run
//! also calls on every file of `corpus/manifest`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ferry_wire::fuzzing::formats::manifest(data));
