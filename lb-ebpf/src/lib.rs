#![no_std]
// The programs live in the `lb` binary target (src/main.rs). This library target exists so that
// lb-agent can name lb-ebpf as a build dependency and be rebuilt when it changes.
