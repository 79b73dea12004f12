//! Fuzz target `phase_slots`: its body is `ferry_wire::fuzzing::formats::phase_slots`, which the normal test run
//! also calls on every file of `corpus/phase_slots`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ferry_wire::fuzzing::formats::phase_slots(data));
