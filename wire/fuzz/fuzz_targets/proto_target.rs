//! Fuzz target `proto_target`: its body is `ferry_wire::fuzzing::proto::target`, which the normal test run
//! also calls on every file of `corpus/proto_target`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ferry_wire::fuzzing::proto::target(data));
