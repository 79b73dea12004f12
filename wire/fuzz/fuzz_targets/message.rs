//! Fuzz target `message`: its body is `ferry_wire::fuzzing::formats::message`, which the normal test run
//! also calls on every file of `corpus/message`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ferry_wire::fuzzing::formats::message(data));
