//! Fuzz target `frame`: its body is `ferry_wire::fuzzing::formats::frame`, which the normal test run
//! also calls on every file of `corpus/frame`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ferry_wire::fuzzing::formats::frame(data));
